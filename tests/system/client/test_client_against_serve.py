"""The client against `manage.py serve` on the tiny model: a session, a kohya folder
uploaded, a few steps trained and waited for (by the event stream, or by polling where the
server has none), a generation with the LoRA, the LoRA file downloaded."""

import hashlib

import pytest
from PIL import Image
from sdxl_client import LoraRef, SDXLClient, SDXLError

# The client's test: the server's flow on PostgreSQL + Redis is test_e2e's and the event
# streams' (tests/system/sdxl_service/test_event_streams.py).
pytestmark = [pytest.mark.e2e, pytest.mark.one_pass]


def _kohya_folder(folder):
    folder.mkdir()
    Image.new("RGB", (72, 64), "red").save(folder / "apple.png")
    (folder / "apple.txt").write_text("ohwx, a red square\n")
    Image.new("L", (72, 64), 255).save(folder / "apple_mask.png")
    Image.new("RGB", (64, 64), "blue").save(folder / "pear.jpg")
    return folder


def test_upload_train_generate_download(service_processes, tmp_path):
    _serve, url = service_processes.serve()
    progress: list[tuple[int, int]] = []
    events = []
    with SDXLClient(url, poll_interval=0.3) as client:
        session_id = client.create_session()
        uploaded = client.upload(
            session_id,
            _kohya_folder(tmp_path / "photos"),
            caption="ohwx",
            on_progress=lambda sent, total: progress.append((sent, total)),
        )
        assert len(uploaded["images"]) == 2
        images = {image["caption"]: image for image in client.session(session_id)["images"]}
        assert set(images) == {"ohwx, a red square", "ohwx"}
        assert images["ohwx, a red square"]["mask_url"] and not images["ohwx"]["mask_url"]
        assert progress[-1][0] == progress[-1][1]

        with pytest.raises(SDXLError) as refused:
            client.train(session_id, steps=0)
        assert refused.value.status == 400 and refused.value.field == "steps"

        started = client.train(session_id, steps=3, resolution=64, sample_every=3)
        final = client.wait_for_run(started["run_id"], on_event=events.append)
        assert final["status"] == "completed", final
        names = [event.name for event in events]
        assert names[-1] == "completed" and "progress" in names and "sample" in names
        assert [event.id for event in events] == sorted(event.id for event in events)

        generation = client.generate(
            "ohwx, a red square",
            loras=[LoraRef(session_id, scale=0.8)],
            width=64,
            height=64,
            steps=5,
            num_images=2,
        )
        assert generation.status == "completed", generation.message
        assert generation.raw["loras"][0]["filename"] == final["lora"]
        saved = generation.save(tmp_path / "out")
        assert [Image.open(path).size for path in saved] == [(64, 64), (64, 64)]

        path = client.download_lora(session_id, tmp_path)
        stored = {lora["lora_filename"]: lora for lora in client.session(session_id)["loras"]}
        assert path.name == final["lora"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == stored[path.name]["sha256"]
        kohya = client.download_lora(session_id, tmp_path, format="kohya")
        assert kohya.name.endswith(".kohya.safetensors") and kohya.stat().st_size > 0
