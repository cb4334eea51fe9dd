import io
import json

import pytest

from sessions_app import storage
from sessions_app.models import Session, TrainingImage
from tests.helpers import b64, image_bytes, png_bomb

pytestmark = pytest.mark.django_db


def assert_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"status", "message"}
    assert body["status"] == "error"
    assert fragment in body["message"]


def test_create_session_answers_integer_id(api):
    response = api.get("/create_session")
    assert response.status_code == 200
    body = response.json()
    assert body == {"session_id": Session.objects.get().pk}
    assert isinstance(body["session_id"], int)


def test_paths_with_trailing_slash_answer_without_redirect(api):
    response = api.get("/create_session/")
    assert response.status_code == 200
    session_id = response.json()["session_id"]
    response = api.post(
        "/post_session_image/",
        {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "x"},
        format="json",
    )
    assert response.status_code == 200


@pytest.mark.parametrize("as_string", [True, False])
def test_post_session_image_accepts_string_or_int_session_id(api, as_string):
    session_id = api.get("/create_session").json()["session_id"]
    response = api.post(
        "/post_session_image",
        {
            "session_id": str(session_id) if as_string else session_id,
            "image_base64": b64(image_bytes("JPEG")),
            "prompt": "a red apple on a wooden table",
        },
        format="json",
    )
    assert response.status_code == 200
    assert response.json() == {"status": "success"}
    assert (storage.session_dir(session_id) / "0" / "0.jpg").exists()


def test_post_session_image_accepts_data_url_prefix(api):
    session_id = api.get("/create_session").json()["session_id"]
    response = api.post(
        "/post_session_image",
        {
            "session_id": session_id,
            "image_base64": "data:image/png;base64," + b64(image_bytes()),
            "prompt": "x",
        },
        format="json",
    )
    assert response.status_code == 200


def test_post_session_image_errors_are_json_and_name_the_field(api):
    session_id = api.get("/create_session").json()["session_id"]
    good = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "x"}
    assert_error(
        api.post("/post_session_image", {**good, "image_base64": "@@@"}, format="json"),
        400,
        "image_base64",
    )
    assert_error(
        api.post("/post_session_image", {**good, "session_id": "abc"}, format="json"),
        400,
        "session_id",
    )
    assert_error(
        api.post("/post_session_image", {**good, "prompt": None}, format="json"), 400, "prompt"
    )
    assert_error(
        api.post("/post_session_image", {**good, "session_id": 999}, format="json"),
        404,
        "session 999 not found",
    )
    assert_error(
        api.post(
            "/post_session_image", {**good, "image_base64": b64(b"plain text")}, format="json"
        ),
        400,
        "image",
    )
    assert list(storage.session_dir(session_id).iterdir()) == []


def test_malformed_json_unknown_path_and_wrong_method_answer_json(api):
    assert_error(
        api.generic("POST", "/post_session_image", "{not json", content_type="application/json"),
        400,
        "JSON",
    )
    assert_error(api.get("/no_such_endpoint"), 404, "no such endpoint")
    assert_error(api.post("/create_session", {}, format="json"), 405, "POST")


def test_list_sessions_shape(api):
    first = api.get("/create_session").json()["session_id"]
    api.get("/create_session")
    api.post(
        "/post_session_image",
        {"session_id": first, "image_base64": b64(image_bytes()), "prompt": "x"},
        format="json",
    )
    body = api.get("/list_sessions").json()
    assert body["sessions"][0] == {
        "session_id": str(first),
        "latest_lora": None,
        "image_groups": 1,
        "training": {"status": "none", "progress": 0},
    }
    assert len(body["sessions"]) == 2


def test_list_sessions_pages_with_limit_and_offset_and_answers_as_before_without(api):
    ids = [api.get("/create_session").json()["session_id"] for _ in range(5)]

    whole = api.get("/list_sessions").json()
    first = api.get("/list_sessions?limit=2").json()
    middle = api.get("/list_sessions", {"limit": 2, "offset": 2}).json()
    last = api.get("/list_sessions", {"limit": 2, "offset": 4}).json()
    beyond = api.get("/list_sessions", {"offset": 9}).json()

    assert set(whole) == {"sessions"} and len(whole["sessions"]) == 5
    pages = [first, middle, last]
    assert [[item["session_id"] for item in page["sessions"]] for page in pages] == [
        [str(i) for i in ids[:2]],
        [str(i) for i in ids[2:4]],
        [str(ids[4])],
    ]
    assert [(page["count"], page["next_offset"]) for page in pages] == [(5, 2), (5, 4), (5, None)]
    assert beyond == {"sessions": [], "count": 5, "next_offset": None}
    for query, field in (("limit=0", "limit"), ("limit=x", "limit"), ("offset=-1", "offset")):
        assert_error(api.get(f"/list_sessions?{query}"), 400, field)


def test_session_detail_lists_images_loras_runs_and_generations(api, generation_worker):
    from training_app.models import LoraArtifact, TrainingRun
    from training_app.services import runs
    from training_app.services.generations.requests import GenerationRequest, generation_request

    session_id = api.get("/create_session").json()["session_id"]
    photo = image_bytes("JPEG", (80, 48))
    for caption in ("a red apple", "a green apple"):
        api.post(
            "/post_session_image",
            {"session_id": session_id, "image_base64": b64(photo), "prompt": caption},
            format="json",
        )
    run = runs.training_run_start(session_id, {"steps": 1, "resolution": 64})
    runs.training_run_execute(run.pk)
    generation = generation_request(
        GenerationRequest(prompt="x", use_lora=True, session_id=session_id)
    )

    body = api.get(f"/sessions/{session_id}").json()

    assert body["session_id"] == str(session_id)
    assert [(image["group"], image["caption"]) for image in body["images"]] == [
        (0, "a red apple"),
        (1, "a green apple"),
    ]
    image = body["images"][0]
    assert (image["format"], image["width"], image["height"]) == ("JPEG", 80, 48)
    served = api.get(image["url"])
    assert served["Content-Type"] == "image/jpeg"
    assert b"".join(served.streaming_content) == photo
    lora = LoraArtifact.objects.get(session_id=session_id)
    assert body["loras"] == [
        {
            "lora_filename": "lora_1.safetensors",
            "iteration": 1,
            "sha256": lora.sha256,
            "size": lora.size,
            "source": "trained",
            "run_id": run.pk,
            "created_at": body["loras"][0]["created_at"],
        }
    ]
    (listed_run,) = body["runs"]
    assert (listed_run["run_id"], listed_run["status"]) == (run.pk, TrainingRun.Status.COMPLETED)
    assert listed_run["parameters"]["steps"] == 1 and listed_run["message"] is None
    assert [item["generation_id"] for item in body["recent_generations"]] == [generation.pk]
    assert body["recent_generations"][0]["status_url"] == f"/generations/{generation.pk}"


def test_session_detail_and_images_of_what_does_not_exist_are_404(api):
    assert_error(api.get("/sessions/987654"), 404, "session 987654 not found")
    other = api.get("/create_session").json()["session_id"]
    mine = api.get("/create_session").json()["session_id"]
    api.post(
        "/post_session_image",
        {"session_id": other, "image_base64": b64(image_bytes()), "prompt": "x"},
        format="json",
    )
    image_id = TrainingImage.objects.get().pk
    # Another session's image is not this one's.
    assert_error(
        api.get(f"/sessions/{mine}/images/{image_id}"), 404, f"session {mine} has no image"
    )
    assert api.get(f"/sessions/{other}/images/{image_id}").status_code == 200


def _file(name: str, data: bytes, content_type: str = "application/octet-stream"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type=content_type)


def test_multipart_images_with_captions_and_a_zip_are_stored_in_order(api):
    from tests.sessions_app.test_uploads import zip_of

    session_id = api.get("/create_session").json()["session_id"]
    photo = image_bytes("JPEG", (80, 48), "blue")
    archive = zip_of({"x/1.png": image_bytes(), "x/1.txt": b"ohwx from the zip"})

    response = api.post(
        f"/sessions/{session_id}/images",
        {
            "image": [_file("a.jpg", photo), _file("b.png", image_bytes())],
            "caption": ["ohwx, a photo", ""],
            "archive": _file("set.zip", archive),
        },
        format="multipart",
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "success"
    assert [(item["group"], item["caption"], item["format"]) for item in body["images"]] == [
        (0, "ohwx, a photo", "JPEG"),
        (1, "", "PNG"),
        (2, "ohwx from the zip", "PNG"),
    ]
    folder = storage.session_dir(session_id)
    assert (folder / "0" / "0.jpg").read_bytes() == photo
    assert (folder / "0" / "0.txt").read_text() == "ohwx, a photo"
    assert (folder / "2" / "0.txt").read_text() == "ohwx from the zip"
    assert b"".join(api.get(body["images"][0]["url"]).streaming_content) == photo
    listed = api.get("/list_sessions").json()["sessions"][0]
    assert listed["image_groups"] == 3


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({}, 400, "send at least one image"),
        ({"caption": ["only a caption"]}, 400, "one caption per image"),
        ({"image": "good,bad"}, 400, "bad.png does not hold a PNG, JPEG, WebP or BMP image"),
        ({"image": "good", "caption": ["a", "b"]}, 400, "one caption per image"),
        ({"archive": "../evil.png"}, 400, "set.zip holds an unsafe path"),
    ],
)
def test_multipart_uploads_that_fail_store_nothing(api, fields, status, message):
    from tests.sessions_app.test_uploads import zip_of

    session_id = api.get("/create_session").json()["session_id"]
    files = {"good": _file("good.png", image_bytes()), "bad": _file("bad.png", b"not an image")}
    form = {}
    if "image" in fields:
        form["image"] = [files[name] for name in fields["image"].split(",")]
    if "caption" in fields:
        form["caption"] = fields["caption"]
    if "archive" in fields:
        form["archive"] = _file("set.zip", zip_of({fields["archive"]: image_bytes()}))

    response = api.post(f"/sessions/{session_id}/images", form, format="multipart")

    assert_error(response, status, message)
    assert not TrainingImage.objects.exists()
    assert list(storage.session_dir(session_id).iterdir()) == []


def test_multipart_uploads_over_the_upload_limit_are_413(api, settings):
    settings.SDXL_MAX_UPLOAD_MB = 1
    session_id = api.get("/create_session").json()["session_id"]
    big = _file("big.png", b"\0" * (1024 * 1024 + 1))

    response = api.post(f"/sessions/{session_id}/images", {"image": [big]}, format="multipart")

    assert_error(response, 413, "larger than the limit of 1 MB (SDXL_MAX_UPLOAD_MB)")
    assert not TrainingImage.objects.exists()


def test_multipart_images_for_a_missing_session_are_404(api):
    response = api.post(
        "/sessions/987654/images", {"image": [_file("a.png", image_bytes())]}, format="multipart"
    )
    assert_error(response, 404, "session 987654 not found")


def test_delete_session(api, django_capture_on_commit_callbacks):
    session_id = api.get("/create_session").json()["session_id"]
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/delete_session", {"session_id": str(session_id)}, format="json")
    assert response.json() == {"status": "deleted", "session_id": str(session_id)}
    assert not storage.session_dir(session_id).exists()
    assert_error(
        api.post("/delete_session", {"session_id": session_id}, format="json"), 404, "not found"
    )


def _disk_and_rows(data_dir) -> tuple:
    from sessions_app.models import ImageGroup, TrainingImage

    files = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*"))
    return files, ImageGroup.objects.count(), TrainingImage.objects.count()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"image_base64": "not base64 at all!"}, "image_base64: is not valid base64"),
        ({"image_base64": "iVBORw0KGgo"}, "image_base64: is not valid base64"),  # bad padding
        ({"image_base64": "data:image/png;base64,@@@@"}, "image_base64: is not valid base64"),
        ({"image_base64": ""}, "image_base64"),
        ({"image_base64": 12345}, "image_base64"),
        ({"image_base64": b64(b"just some text, not an image")}, "PNG, JPEG, WebP or BMP"),
        ({"image_base64": b64(image_bytes("GIF"))}, "PNG, JPEG, WebP or BMP"),
        ({"image_base64": b64(image_bytes("TIFF"))}, "PNG, JPEG, WebP or BMP"),
        ({"image_base64": b64(image_bytes("PNG")[:60])}, "image could not be decoded"),
        ({"image_base64": b64(png_bomb(30000, 30000))}, "more pixels than the limit"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt: Ensure this field has no more than 2000 characters"),
        ({"prompt": "bad \ud800 text"}, "prompt: Surrogate characters are not allowed"),
        ({"prompt": "nul \x00 char"}, "prompt"),
        ({"prompt": ["a", "list"]}, "prompt"),
        ({"session_id": True}, "session_id"),
        ({"session_id": "²"}, "session_id"),
        ({"session_id": 0}, "session_id"),
    ],
)
def test_bad_image_uploads_are_400_and_change_nothing(api, data_dir, change, fragment):
    session_id = api.get("/create_session").json()["session_id"]
    before = _disk_and_rows(data_dir)
    good = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "x"}
    # Encoded here: JSON's "\ud800" escape is valid JSON that no UTF-8 encoder produces.
    body = json.dumps({**good, **change})
    assert_error(
        api.generic("POST", "/post_session_image", body, "application/json"), 400, fragment
    )
    assert _disk_and_rows(data_dir) == before
    assert Session.objects.get(pk=session_id).next_group_number == 0


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_caption_is_stored_empty_for_a_trigger_to_fill(api, data_dir, prompt):
    session_id = api.get("/create_session").json()["session_id"]
    body = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": prompt}
    assert api.post("/post_session_image", body, format="json").status_code == 200
    assert (data_dir / f"session_data/session_{session_id}/0/0.txt").read_text() == ""
    assert TrainingImage.objects.get().caption == ""


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "BMP"])
def test_each_accepted_format_is_stored_as_sent(api, image_format):
    session_id = api.get("/create_session").json()["session_id"]
    data = image_bytes(image_format)
    response = api.post(
        "/post_session_image",
        {"session_id": session_id, "image_base64": b64(data), "prompt": "p" * 2000},
        format="json",
    )
    assert response.status_code == 200, response.content
    (stored,) = [p for p in (storage.session_dir(session_id) / "0").iterdir() if p.suffix != ".txt"]
    assert stored.read_bytes() == data


# PATCH and DELETE /sessions/<id>/images/<image_id>: fix a caption, remove an image.


def _three_images(api) -> tuple[int, list[dict]]:
    session_id = api.get("/create_session").json()["session_id"]
    response = api.post(
        f"/sessions/{session_id}/images",
        {
            "image": [
                _file("a.png", image_bytes(color="red")),
                _file("b.jpg", image_bytes("JPEG", color="blue")),
                _file("c.png", image_bytes(color="green")),
            ],
            "caption": ["ohwx, red", "ohwx, blue", "ohwx, green"],
        },
        format="multipart",
    )
    assert response.status_code == 200, response.content
    return session_id, response.json()["images"]


def _on_disk(session_id: int) -> dict[str, bytes]:
    folder = storage.session_dir(session_id)
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _rows(session_id: int) -> list[tuple]:
    return list(
        TrainingImage.objects.filter(group__session_id=session_id)
        .order_by("pk")
        .values_list("pk", "group__number", "file", "caption", "sha256")
    )


def _verify_is_clean() -> None:
    from datadir_app.verify import verify

    report = verify()
    assert (report.changes, report.problems) == ([], [])


def test_patch_rewrites_the_caption_file_and_row_and_nothing_else(api, monkeypatch):
    from sdxl_engine import files

    session_id, images = _three_images(api)
    before = _on_disk(session_id)
    replaced = []
    real_replace = files.replace_with_retry
    monkeypatch.setattr(
        files,
        "replace_with_retry",
        lambda s, t: (replaced.append((s.name, t.name)), real_replace(s, t)),
    )

    response = api.patch(
        f"/sessions/{session_id}/images/{images[1]['image_id']}",
        {"caption": "ohwx, a blue square\n\n"},
        format="json",
    )

    assert response.status_code == 200, response.content
    assert response.json() == {**images[1], "caption": "ohwx, a blue square"}
    assert _on_disk(session_id) == {**before, "1/0.txt": b"ohwx, a blue square"}
    assert replaced == [("0.txt.tmp", "0.txt")]  # written beside, fsynced, renamed into place
    assert TrainingImage.objects.get(pk=images[1]["image_id"]).caption == "ohwx, a blue square"
    detail = api.get(f"/sessions/{session_id}").json()["images"]
    assert [image["caption"] for image in detail] == [
        "ohwx, red",
        "ohwx, a blue square",
        "ohwx, green",
    ]
    _verify_is_clean()


def test_a_patch_that_fails_writing_leaves_the_old_caption_file_and_row(api, monkeypatch):
    from sdxl_engine import files

    session_id, images = _three_images(api)
    before = (_on_disk(session_id), _rows(session_id))

    def disk_full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "fsync_file", disk_full)
    response = api.patch(
        f"/sessions/{session_id}/images/{images[0]['image_id']}", {"caption": "new"}, format="json"
    )

    assert_error(response, 507, "no space left")
    assert (_on_disk(session_id), _rows(session_id)) == before  # no half file, no .tmp


def test_delete_removes_one_image_and_renumbers_nothing(api, django_capture_on_commit_callbacks):
    session_id, images = _three_images(api)
    before = _on_disk(session_id)
    kept = [row for row in _rows(session_id) if row[0] != images[1]["image_id"]]

    with django_capture_on_commit_callbacks(execute=True):
        response = api.delete(f"/sessions/{session_id}/images/{images[1]['image_id']}")

    assert response.status_code == 200, response.content
    assert response.json() == {
        "status": "deleted",
        "session_id": str(session_id),
        "image_id": images[1]["image_id"],
    }
    assert _rows(session_id) == kept  # same ids, groups, paths, captions
    assert _on_disk(session_id) == {k: v for k, v in before.items() if not k.startswith("1/")}
    assert not (storage.session_dir(session_id) / "1").exists()  # its emptied group goes
    assert [
        p.name for p in storage.session_dir(session_id).iterdir() if p.name.startswith(".")
    ] == []
    assert_error(api.get(images[1]["url"]), 404, f"has no image {images[1]['image_id']}")
    assert api.get(images[2]["url"]).status_code == 200
    assert_error(api.put(images[2]["url"], {"caption": "x"}, format="json"), 405, "")
    listed = api.get("/list_sessions").json()["sessions"][0]
    assert listed["image_groups"] == 2
    _verify_is_clean()
    # The next upload takes a new group number: numbers are never reused.
    body = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "again"}
    assert api.post("/post_session_image", body, format="json").status_code == 200
    assert (storage.session_dir(session_id) / "3" / "0.txt").read_text() == "again"
    assert_error(api.delete(f"/sessions/{session_id}/images/{images[1]['image_id']}"), 404, "")


def test_delete_keeps_a_group_folder_that_holds_other_files(
    api, django_capture_on_commit_callbacks
):
    session_id, images = _three_images(api)
    notes = storage.session_dir(session_id) / "0" / "notes.md"
    notes.write_text("an operator's file")

    with django_capture_on_commit_callbacks(execute=True):
        response = api.delete(f"/sessions/{session_id}/images/{images[0]['image_id']}")

    assert response.status_code == 200, response.content
    assert sorted(p.name for p in notes.parent.iterdir()) == ["notes.md"]
    _verify_is_clean()


@pytest.mark.parametrize("status", ["queued", "running"])
@pytest.mark.parametrize(
    ("method", "body"), [("patch", {"caption": "new caption"}), ("delete", None)]
)
def test_patch_and_delete_are_409_naming_the_run_while_it_trains(api, status, method, body):
    from training_app.models import TrainingRun

    session_id, images = _three_images(api)
    run = TrainingRun.objects.create(session_id=session_id, status=status, parameters={})
    before = (_on_disk(session_id), _rows(session_id))

    url = f"/sessions/{session_id}/images/{images[0]['image_id']}"
    response = getattr(api, method)(url, body, format="json")

    assert_error(response, 409, f"session {session_id} is training (run {run.pk})")
    assert (_on_disk(session_id), _rows(session_id)) == before
    run.status = "completed"
    run.save()
    assert getattr(api, method)(url, body, format="json").status_code == 200


def test_patch_and_delete_of_unknown_images_are_404(api):
    session_id, images = _three_images(api)
    other_session, others = _three_images(api)
    before = (_on_disk(session_id), _rows(session_id), _rows(other_session))
    for url, message in [
        (f"/sessions/{session_id}/images/987654", f"session {session_id} has no image 987654"),
        (
            f"/sessions/987654/images/{images[0]['image_id']}",
            f"session 987654 has no image {images[0]['image_id']}",
        ),
        (  # another session's image
            f"/sessions/{session_id}/images/{others[0]['image_id']}",
            f"session {session_id} has no image {others[0]['image_id']}",
        ),
    ]:
        assert_error(api.patch(url, {"caption": "x"}, format="json"), 404, message)
        assert_error(api.delete(url), 404, message)
    assert (_on_disk(session_id), _rows(session_id), _rows(other_session)) == before


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "caption: This field is required"),
        ({"caption": None}, "caption"),
        ({"caption": 7}, "caption: must be a string"),
        ({"caption": "x" * 2001}, "caption: Ensure this field has no more than 2000"),
    ],
)
def test_a_bad_patch_is_400_and_changes_nothing(api, body, fragment):
    session_id, images = _three_images(api)
    before = (_on_disk(session_id), _rows(session_id))
    url = f"/sessions/{session_id}/images/{images[0]['image_id']}"
    assert_error(api.patch(url, body, format="json"), 400, fragment)
    assert (_on_disk(session_id), _rows(session_id)) == before


def test_uploaded_captions_are_trimmed_whichever_way_they_come(api):
    from tests.sessions_app.test_uploads import zip_of

    session_id = api.get("/create_session").json()["session_id"]
    body = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": " json\n\n"}
    assert api.post("/post_session_image", body, format="json").status_code == 200
    response = api.post(
        f"/sessions/{session_id}/images",
        {
            "image": [_file("a.png", image_bytes())],
            "caption": ["  multipart\r\n"],
            "archive": _file("set.zip", zip_of({"z.png": image_bytes(), "z.txt": b"zip \n\n"})),
        },
        format="multipart",
    )
    assert response.status_code == 200, response.content

    folder = storage.session_dir(session_id)
    stored = [(folder / str(n) / "0.txt").read_text() for n in range(3)]
    assert stored == ["json", "multipart", "zip"]
    assert [row[3] for row in _rows(session_id)] == stored
    assert [image["caption"] for image in response.json()["images"]] == stored[1:]


def test_a_patched_caption_is_trimmed(api):
    session_id, images = _three_images(api)
    url = f"/sessions/{session_id}/images/{images[0]['image_id']}"
    assert api.patch(url, {"caption": "\tpatched \n"}, format="json").json()["caption"] == "patched"
    assert (storage.session_dir(session_id) / "0" / "0.txt").read_text() == "patched"
    assert _rows(session_id)[0][3] == "patched"


# POST /sessions/<id>/captions, and a caption "auto" at upload: the captioning model (here the
# tiny random captioner of the tiny preset) writes captions.


def _model_caption(data: bytes, prefix: str = "") -> str:
    """What the captioning model says of the encoded image `data` (greedy: always the same)."""
    from sessions_app.captioner import captions_generate

    (caption,) = captions_generate([data], prefix)
    return caption


def test_captions_fill_the_empty_captions_and_overwrite_rewrites_them_all(api):
    session_id = api.get("/create_session").json()["session_id"]
    photos = [
        image_bytes(color="red"),
        image_bytes("JPEG", color="blue"),
        image_bytes(color="green"),
    ]
    form = {"image": [_file(f"{n}.png", data) for n, data in enumerate(photos)]}
    form["caption"] = ["ohwx, red", "", "  "]
    assert api.post(f"/sessions/{session_id}/images", form, format="multipart").status_code == 200
    ids = [row[0] for row in _rows(session_id)]
    url = f"/sessions/{session_id}/captions"

    response = api.post(url, {"prefix": "a photo of TOK,"}, format="json")

    assert response.status_code == 200, response.content
    generated = [_model_caption(data, "a photo of TOK,") for data in photos]
    assert all(caption.startswith("a photo of TOK, ") for caption in generated)
    assert response.json() == {
        "captioned": 2,
        "skipped": 1,
        "images": [
            {"image_id": ids[0], "caption": "ohwx, red", "written": False},
            {"image_id": ids[1], "caption": generated[1], "written": True},
            {"image_id": ids[2], "caption": generated[2], "written": True},
        ],
    }
    expected = ["ohwx, red", generated[1], generated[2]]
    assert [row[3] for row in _rows(session_id)] == expected
    on_disk = _on_disk(session_id)
    assert [on_disk[f"{n}/0.txt"].decode() for n in range(3)] == expected
    _verify_is_clean()
    # Nothing is left empty: a second call writes nothing.
    again = api.post(url, {}, format="json").json()
    assert (again["captioned"], again["skipped"]) == (0, 3)
    assert _on_disk(session_id) == on_disk

    response = api.post(url, {"overwrite": True}, format="json")

    assert response.status_code == 200, response.content
    rewritten = [_model_caption(data) for data in photos]
    assert [(item["caption"], item["written"]) for item in response.json()["images"]] == [
        (caption, True) for caption in rewritten
    ]
    assert [row[3] for row in _rows(session_id)] == rewritten
    on_disk = _on_disk(session_id)
    assert [on_disk[f"{n}/0.txt"].decode() for n in range(3)] == rewritten
    _verify_is_clean()


@pytest.mark.parametrize("cause", ["training", "no model", "missing model"])
def test_captions_are_409_while_training_or_without_a_model_and_change_nothing(
    api, settings, tmp_path, cause
):
    from training_app.models import TrainingRun

    session_id, _ = _three_images(api)
    TrainingImage.objects.filter(group__session_id=session_id).update(caption="")
    if cause == "training":
        run = TrainingRun.objects.create(session_id=session_id, status="queued", parameters={})
        message = f"session {session_id} is training (run {run.pk})"
    elif cause == "no model":
        settings.SDXL_MODEL_PRESET = "hub"  # real weights, and no captioner named
        message = "no captioning model: set SDXL_CAPTION_MODEL"
    else:
        settings.SDXL_CAPTION_MODEL = str(tmp_path / "blip")
        message = f"the captioning model's folder {tmp_path / 'blip'} does not exist"
    before = (_on_disk(session_id), _rows(session_id))

    response = api.post(f"/sessions/{session_id}/captions", {}, format="json")

    assert_error(response, 409, message)
    assert (_on_disk(session_id), _rows(session_id)) == before


def test_a_caption_auto_at_upload_is_written_by_the_model_and_a_failure_stores_nothing(
    api, settings
):
    session_id = api.get("/create_session").json()["session_id"]
    red, blue = image_bytes(color="red"), image_bytes(color="blue")
    body = {"session_id": session_id, "image_base64": b64(red), "prompt": " auto\n"}

    assert api.post("/post_session_image", body, format="json").status_code == 200
    form = {"image": [_file("a.png", blue)], "caption": ["auto"]}
    assert api.post(f"/sessions/{session_id}/images", form, format="multipart").status_code == 200

    stored = [row[3] for row in _rows(session_id)]
    assert "auto" not in stored and all(stored), stored
    captions = [_model_caption(red), _model_caption(blue)]
    assert stored == captions
    on_disk = _on_disk(session_id)
    assert [on_disk["0/0.txt"].decode(), on_disk["1/0.txt"].decode()] == captions
    before = (on_disk, _rows(session_id))

    settings.SDXL_MODEL_PRESET = "hub"  # no captioning model now
    response = api.post("/post_session_image", body, format="json")

    assert_error(response, 409, "SDXL_CAPTION_MODEL")
    assert (_on_disk(session_id), _rows(session_id)) == before


# Masks: given at upload (multipart `mask`, `mask_base64`, a zip's <name>_mask.png), and
# set, read and removed at /sessions/<id>/images/<image_id>/mask.


def _mask(size: tuple[int, int] = (48, 40), image_format: str = "PNG") -> bytes:
    """White on the left half (the subject), black on the right."""
    from PIL import Image

    mask = Image.new("RGB", size, "black")
    mask.paste((255, 255, 255), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    mask.save(buffer, format=image_format)
    return buffer.getvalue()


def _stored_mask(path) -> tuple:
    from PIL import Image

    with Image.open(path) as mask:
        return mask.format, mask.mode, mask.size, mask.getpixel((1, 1)), mask.getpixel((-2, 1))


def test_masks_sent_with_images_are_stored_beside_each_and_served(api):
    from tests.sessions_app.test_uploads import zip_of

    session_id = api.get("/create_session").json()["session_id"]
    archive = zip_of(
        {
            "x/1.png": image_bytes(),
            "x/1.txt": b"ohwx",
            "x/1_mask.png": _mask(),
            "x/2.png": image_bytes(),
        }
    )
    response = api.post(
        f"/sessions/{session_id}/images",
        {
            "image": [_file("a.jpg", image_bytes("JPEG", (80, 48))), _file("b.png", image_bytes())],
            "mask": [_file("a_mask.jpg", _mask((40, 24), "JPEG")), _file("b_mask.png", _mask())],
            "archive": _file("set.zip", archive),
        },
        format="multipart",
    )

    assert response.status_code == 200, response.content
    images = response.json()["images"]
    folder = storage.session_dir(session_id)
    assert _stored_mask(folder / "0" / "0_mask.png") == ("PNG", "L", (80, 48), 255, 0)
    assert _stored_mask(folder / "1" / "0_mask.png") == ("PNG", "L", (48, 40), 255, 0)
    assert _stored_mask(folder / "2" / "0_mask.png") == ("PNG", "L", (48, 40), 255, 0)
    assert not (folder / "3" / "0_mask.png").exists()
    assert [image["mask_url"] for image in images] == [
        f"/sessions/{session_id}/images/{image['image_id']}/mask" for image in images[:3]
    ] + [None]
    assert [image["mask_url"] for image in api.get(f"/sessions/{session_id}").json()["images"]] == [
        image["mask_url"] for image in images
    ]
    served = api.get(images[0]["mask_url"])
    assert served.status_code == 200 and served["Content-Type"] == "image/png"
    assert served.content == (folder / "0" / "0_mask.png").read_bytes()
    assert served["ETag"] == f'"{storage.sha256_bytes(served.content)}"'
    again = api.get(images[0]["mask_url"], HTTP_IF_NONE_MATCH=served["ETag"])
    assert again.status_code == 304 and again.content == b""
    _verify_is_clean()


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"image": 2, "mask": [_mask()]}, "mask: send one mask per image, in the images' order"),
        ({"image": 1, "mask": [_mask(), _mask()]}, "(1 images, 2 masks), or none"),
        ({"image": 1, "mask": [_mask((40, 48))]}, "mask m0.png: the mask is 40x48 and its image"),
        ({"image": 1, "mask": [image_bytes(color="black")]}, "mask m0.png: the mask is entirely"),
        ({"image": 1, "mask": [b"no image"]}, "mask m0.png does not hold a PNG"),
        ({"zip": {"a.png": image_bytes(), "b_mask.png": _mask()}}, "masks without their image"),
        (
            {"zip": {"a.png": image_bytes(), "a_mask.png": _mask((40, 48))}},
            "set.zip: a_mask.png: the mask is 40x48 and its image 48x40",
        ),
    ],
)
def test_uploads_with_a_mask_that_cannot_be_used_store_nothing(api, form, message):
    from tests.sessions_app.test_uploads import zip_of

    session_id = api.get("/create_session").json()["session_id"]
    body = {}
    if "image" in form:
        body["image"] = [_file(f"i{n}.png", image_bytes()) for n in range(form["image"])]
        body["mask"] = [_file(f"m{n}.png", data) for n, data in enumerate(form["mask"])]
    if "zip" in form:
        body["archive"] = _file("set.zip", zip_of(form["zip"]))

    response = api.post(f"/sessions/{session_id}/images", body, format="multipart")

    assert_error(response, 400, message)
    assert not TrainingImage.objects.exists()
    assert list(storage.session_dir(session_id).iterdir()) == []


def test_post_session_image_takes_a_mask_base64(api, data_dir):
    session_id = api.get("/create_session").json()["session_id"]
    good = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "x"}
    before = _disk_and_rows(data_dir)
    for mask, fragment in [
        ("@@@", "mask_base64: is not valid base64"),
        (b64(b"text"), "mask_base64 does not hold a PNG"),
        (b64(_mask((40, 48))), "mask_base64: the mask is 40x48 and its image 48x40"),
    ]:
        response = api.post("/post_session_image", {**good, "mask_base64": mask}, format="json")
        assert_error(response, 400, fragment)
        assert _disk_and_rows(data_dir) == before

    response = api.post("/post_session_image", {**good, "mask_base64": b64(_mask())}, format="json")

    assert response.status_code == 200, response.content
    mask_path = storage.session_dir(session_id) / "0" / "0_mask.png"
    assert _stored_mask(mask_path) == ("PNG", "L", (48, 40), 255, 0)
    assert TrainingImage.objects.get().mask_size == mask_path.stat().st_size


def test_a_mask_is_set_replaced_and_removed_through_its_url(
    api, django_capture_on_commit_callbacks
):
    session_id, images = _three_images(api)
    url = f"/sessions/{session_id}/images/{images[1]['image_id']}/mask"
    path = storage.session_dir(session_id) / "1" / "0_mask.png"
    assert_error(api.get(url), 404, f"image {images[1]['image_id']} has no mask")

    response = api.put(url, {"mask_base64": b64(_mask((96, 80)))}, format="json")

    assert response.status_code == 200, response.content
    assert response.json() == {**images[1], "mask_url": url}
    assert _stored_mask(path) == ("PNG", "L", (48, 40), 255, 0)
    first_etag = api.get(url)["ETag"]
    replaced = api.put(url, {"mask_base64": b64(image_bytes(color="white"))}, format="json")
    assert replaced.status_code == 200
    assert _stored_mask(path) == ("PNG", "L", (48, 40), 255, 255)
    served = api.get(url, HTTP_IF_NONE_MATCH=first_etag)
    assert served.status_code == 200 and served["ETag"] != first_etag
    assert TrainingImage.objects.get(pk=images[1]["image_id"]).mask_size == len(served.content)
    _verify_is_clean()

    with django_capture_on_commit_callbacks(execute=True):
        removed = api.delete(url)

    assert removed.status_code == 200
    assert removed.json() == {**images[1], "mask_url": None}
    assert not path.exists()
    assert TrainingImage.objects.get(pk=images[1]["image_id"]).mask_file == ""
    assert_error(api.get(url), 404, "has no mask")
    assert_error(api.delete(url), 404, "has no mask")
    _verify_is_clean()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "mask_base64: This field is required"),
        ({"mask_base64": "@@"}, "mask_base64: is not valid base64"),
        ({"mask_base64": b64(_mask((40, 48)))}, "mask_base64: the mask is 40x48 and its image"),
        ({"mask_base64": b64(image_bytes(color="black"))}, "mask_base64: the mask is entirely"),
        ({"mask": b64(_mask())}, 'mask: unknown field; did you mean "mask_base64"?'),
    ],
)
def test_a_bad_mask_put_is_400_and_changes_nothing(api, body, fragment):
    session_id, images = _three_images(api)
    before = (_on_disk(session_id), _rows(session_id))
    url = f"/sessions/{session_id}/images/{images[0]['image_id']}/mask"
    assert_error(api.put(url, body, format="json"), 400, fragment)
    assert (_on_disk(session_id), _rows(session_id)) == before
    assert TrainingImage.objects.filter(mask_file="").count() == 3


@pytest.mark.parametrize("method", ["put", "delete"])
def test_a_mask_cannot_change_while_the_session_trains(api, method):
    from training_app.models import TrainingRun

    session_id, images = _three_images(api)
    url = f"/sessions/{session_id}/images/{images[0]['image_id']}/mask"
    assert api.put(url, {"mask_base64": b64(_mask())}, format="json").status_code == 200
    run = TrainingRun.objects.create(session_id=session_id, status="running", parameters={})
    before = (
        _on_disk(session_id),
        list(TrainingImage.objects.values_list("mask_file", "mask_size")),
    )

    response = getattr(api, method)(url, {"mask_base64": b64(image_bytes())}, format="json")

    assert_error(response, 409, f"session {session_id} is training (run {run.pk})")
    assert (
        _on_disk(session_id),
        list(TrainingImage.objects.values_list("mask_file", "mask_size")),
    ) == before


def test_deleting_an_image_removes_its_mask(api, django_capture_on_commit_callbacks):
    session_id, images = _three_images(api)
    url = f"/sessions/{session_id}/images/{images[0]['image_id']}"
    assert api.put(f"{url}/mask", {"mask_base64": b64(_mask())}, format="json").status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(url).status_code == 200
    assert not (storage.session_dir(session_id) / "0").exists()
    assert_error(api.get(f"{url}/mask"), 404, f"has no image {images[0]['image_id']}")
    _verify_is_clean()


def test_a_recorded_mask_whose_file_is_gone_is_a_404(api):
    session_id, images = _three_images(api)
    url = f"/sessions/{session_id}/images/{images[0]['image_id']}/mask"
    assert api.put(url, {"mask_base64": b64(_mask())}, format="json").status_code == 200
    (storage.session_dir(session_id) / "0" / "0_mask.png").unlink()
    assert_error(api.get(url), 404, "recorded but its file is missing")


def test_a_zip_over_the_total_pixels_is_400_before_any_image_decodes(api, settings, monkeypatch):
    """40 photos of 8192x8192 fit in a 10 MB zip and took 29.5 s of web CPU to decode:
    the headers' sum is checked first (here 3 small images over a limit of 2)."""
    from PIL import ImageFile

    from tests.sessions_app.test_uploads import zip_of

    settings.SDXL_MAX_UPLOAD_TOTAL_PIXELS = 2 * 48 * 40
    session_id = api.get("/create_session").json()["session_id"]
    archive = zip_of({f"{index}.png": image_bytes("PNG", (48, 40)) for index in range(3)})

    def decode(self):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    response = api.post(
        f"/sessions/{session_id}/images",
        {"archive": _file("set.zip", archive)},
        format="multipart",
    )

    assert_error(response, 400, "the 3 images sent hold 5760 pixels in all, more than the limit")
    assert "SDXL_MAX_UPLOAD_TOTAL_PIXELS" in response.json()["message"]
    assert not TrainingImage.objects.exists()
    assert list(storage.session_dir(session_id).iterdir()) == []
