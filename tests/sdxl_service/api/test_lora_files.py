"""GET /sessions/<id>/loras/<lora_filename>: a LoRA or checkpoint file as a download, in the
stored or kohya form, with ETag, conditional requests and byte ranges, under the API's
token rules; /get_lora names its URL."""

import base64
import hashlib

import pytest
from rest_framework.test import APIClient
from safetensors.torch import load

from datadir_app.verify import verify as run_verify
from sessions_app import storage
from tests.helpers import HOSTILE_LORAS, b64, hostile_lora, lora_bytes
from tests.maintenance_helpers import run as run_command
from tests.maintenance_helpers import stored_checkpoint
from tests.sdxl_service.api.test_session_views import assert_error
from tests.sdxl_service.api.test_tenants import MISSING, tenant
from training_app.models import Generation, LoraArtifact, TrainingRun
from training_app.services import loras as lora_services
from training_app.services.loras import KOHYA_CACHE_FOLDER

pytestmark = pytest.mark.django_db


@pytest.fixture
def uploaded(session) -> LoraArtifact:
    return lora_services.lora_upload(session.pk, lora_bytes(seed=1), None)


def _url(session_id: int, filename: str, **query: str) -> str:
    url = f"/sessions/{session_id}/loras/{filename}"
    return url + "".join(f"?{key}={value}" for key, value in query.items())


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def test_a_lora_downloads_as_its_stored_file_with_its_sha256_as_etag(api, session, uploaded):
    stored = (storage.session_dir(session.pk) / "lora_1.safetensors").read_bytes()

    response = api.get(_url(session.pk, "lora_1.safetensors"))

    assert response.status_code == 200
    assert _body(response) == stored
    assert response["Content-Length"] == str(len(stored))
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"] == 'attachment; filename="lora_1.safetensors"'
    assert response["ETag"] == f'"{uploaded.sha256}"'
    assert uploaded.sha256 == hashlib.sha256(stored).hexdigest()
    assert response["Accept-Ranges"] == "bytes"


def test_get_lora_answers_the_download_url_of_the_same_bytes(api, session, uploaded):
    for lora_format in ("diffusers", "kohya"):
        body = api.post(
            "/get_lora", {"session_id": session.pk, "format": lora_format}, format="json"
        ).json()
        # Every documented key is still there, unchanged.
        assert set(body) == {
            "session_id",
            "lora_filename",
            "lora_base64",
            "iteration",
            "format",
            "sha256",
            "lora_url",
        }
        expected = _url(session.pk, "lora_1.safetensors")
        if lora_format == "kohya":
            expected += "?format=kohya"
        assert body["lora_url"] == expected
        response = api.get(body["lora_url"])
        assert response.status_code == 200
        assert _body(response) == base64.b64decode(body["lora_base64"])
        assert response["ETag"] == f'"{body["sha256"]}"'


def test_the_kohya_form_is_converted_once_and_named_apart(api, session, uploaded):
    response = api.get(_url(session.pk, "lora_1.safetensors", format="kohya"))

    assert response.status_code == 200
    kohya = _body(response)
    assert kohya and all(key.startswith("lora_unet_") for key in load(kohya))
    assert response["Content-Disposition"] == 'attachment; filename="lora_1.kohya.safetensors"'
    sha256 = hashlib.sha256(kohya).hexdigest()
    assert response["ETag"] == f'"{sha256}"'
    # Kept beside the session's files, hidden, named by what it was made from and is.
    cache = storage.session_dir(session.pk) / KOHYA_CACHE_FOLDER
    assert [path.name for path in cache.iterdir()] == [f"{uploaded.sha256}.{sha256}.safetensors"]
    # The next download (a range of it too) reads that file instead of converting again.
    (cache / f"{uploaded.sha256}.{sha256}.safetensors").write_bytes(b"0123456789")
    again = api.get(_url(session.pk, "lora_1.safetensors", format="kohya"), HTTP_RANGE="bytes=2-4")
    assert (again.status_code, _body(again)) == (206, b"234")
    # Neither a LoRA of the session nor a file the listings show.
    detail = api.get(f"/sessions/{session.pk}").json()
    assert [lora["lora_filename"] for lora in detail["loras"]] == ["lora_1.safetensors"]


def test_a_checkpoint_downloads_by_its_file_name(api, session):
    run = TrainingRun.objects.create(session=session, status="completed", parameters={})
    checkpoint = stored_checkpoint(run, 2, seed=5)

    response = api.get(_url(session.pk, checkpoint.filename))

    assert response.status_code == 200
    assert _body(response) == lora_bytes(seed=5)
    assert response["ETag"] == f'"{checkpoint.sha256}"'
    assert checkpoint.filename == f"lora_run{run.pk}_step2.safetensors"
    assert response["Content-Disposition"] == f'attachment; filename="{checkpoint.filename}"'
    kohya = api.get(_url(session.pk, checkpoint.filename, format="kohya"))
    assert kohya.status_code == 200
    assert kohya["Content-Disposition"] == (
        f'attachment; filename="lora_run{run.pk}_step2.kohya.safetensors"'
    )
    assert all(key.startswith("lora_unet_") for key in load(_body(kohya)))


def test_if_none_match_with_the_etag_answers_304_without_a_body(api, session, uploaded):
    url = _url(session.pk, "lora_1.safetensors")
    etag = f'"{uploaded.sha256}"'

    for header in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        unchanged = api.get(url, HTTP_IF_NONE_MATCH=header)
        assert (unchanged.status_code, unchanged.content) == (304, b""), header
        assert unchanged["ETag"] == etag
    changed = api.get(url, HTTP_IF_NONE_MATCH='"0123"')
    assert changed.status_code == 200 and _body(changed)


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-9", 0, 9),  # a single range
        ("bytes=100-", 100, None),  # open: to the end
        ("bytes=-10", -10, None),  # suffix: the last 10 bytes
        ("bytes=10-10", 10, 10),  # one byte
        ("bytes=5-99999999", 5, None),  # a last byte past the end is the end
    ],
)
def test_a_byte_range_answers_206_with_those_bytes(api, session, uploaded, header, first, last):
    stored = (storage.session_dir(session.pk) / "lora_1.safetensors").read_bytes()
    size = len(stored)
    expected = stored[first : None if last is None else last + 1]
    start = first % size

    response = api.get(_url(session.pk, "lora_1.safetensors"), HTTP_RANGE=header)

    assert response.status_code == 206
    assert _body(response) == expected
    assert response["Content-Range"] == f"bytes {start}-{start + len(expected) - 1}/{size}"
    assert response["Content-Length"] == str(len(expected))
    assert response["ETag"] == f'"{uploaded.sha256}"'
    assert response["Content-Disposition"] == 'attachment; filename="lora_1.safetensors"'


def test_a_range_of_the_kohya_form(api, session, uploaded):
    whole = _body(api.get(_url(session.pk, "lora_1.safetensors", format="kohya")))
    response = api.get(
        _url(session.pk, "lora_1.safetensors", format="kohya"), HTTP_RANGE="bytes=-7"
    )
    assert (response.status_code, _body(response)) == (206, whole[-7:])
    assert response["Content-Range"] == f"bytes {len(whole) - 7}-{len(whole) - 1}/{len(whole)}"


@pytest.mark.parametrize("header", ["bytes={size}-", "bytes={size}-{size}", "bytes=-0"])
def test_an_unsatisfiable_range_answers_416_with_the_size(api, session, uploaded, header):
    size = uploaded.size

    response = api.get(_url(session.pk, "lora_1.safetensors"), HTTP_RANGE=header.format(size=size))

    assert_error(response, 416, "outside the file")
    assert response["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-1,5-6",  # several ranges: not served, the whole file goes
        "items=0-1",  # another unit
        "bytes=9-2",  # malformed
        "bytes=-",
        "bytes=a-b",
    ],
)
def test_a_range_not_served_answers_the_whole_file(api, session, uploaded, header):
    response = api.get(_url(session.pk, "lora_1.safetensors"), HTTP_RANGE=header)
    assert response.status_code == 200
    assert len(_body(response)) == uploaded.size


def test_if_range_with_another_etag_answers_the_whole_file(api, session, uploaded):
    url = _url(session.pk, "lora_1.safetensors")
    current = api.get(url, HTTP_RANGE="bytes=0-3", HTTP_IF_RANGE=f'"{uploaded.sha256}"')
    assert (current.status_code, len(_body(current))) == (206, 4)
    stale = api.get(url, HTTP_RANGE="bytes=0-3", HTTP_IF_RANGE='"an-older-file"')
    assert (stale.status_code, len(_body(stale))) == (200, uploaded.size)


def test_unknown_files_formats_and_missing_files(api, session, uploaded):
    assert_error(api.get(_url(session.pk, "lora_9.safetensors")), 404, "lora_9.safetensors")
    assert_error(api.get(_url(MISSING, "lora_1.safetensors")), 404, "not found")
    assert_error(api.get(_url(session.pk, "lora_1.safetensors", format="ckpt")), 400, "format")
    (storage.session_dir(session.pk) / "lora_1.safetensors").unlink()
    assert_error(api.get(_url(session.pk, "lora_1.safetensors")), 404, "missing")


def test_another_owners_file_is_a_404_like_a_missing_one_and_reading_needs_the_read_scope():
    alice, bob = tenant("alice"), tenant("bob")
    session_id = bob.api.get("/create_session").json()["session_id"]
    lora_services.lora_upload(int(session_id), lora_bytes(seed=2), None)
    url = _url(int(session_id), "lora_1.safetensors")

    theirs = alice.api.get(url)
    missing = alice.api.get(_url(MISSING, "lora_1.safetensors"))

    assert_error(theirs, 404, "")
    assert theirs.json()["message"] == missing.json()["message"]
    assert not (storage.session_dir(int(session_id)) / KOHYA_CACHE_FOLDER).exists()
    assert bob.api.get(url).status_code == 200
    assert_error(APIClient().get(url), 401, "")
    assert_error(tenant("carol", ["upload"]).api.get(url), 403, "read")


def test_prune_removes_the_kohya_forms_kept_of_the_files_it_deletes(
    api, session, django_capture_on_commit_callbacks
):
    run = TrainingRun.objects.create(session=session, status="completed", parameters={})
    old, new = stored_checkpoint(run, 2, seed=5), stored_checkpoint(run, 4, seed=6)
    for checkpoint in (old, new):
        response = api.get(_url(session.pk, checkpoint.filename, format="kohya"))
        assert response.status_code == 200
    cache = storage.session_dir(session.pk) / KOHYA_CACHE_FOLDER
    assert sorted(path.name.split(".")[0] for path in cache.iterdir()) == sorted(
        [old.sha256, new.sha256]
    )

    with django_capture_on_commit_callbacks(execute=True):
        output = run_command("prune_loras", "--keep", "1")

    assert f"deleted session_{session.pk}/checkpoints/{old.filename}" in output
    assert [path.name.split(".")[0] for path in cache.iterdir()] == [new.sha256]
    assert_error(api.get(_url(session.pk, old.filename, format="kohya")), 404, old.filename)
    assert api.get(_url(session.pk, new.filename, format="kohya")).status_code == 200


def test_a_trained_lora_and_a_generated_image_name_the_model_not_a_server_path(
    api, session, settings, tmp_path, generation_worker
):
    """The tiny preset's weights lie in the model cache (under the data dir by default):
    neither the LoRA's metadata nor the image's infotext names that folder."""
    from sdxl_engine.image_output import read_infotext, read_record
    from sdxl_engine.lora_files import read_lora_metadata
    from training_app.services import runs as run_services
    from training_app.services.generations import batches

    server_paths = [str(settings.DATA_DIR), str(settings.MODEL_CACHE_DIR)]
    started = api.post(
        "/train_lora", {"session_id": session.pk, "steps": 1, "resolution": 64}, format="json"
    )
    assert started.status_code == 200
    run_services.training_run_execute(TrainingRun.objects.get().pk)
    for lora_format in ("diffusers", "kohya"):
        response = api.get(_url(session.pk, "lora_1.safetensors", format=lora_format))
        assert response.status_code == 200
        (tmp_path / "lora.safetensors").write_bytes(_body(response))
        metadata = read_lora_metadata(tmp_path / "lora.safetensors")
        assert metadata["sdxl_service.base_model"] == "tiny"
        assert not [
            (key, value)
            for key, value in metadata.items()
            if any(path in value for path in server_paths)
        ]
    assert metadata["ss_sd_model_name"] == "tiny"

    body = {
        "prompt": "a red square",
        "width": 64,
        "height": 64,
        "steps": 5,
        "loras": [{"session_id": session.pk}],
        "async": True,
    }
    answer = api.post("/txt2img", body, format="json")
    assert answer.status_code == 202, answer.content
    batches.generation_execute(answer.json()["generation_id"])
    done = api.get(answer.json()["status_url"]).json()
    assert done["status"] == "completed", done
    image = _body(api.get(done["image_urls"][0]))
    infotext, record = read_infotext(image), read_record(image)
    assert "Model: tiny," in infotext
    assert record is not None and record["model"] == "tiny"
    assert not any(path in infotext for path in server_paths)
    assert not any(path in str(record) for path in server_paths)


def test_the_kept_kohya_form_is_no_file_verify_or_export_sees(api, session, uploaded, tmp_path):
    import zipfile

    assert api.get(_url(session.pk, "lora_1.safetensors", format="kohya")).status_code == 200
    assert (storage.session_dir(session.pk) / KOHYA_CACHE_FOLDER).is_dir()

    assert "the rows and files agree" in run_command("verify")
    run_command("export_session", str(session.pk), str(tmp_path / "session.zip"))
    with zipfile.ZipFile(tmp_path / "session.zip") as archive:
        assert not [name for name in archive.namelist() if KOHYA_CACHE_FOLDER in name]


# The two files issue 26 found stored (then a 500 on every /txt2img), and its 500 at upload.
_ISSUE_26_FILES = [
    "overlapping data_offsets",
    "100 KB of trailing bytes",
    "a header of 200,000 nested [",
]


@pytest.mark.parametrize("defect", _ISSUE_26_FILES)
def test_a_hostile_upload_answers_400_naming_the_problem_and_stores_nothing(api, session, defect):
    response = api.post(
        "/upload_lora",
        {"session_id": session.pk, "lora_base64": b64(hostile_lora(defect))},
        format="json",
    )
    assert_error(response, 400, HOSTILE_LORAS[defect])
    assert not LoraArtifact.objects.exists()
    assert not list(storage.session_dir(session.pk).glob("*.safetensors"))


@pytest.mark.parametrize("defect", _ISSUE_26_FILES)
def test_a_hostile_lora_stored_before_the_checks_is_a_409_for_txt2img_and_verify_names_it(
    api, session, tmp_path, generations_in_process, defect
):
    staged = tmp_path / "stored_before.safetensors"
    staged.write_bytes(hostile_lora(defect))
    lora_services.lora_store(
        session.pk,
        staged,
        expected_sha256=hashlib.sha256(staged.read_bytes()).hexdigest(),
        source=LoraArtifact.Source.UPLOADED,
    )
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 5}
    answer = api.post("/txt2img", {**body, "loras": [{"session_id": session.pk}]}, format="json")
    assert_error(answer, 409, "lora_1.safetensors is not a readable safetensors file")
    assert HOSTILE_LORAS[defect] in answer.json()["message"]
    assert "cannot be applied" in answer.json()["message"]
    assert not Generation.objects.exists()
    problems = run_verify().problems
    assert [problem for problem in problems if "lora_1.safetensors: not a readable LoRA" in problem]
