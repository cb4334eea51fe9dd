"""Unknown request fields answer 400 naming each one and the field meant (issue 25, point
1), through the real API: JSON bodies, multipart forms, the query string of
/list_sessions, and the objects nested in a body (each entry of /txt2img's loras).

The names other tools send (sdxl_service.api.field_aliases.ALIASES) are each posted to
every endpoint that has the field they mean; the documented fields of every endpoint
(docs/api.md's field tables) are each still accepted.
"""

import re
from pathlib import Path

import pytest

from sdxl_service.api import field_aliases
from sdxl_service.api.field_aliases import ALIASES
from sdxl_service.api.generation.serializers import LoraChoiceSerializer, Txt2ImgSerializer
from sdxl_service.api.loras.serializers import (
    GetLoraSerializer,
    UploadLoraFileSerializer,
    UploadLoraSerializer,
)
from sdxl_service.api.sessions.serializers import (
    PostSessionImageSerializer,
    SessionImagesUploadSerializer,
)
from sdxl_service.api.training.serializers import TrainLoraSerializer
from sessions_app import services as session_services
from sessions_app.models import Session, TrainingImage
from tests.helpers import b64, image_bytes, lora_bytes
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import Generation, LoraArtifact, TrainingRun
from training_app.services import loras as lora_services

pytestmark = pytest.mark.django_db

DOCS = Path(__file__).resolve().parents[3] / "docs" / "api.md"


@pytest.fixture
def session():
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    lora_services.lora_upload(session.pk, lora_bytes(), None)
    return session


def _rows() -> tuple[int, ...]:
    return (
        TrainingRun.objects.count(),
        Generation.objects.count(),
        TrainingImage.objects.count(),
        LoraArtifact.objects.count(),
    )


# Each context of the table: the endpoints whose serializer it names, how to send a body
# there (a valid one but for the alias), and where the alias goes.
def _json(path):
    def send(api, session, extra):
        bodies = {
            "/train_lora": {"session_id": session.pk},
            "/txt2img": {"prompt": "a red square", "height": 64, "width": 64, "steps": 5},
            "/post_session_image": {
                "session_id": session.pk,
                "image_base64": b64(image_bytes()),
                "prompt": "an apple",
            },
            "/get_lora": {"session_id": session.pk},
            "/upload_lora": {"session_id": session.pk, "lora_base64": b64(lora_bytes(seed=1))},
        }
        return api.post(path, {**bodies[path], **extra}, format="json")

    return send


def _lora_entry(api, session, extra):
    body = {
        "prompt": "a red square",
        "height": 64,
        "width": 64,
        "steps": 5,
        "loras": [{"session_id": session.pk, **extra}],
    }
    return api.post("/txt2img", body, format="json")


def _image_files(api, session, extra):
    form = {"image": _upload("a.png", image_bytes()), "caption": "an apple", **extra}
    return api.post(f"/sessions/{session.pk}/images", form, format="multipart")


def _lora_file_form(api, session, extra):
    form = {"session_id": session.pk, "lora": _upload("x.safetensors", lora_bytes(seed=2))}
    return api.post("/upload_lora", {**form, **extra}, format="multipart")


def _upload(name, data):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data)


ENDPOINTS = {
    field_aliases.TRAINING: [("/train_lora", TrainLoraSerializer, _json("/train_lora"), "")],
    field_aliases.GENERATION: [("/txt2img", Txt2ImgSerializer, _json("/txt2img"), "")],
    field_aliases.LORA_ENTRY: [("/txt2img loras", LoraChoiceSerializer, _lora_entry, "loras[0].")],
    field_aliases.IMAGE: [
        ("/post_session_image", PostSessionImageSerializer, _json("/post_session_image"), "")
    ],
    field_aliases.IMAGE_FILES: [
        ("/sessions/<id>/images", SessionImagesUploadSerializer, _image_files, "")
    ],
    field_aliases.LORA_FILE: [
        ("/get_lora", GetLoraSerializer, _json("/get_lora"), ""),
        ("/upload_lora", UploadLoraSerializer, _json("/upload_lora"), ""),
        ("/upload_lora multipart", UploadLoraFileSerializer, _lora_file_form, ""),
    ],
}


def _value(field: str):
    """A value the field meant would take, so only the name is wrong."""
    return {
        "image": "x",
        "images": "x",
        "file": "x",
        "zip": "x",
        "lora_file": "x",
        "weights": "x",
        "init_images": b64(image_bytes()),
    }.get(field, "0.8")


def _mapped_cases():
    for alias in ALIASES:
        for context, ours in alias.ours.items():
            for label, serializer, send, prefix in ENDPOINTS[context]:
                if ours in serializer().fields and alias.name not in serializer().fields:
                    yield pytest.param(
                        send, alias.name, ours, prefix, id=f"{label}:{alias.name}->{ours}"
                    )


@pytest.mark.parametrize(("send", "name", "meant", "prefix"), list(_mapped_cases()))
def test_each_name_from_another_tool_is_400_naming_the_field_meant(
    api, session, send, name, meant, prefix
):
    before = _rows()

    response = send(api, session, {name: _value(name)})

    assert_error(response, 400, f'{prefix}{name}: unknown field; did you mean "{meant}"?')
    assert _rows() == before  # nothing recorded, nothing stored


@pytest.mark.parametrize(
    "alias", [alias for alias in ALIASES if not alias.ours], ids=lambda alias: alias.name
)
@pytest.mark.parametrize("path", ["/txt2img", "/train_lora"])
def test_a_name_with_no_counterpart_is_400_saying_what_to_do_instead(api, session, path, alias):
    before = _rows()

    response = _json(path)(api, session, {alias.name: True})

    assert_error(response, 400, f"{alias.name}: unknown field ({alias.note})")
    assert _rows() == before


def test_max_train_steps_starts_no_run_and_says_steps(api, session):
    response = api.post(
        "/train_lora", {"session_id": str(session.pk), "max_train_steps": 10}, format="json"
    )

    assert_error(response, 400, 'max_train_steps: unknown field; did you mean "steps"?')
    assert not TrainingRun.objects.exists()


def test_every_unknown_field_is_named_with_the_fields_own_problems(api):
    response = api.post(
        "/txt2img",
        {"promt": "a cat", "cfg_scale": 7, "sampler_name": "Euler a", "steps": 2},
        format="json",
    )

    assert response.status_code == 400
    message = response.json()["message"]
    assert 'promt: unknown field; did you mean "prompt"?' in message
    assert 'cfg_scale: unknown field; did you mean "guidance_scale"?' in message
    assert 'sampler_name: unknown field; did you mean "scheduler"?' in message
    assert "dpmpp_2m_karras" in message  # the scheduler's own names
    assert "prompt: This field is required." in message
    assert "steps: Ensure this value is greater than or equal to 5." in message
    assert message.index("promt") < message.index("prompt: This field")


def test_init_image_is_refused_rather_than_generating_from_text(api, session):
    response = _json("/txt2img")(api, session, {"init_image": b64(image_bytes())})

    assert_error(response, 400, 'init_image: unknown field; did you mean "init_image_base64"?')
    assert not Generation.objects.exists()


def test_weight_in_a_loras_entry_is_400_naming_the_entry(api, session):
    body = {
        "prompt": "x",
        "loras": [{"session_id": session.pk}, {"session_id": session.pk, "weight": 0.8}],
    }

    response = api.post("/txt2img", body, format="json")

    assert_error(response, 400, 'loras[1].weight: unknown field; did you mean "scale"?')
    assert "loras[0]" not in response.json()["message"]


def test_multipart_prompt_is_refused_and_stores_no_image(api, session):
    before = TrainingImage.objects.filter(group__session=session).count()

    response = api.post(
        f"/sessions/{session.pk}/images",
        {"image": _upload("a.png", image_bytes()), "prompt": "an apple"},
        format="multipart",
    )

    assert_error(response, 400, 'prompt: unknown field; did you mean "caption"?')
    assert TrainingImage.objects.filter(group__session=session).count() == before


def test_a_misspelt_query_parameter_of_list_sessions_is_400(api, session):
    assert_error(
        api.get("/list_sessions?limt=5"), 400, 'limt: unknown field; did you mean "limit"?'
    )
    assert api.get("/list_sessions?limit=5").status_code == 200
    assert api.get("/list_sessions?format=json").status_code == 200  # DRF's own


def test_a_typo_with_nothing_close_is_just_unknown(api, session):
    response = api.post("/delete_session", {"session_id": session.pk, "zzz": 1}, format="json")

    assert_error(response, 400, "zzz: unknown field")
    assert "did you mean" not in response.json()["message"]
    assert Session.objects.filter(pk=session.pk).exists()


# --- every documented field is still accepted ---------------------------------------


def _documented_request_fields() -> dict[str, set[str]]:
    """The fields docs/api.md's request tables list for each endpoint, and the request
    fields its summary of additions names."""
    text = DOCS.read_text(encoding="utf-8")
    found: dict[str, set[str]] = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        endpoint = re.match(r"(?:GET|POST) (/\S+)", heading)
        table = re.search(r"^\| field \|.*?\n((?:\|.*\n)+)", body, flags=re.M)
        if endpoint and table:
            names = found.setdefault(endpoint.group(1), set())
            for row in table.group(1).splitlines()[1:]:
                names.update(re.findall(r"`(\w+)`", row.split("|")[1]))
    summary = text.split("### Summary of additions", 1)[1].split("\n## ", 1)[0]
    for row in summary.splitlines():
        cells = row.split("|")
        if len(cells) > 3 and "request" in cells[1]:
            for path in re.findall(r"`(/\w+)`", cells[1]):
                fields = cells[2].split(";")[0]
                found.setdefault(path, set()).update(re.findall(r"`(\w+)`", fields))
    return found


def test_the_documented_fields_are_read_from_the_docs():
    documented = _documented_request_fields()
    assert {"prompt", "loras", "async", "response_format", "webhook_url"} <= documented["/txt2img"]
    assert {"session_id", "steps", "text_encoder_lr", "sample_prompts"} <= documented["/train_lora"]
    assert documented["/list_sessions"] == {"limit", "offset"}


def _accepted_bodies(session, other) -> dict[str, list[tuple[str, dict, int]]]:
    """For each endpoint: (method, body, the status it answers) that together send every
    documented field (some exclude each other: steps and epochs, use_lora and loras)."""
    image = b64(image_bytes())
    common_gen = {
        "prompt": "a red square",
        "negative_prompt": "blurry",
        "num_images": 1,
        "height": 64,
        "width": 64,
        "guidance_scale": 5.0,
        "steps": 5,
        "seed": 3,
        "scheduler": "euler",
        "refiner": "ensemble",
        "refiner_switch": 0.8,
        "output_format": "jpeg",
        "quality": 90,
        "async": True,
        "response_format": "url",
        "webhook_url": None,
        "webhook_events": [],
    }
    return {
        "/post_session_image": [
            ("post", {"session_id": session.pk, "image_base64": image, "prompt": "x"}, 200),
            (
                "post",
                {
                    "session_id": session.pk,
                    "image_base64": image,
                    "prompt": "x",
                    "mask_base64": b64(image_bytes(color="white")),
                },
                200,
            ),
        ],
        "/train_lora": [
            (
                "post",
                {
                    "session_id": other.pk,
                    "recipe": "original",
                    "steps": 10,
                    "batch_size": 1,
                    "learning_rate": 1e-4,
                    "rank": 4,
                    "resolution": 64,
                    "seed": 1,
                    "lr_scheduler": "constant_with_warmup",
                    "lr_warmup_steps": 2,
                    "min_snr_gamma": 5.0,
                    "noise_offset": 0.05,
                    "trigger": "sks",
                    "caption_dropout": 0.05,
                    "train_text_encoder": True,
                    "text_encoder_lr": 1e-5,
                    "sample_every": 5,
                    "sample_prompts": ["sks"],
                    "sample_seed": 2,
                    "checkpoint_every": 5,
                    "eval_holdout": 0,  # the session has one image: it must train
                    "enable_bucket": False,
                    # Alpha masks need no mask file (an image without alpha counts whole).
                    "masked_loss": True,
                    "use_alpha_mask": True,
                    "background_weight": 0.2,
                    "prior_preservation_weight": 1.0,
                    "class_prompt": "a photo",
                    "webhook_url": "https://hooks.example.com/x",
                    "webhook_events": ["completed"],
                },
                200,
            ),
            ("cancel", {}, 200),
            ("post", {"session_id": other.pk, "epochs": 1}, 200),
            # Continuing the session's uploaded lora_1, then cancelled: /cancel_training
            # below expects nothing active there.
            ("post", {"session_id": session.pk, "steps": 1, "init_lora": {"iteration": 1}}, 200),
            ("cancel", {"session_id": session.pk}, 200),
        ],
        "/train_status": [("post", {"session_id": session.pk}, 200)],
        "/cancel_training": [("post", {"session_id": session.pk}, 409)],
        "/get_lora": [
            ("post", {"session_id": session.pk, "iteration": 1, "format": "kohya"}, 200),
            ("post", {"session_id": session.pk, "lora_filename": "lora_1.safetensors"}, 200),
        ],
        "/upload_lora": [
            (
                "post",
                {
                    "session_id": session.pk,
                    "lora_base64": b64(lora_bytes(seed=4)),
                    "filename": "mine.safetensors",
                },
                200,
            )
        ],
        "/txt2img": [
            (
                "post",
                {
                    **common_gen,
                    "use_lora": True,
                    "session_id": session.pk,
                    "iteration": 1,
                    "lora_scale": 0.5,
                },
                202,
            ),
            (
                "post",
                {
                    **common_gen,
                    "lora_filename": None,
                    "loras": [{"session_id": session.pk, "iteration": 1, "scale": 0.7}],
                    "init_image_base64": image,
                    "strength": 0.5,
                    "prompt_syntax": "plain",
                    "face_detail": {"strength": 0.3, "prompt": "a face", "padding": 16},
                },
                202,
            ),
            (
                "post",
                {
                    **common_gen,
                    "init_image_base64": image,
                    "mask_base64": b64(image_bytes(color="white")),
                    "mask_blur": 2,
                    "inpaint_area": "masked",
                    "inpaint_padding": 16,
                    "inpaint_fill": "fill",
                },
                202,
            ),
            ("post", {**common_gen, "init_image_base64": image, "outpaint": {"left": 8}}, 202),
        ],
        "/list_sessions": [("get", {"limit": 5, "offset": 0}, 200)],
        "/delete_session": [("post", {"session_id": other.pk}, 200)],
        "/sessions/<id>/masks": [
            ("post", {"kind": "subject", "overwrite": True, "prompt": "a square"}, 200)
        ],
        "/sessions/<id>/captions": [
            ("post", {"overwrite": False, "prefix": "a photo of TOK,"}, 200)
        ],
    }


def test_every_documented_field_of_every_endpoint_is_still_accepted(
    api, session, generation_worker, settings
):
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    settings.SDXL_WEBHOOK_SECRET = "s"
    other = session_services.session_create()
    session_services.session_image_add(other.pk, image_bytes(), "a blue square")
    documented = _documented_request_fields()
    cases = _accepted_bodies(session, other)

    for path, requests in cases.items():
        sent: set[str] = set()
        for method, body, status in requests:
            url = path.replace("<id>", str(session.pk))
            if method == "cancel":
                cancelled = body.get("session_id", other.pk)
                response = api.post("/cancel_training", {"session_id": cancelled}, format="json")
            elif method == "get":
                response = api.get(url, body)
            else:
                response = api.post(url, body, format="json")
            assert response.status_code == status, (path, body, response.content)
            sent |= set(body)
        assert documented.get(path, set()) <= sent, (path, documented[path] - sent)
    assert {path for path in documented if path.startswith("/")} <= set(cases) | {
        "/create_session",
    }
