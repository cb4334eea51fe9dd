"""Uploads: a kohya folder becomes images with their captions and masks, in one streamed
multipart body whose progress reaches its total; a zip goes as it is."""

import email.parser
import email.policy
import io
import zipfile

import httpx
import pytest
from sdxl_client import SDXLClient


def _form(request: httpx.Request, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, content) of each part, in order."""
    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    return [
        (
            part.get_param("name", header="content-disposition"),
            part.get_filename(),
            part.get_payload(decode=True),
        )
        for part in message.iter_parts()
    ]


def _recording_client(received: dict) -> SDXLClient:
    def handler(request: httpx.Request) -> httpx.Response:
        body = b"".join(request.stream)
        received["length"] = int(request.headers["Content-Length"])
        received["body"] = body
        received["parts"] = _form(request, body)
        return httpx.Response(200, json={"status": "success", "images": []})

    return SDXLClient("http://api", transport=httpx.MockTransport(handler))


def test_a_folder_sends_images_with_captions_and_masks_streamed(tmp_path):
    (tmp_path / "a.png").write_bytes(b"A" * 200_000)
    (tmp_path / "a.txt").write_text("ohwx, a red apple\n")
    (tmp_path / "a_mask.png").write_bytes(b"M")
    (tmp_path / "b.jpg").write_bytes(b"B")
    (tmp_path / "b_mask.png").write_bytes(b"N")
    (tmp_path / ".hidden.png").write_bytes(b"H")
    (tmp_path / "notes.md").write_text("not an image")
    progress: list[tuple[int, int]] = []
    received: dict = {}
    with _recording_client(received) as client:
        client.upload(3, tmp_path, caption="ohwx", on_progress=lambda s, t: progress.append((s, t)))
    assert received["parts"] == [
        ("image", "a.png", b"A" * 200_000),
        ("caption", None, b"ohwx, a red apple"),
        ("mask", "a_mask.png", b"M"),
        ("image", "b.jpg", b"B"),
        ("caption", None, b"ohwx"),
        ("mask", "b_mask.png", b"N"),
    ]
    total = len(received["body"])
    assert received["length"] == total
    assert len(progress) > 4  # the 200 kB image went in several chunks
    assert progress[-1] == (total, total)
    assert [sent for sent, _ in progress] == sorted(sent for sent, _ in progress)


def test_some_images_with_masks_go_as_a_kohya_zip(tmp_path):
    (tmp_path / "a.png").write_bytes(b"A")
    (tmp_path / "a_mask.png").write_bytes(b"M")
    (tmp_path / "b.png").write_bytes(b"B")
    (tmp_path / "b.txt").write_text("a pear")
    received: dict = {}
    with _recording_client(received) as client:
        client.upload(3, tmp_path)
    [(name, _, content)] = received["parts"]
    assert name == "archive"
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        files = {info.filename: archive.read(info) for info in archive.infolist()}
    assert files == {
        "a.png": b"A",
        "a.txt": b"",
        "a_mask.png": b"M",
        "b.png": b"B",
        "b.txt": b"a pear",
    }


def test_a_zip_goes_as_the_archive(tmp_path):
    dataset = tmp_path / "dataset.zip"
    with zipfile.ZipFile(dataset, "w") as archive:
        archive.writestr("photos/a.png", b"A")
    received: dict = {}
    with _recording_client(received) as client:
        client.upload(3, dataset)
        with pytest.raises(ValueError, match="zip carries its captions"):
            client.upload(3, dataset, caption="ohwx")
    assert received["parts"] == [("archive", "dataset.zip", dataset.read_bytes())]


def test_files_given_one_by_one_and_a_missing_one(tmp_path):
    (tmp_path / "x.webp").write_bytes(b"X")
    received: dict = {}
    with _recording_client(received) as client:
        client.upload(3, [tmp_path / "x.webp"], caption="ohwx")
        with pytest.raises(FileNotFoundError):
            client.upload(3, [tmp_path / "gone.png"])
    assert received["parts"] == [("image", "x.webp", b"X"), ("caption", None, b"ohwx")]
