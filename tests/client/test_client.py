"""The client's requests and answers: the token, errors as SDXLError, generations with
several LoRAs and an init image, downloads written whole."""

import asyncio
import base64
import json

import httpx
import pytest
from sdxl_client import AsyncSDXLClient, LoraRef, SDXLClient, SDXLError


def test_url_and_token_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SDXL_URL", "http://sdxl.example:9000/")
    monkeypatch.setenv("SDXL_API_TOKEN", "tok")
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("Authorization")))
        return httpx.Response(200, json={"session_id": 12})

    with SDXLClient(transport=httpx.MockTransport(handler)) as client:
        assert client.create_session() == 12
    assert seen == [("http://sdxl.example:9000/create_session", "Bearer tok")]


def test_an_error_answer_raises_with_message_field_and_retry_after():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/train_lora":
            message = "steps: Ensure this value is less than or equal to 100000."
            return httpx.Response(400, json={"status": "error", "message": message})
        return httpx.Response(
            429, headers={"Retry-After": "30"}, json={"status": "error", "message": "busy"}
        )

    with SDXLClient("http://api", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(SDXLError) as raised:
            client.train(1, steps=10**9)
        assert (raised.value.status, raised.value.field) == (400, "steps")
        assert raised.value.message.startswith("steps: Ensure")
        with pytest.raises(SDXLError) as raised:
            client.session(1)
    assert (raised.value.status, raised.value.field, raised.value.retry_after) == (429, None, 30)


def _generation_server(requests: list) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.path == "/txt2img":
            return httpx.Response(202, json={"generation_id": 21, "status": "queued"})
        if request.url.path == "/generations/21/events":
            event = {"event": "completed", "type": "generation", "id": 21, "data": {}}
            body = f"id: 1\nevent: completed\ndata: {json.dumps(event)}\n\n"
            return httpx.Response(200, content=body.encode())
        if request.url.path == "/generations/21":
            urls = ["/generations/21/0.png", "/generations/21/1.png"]
            return httpx.Response(
                200,
                json={
                    "generation_id": 21,
                    "status": "completed",
                    "image_urls": urls,
                    "parameters": {"steps": 4},
                },
            )
        index = request.url.path.rsplit("/", 1)[-1][0]
        return httpx.Response(200, content=f"image {index}".encode())

    return httpx.MockTransport(handler)


def test_generate_with_several_loras_and_an_init_image(tmp_path):
    init = tmp_path / "init.png"
    init.write_bytes(b"init image")
    requests: list[httpx.Request] = []
    with SDXLClient("http://api", transport=_generation_server(requests)) as client:
        generation = client.generate(
            "ohwx at the beach",
            loras=[LoraRef(3, iteration=2, scale=0.8), {"session_id": 4}],
            init_image=init,
            strength=0.6,
        )
    body = json.loads(requests[0].content)
    assert body == {
        "prompt": "ohwx at the beach",
        "async": True,
        "loras": [{"session_id": 3, "iteration": 2, "scale": 0.8}, {"session_id": 4}],
        "init_image_base64": base64.b64encode(b"init image").decode(),
        "strength": 0.6,
    }
    assert (generation.id, generation.status, generation.parameters) == (
        21,
        "completed",
        {"steps": 4},
    )
    assert generation.images == [b"image 0", b"image 1"]
    saved = generation.save(tmp_path / "out")
    assert [path.name for path in saved] == ["21_0.png", "21_1.png"]
    assert saved[1].read_bytes() == b"image 1"


def test_the_async_client_generates_the_same_way():
    requests: list[httpx.Request] = []

    async def generate():
        async with AsyncSDXLClient("http://api", transport=_generation_server(requests)) as client:
            return await client.generate("a cat", session_id=3, init_image=b"raw")

    generation = asyncio.run(generate())
    assert json.loads(requests[0].content)["init_image_base64"] == base64.b64encode(b"raw").decode()
    assert generation.images == [b"image 0", b"image 1"]


def test_download_lora_asks_for_the_latest_and_writes_it_whole(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append((request.url.path, dict(request.url.params)))
        if request.url.path == "/get_lora":
            return httpx.Response(200, json={"lora_filename": "lora_2.safetensors"})
        if request.url.path == "/sessions/3/loras/missing.safetensors":
            return httpx.Response(
                404, json={"status": "error", "message": "Requested LoRA not found"}
            )
        return httpx.Response(
            200,
            headers={"Content-Disposition": 'attachment; filename="lora_2.kohya.safetensors"'},
            content=b"weights",
        )

    with SDXLClient("http://api", transport=httpx.MockTransport(handler)) as client:
        path = client.download_lora(3, folder, format="kohya")
        named = client.download_lora(3, folder / "mine.safetensors", "lora_2.safetensors")
        with pytest.raises(SDXLError, match="not found"):
            client.download_lora(3, folder / "gone.safetensors", "missing.safetensors")
    assert path == folder / "lora_2.kohya.safetensors"
    assert path.read_bytes() == named.read_bytes() == b"weights"
    assert asked[:2] == [
        ("/get_lora", {}),
        ("/sessions/3/loras/lora_2.safetensors", {"format": "kohya"}),
    ]
    assert sorted(p.name for p in folder.iterdir()) == [
        "lora_2.kohya.safetensors",
        "mine.safetensors",
    ]


def test_the_async_upload_streams_the_same_body(tmp_path):
    (tmp_path / "a.png").write_bytes(b"A" * 100_000)
    bodies = []

    async def handler(request: httpx.Request) -> httpx.Response:
        bodies.append((await request.aread(), int(request.headers["Content-Length"])))
        return httpx.Response(200, json={"status": "success", "images": []})

    progress = []

    async def upload():
        async with AsyncSDXLClient("http://api", transport=httpx.MockTransport(handler)) as client:
            return await client.upload(1, tmp_path, on_progress=lambda s, t: progress.append(s))

    assert asyncio.run(upload())["status"] == "success"
    [(body, length)] = bodies
    assert len(body) == length == progress[-1]
