"""Generated bodies thrown at every endpoint through DRF's test client: no 5xx (beyond
/txt2img's 504: no worker runs jobs in unit tests), no stack trace, every answer JSON in the
API's error shape or the endpoint's success shape.

Derandomized: CI runs the same few thousand bodies every time.
"""

import base64
import json

import pytest
from django.utils.timezone import now
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from sdxl_service.api.field_aliases import shown
from sdxl_service.api.generation.serializers import Txt2ImgSerializer
from sdxl_service.api.loras.serializers import GetLoraSerializer, UploadLoraSerializer
from sdxl_service.api.sessions.serializers import (
    PostSessionImageSerializer,
    SessionRefSerializer,
)
from sdxl_service.api.training.serializers import TrainLoraSerializer
from sessions_app import services as session_services
from tests.helpers import b64, image_bytes, lora_bytes, png_bomb
from training_app.models import WorkerHeartbeat
from training_app.services import loras as lora_services

pytestmark = pytest.mark.django_db

EXAMPLES_PER_ENDPOINT = 300
RAW_EXAMPLES = 300

ENDPOINTS = {
    "/create_session": ("GET", []),
    "/list_sessions": ("GET", []),
    "/post_session_image": ("POST", ["session_id", "image_base64", "prompt"]),
    "/delete_session": ("POST", ["session_id"]),
    "/train_lora": (
        "POST",
        ["session_id", "steps", "epochs", "batch_size", "learning_rate", "rank", "resolution"]
        + ["seed"],
    ),
    "/train_status": ("POST", ["session_id"]),
    "/get_lora": ("POST", ["session_id", "iteration"]),
    "/upload_lora": ("POST", ["session_id", "lora_base64", "filename"]),
    "/txt2img": (
        "POST",
        ["prompt", "negative_prompt", "num_images", "height", "width", "guidance_scale"]
        + ["steps", "use_lora", "session_id", "iteration", "lora_scale", "seed"],
    ),
}
# The serializer of each POST endpoint: a body key it does not know is a 400 naming it.
SERIALIZERS = {
    "/post_session_image": PostSessionImageSerializer,
    "/delete_session": SessionRefSerializer,
    "/train_lora": TrainLoraSerializer,
    "/train_status": SessionRefSerializer,
    "/get_lora": GetLoraSerializer,
    "/upload_lora": UploadLoraSerializer,
    "/txt2img": Txt2ImgSerializer,
}
SUCCESS_KEYS = {
    "/create_session": {"session_id"},
    "/list_sessions": {"sessions"},
    "/post_session_image": {"status"},
    "/delete_session": {"status", "session_id"},
    "/train_lora": {"status", "run_id"},
    "/train_status": {"status"},
    "/get_lora": {"session_id", "lora_filename", "lora_base64", "iteration", "sha256"},
    "/upload_lora": {"status", "lora_filename", "iteration"},
}

# Any text, lone surrogates and NUL included (json.dumps escapes them).
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=12,
)
numbers_near_the_limits = st.sampled_from(
    [-1, 0, 1, 4, 5, 7, 8, 63, 64, 65, 128, 150, 1024, 2048, 2056, 100_000, 2**31, 2**63, 1e-7]
    + [0.1, 30.0, 30.5, -4.0, 4.5, 1e308, "5", "5.0", "1e3", " 64 ", "nan", "Infinity"]
)
b64_payloads = st.sampled_from(
    [
        b64(image_bytes("PNG")),
        "data:image/jpeg;base64," + b64(image_bytes("JPEG")),
        b64(image_bytes("GIF")),
        b64(image_bytes("PNG")[:50]),
        b64(png_bomb(9000, 9000)),
        b64(lora_bytes()),
        b64(lora_bytes(fill=float("nan"))),
        b64(b"\x80\x04\x95 pickle"),
        "not base64!",
        "YWJ",
        "",
    ]
)


# Strings that break naive parsing: non-ASCII digits int() refuses or takes, a lone
# surrogate, NUL, blanks, numbers in disguise.
awkward_strings = st.sampled_from(
    ["²", "١٢", "߁", "\ud800", "a\udfffb", "x\x00y", " ", "\t\n", "9" * 30, "-1", "0x10", "1_000"]
)


def field_values(session_ids: list[int]) -> st.SearchStrategy:
    return (
        awkward_strings
        | any_text
        | st.sampled_from(session_ids)
        | st.sampled_from([str(i) for i in session_ids])
        | numbers_near_the_limits
        | b64_payloads
        | st.sampled_from(["../x.safetensors", "ok.safetensors", "a\\b.safetensors", "x" * 3000])
        | json_values
    )


def valid_fields(session_ids: list[int]) -> dict[str, st.SearchStrategy]:
    """A value each field accepts, so that mutated bodies get past validation too."""
    words = st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=30)
    return {
        "session_id": st.sampled_from(session_ids[:-1] + [str(i) for i in session_ids[:-1]]),
        "image_base64": st.sampled_from(
            [b64(image_bytes(kind, (24, 16))) for kind in ("PNG", "JPEG", "WEBP", "BMP")]
            + ["data:image/png;base64," + b64(image_bytes("PNG", (16, 24)))]
        ),
        "prompt": words | awkward_strings | any_text,
        "negative_prompt": words | st.just("") | awkward_strings,
        "lora_base64": st.sampled_from([b64(lora_bytes(seed=seed)) for seed in range(3)]),
        "filename": st.from_regex(r"[a-z][a-z0-9_]{0,12}\.safetensors", fullmatch=True)
        | awkward_strings,
        "steps": st.integers(5, 150),
        "epochs": st.integers(1, 1000),
        "batch_size": st.integers(1, 64),
        "learning_rate": st.floats(1e-7, 0.1),
        "rank": st.integers(1, 128),
        "resolution": st.sampled_from([64, 512, 1024, 2048]),
        "seed": st.integers(0, 2**63 - 1) | st.none(),
        "iteration": st.integers(1, 2**31 - 1) | st.none(),
        "num_images": st.integers(1, 8),
        "height": st.integers(8, 256).map(lambda n: n * 8),
        "width": st.integers(8, 256).map(lambda n: n * 8),
        "guidance_scale": st.floats(0.0, 30.0),
        "use_lora": st.booleans(),
        "lora_scale": st.floats(-4.0, 4.0),
    }


def bodies(path: str, session_ids: list[int]) -> st.SearchStrategy:
    fields = ENDPOINTS[path][1] or ["session_id"]
    valid = valid_fields(session_ids)
    # One of steps and epochs: both at once is a 400 of its own.
    template = st.fixed_dictionaries({field: valid[field] for field in fields if field != "epochs"})
    mutated = st.builds(
        lambda body, changes, dropped: {
            **{k: v for k, v in body.items() if k not in dropped},
            **changes,
        },
        template,
        st.dictionaries(st.sampled_from(fields), field_values(session_ids), max_size=2),
        st.sets(st.sampled_from(fields), max_size=2),
    )
    known = st.dictionaries(
        st.sampled_from(fields), field_values(session_ids), max_size=len(fields)
    )
    with_extras = st.builds(lambda a, b: {**b, **a}, known, st.dictionaries(any_text, json_values))
    # Weighted towards nearly valid bodies: they reach the services, not just the serializers.
    return st.one_of(template, mutated, mutated, mutated, known, with_extras, json_values)


def assert_well_formed(path: str, response) -> None:
    text = response.content.decode("utf-8")
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    assert response["Content-Type"] == "application/json", (response.status_code, text[:300])
    body = json.loads(text)
    status = response.status_code
    if path == "/txt2img" and status == 504:
        # Nearly valid requests get all the way to waiting for the (absent) worker.
        assert body["message"] == "timed out waiting for a generation worker", body
    else:
        assert status < 500, (status, body)
    if status >= 400:
        assert set(body) == {"status", "message"} and body["status"] == "error", body
        assert isinstance(body["message"], str) and body["message"]
    else:
        assert SUCCESS_KEYS[path] <= set(body), body


@pytest.fixture
def sessions(settings) -> list[int]:
    """Ids the bodies may name: sessions with an image and a LoRA, an empty one, none.

    A generation worker's heartbeat, and no wait: /txt2img records its generation and
    answers 504 at once, instead of 503 before touching the database.
    """
    WorkerHeartbeat.objects.create(
        queue=settings.GENERATION_QUEUE, host="fuzz", pid=1, started_at=now(), last_seen=now()
    )
    settings.SDXL_TXT2IMG_TIMEOUT = 0
    settings.SDXL_WORKER_STALE_AFTER = 3600  # the heartbeat stays fresh for the whole test
    ids = []
    for _ in range(3):
        full = session_services.session_create()
        session_services.session_image_add(full.pk, image_bytes(), "a red square")
        lora_services.lora_upload(full.pk, lora_bytes(), None)
        ids.append(full.pk)
    return [*ids, session_services.session_create().pk, 999_999]


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_ENDPOINT,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_generated_json_bodies(path, sessions, record_property):
    client = APIClient()
    method = ENDPOINTS[path][0]
    sent = []
    refused_for_unknown: list[str] = []

    @FUZZ_SETTINGS
    @given(
        body=bodies(path, sessions),
        wrong_method=st.sampled_from([False] * 9 + [True]),
        slash=st.booleans(),
    )
    def send(body, wrong_method, slash):
        verb = {"GET": "POST", "POST": "GET"}[method] if wrong_method else method
        encoded = json.dumps(body)  # ASCII: lone surrogates travel as \\ud800 escapes
        url = f"{path}/" if slash else path
        response = client.generic(verb, url, encoded, content_type="application/json")
        sent.append(response.status_code)
        assert_well_formed(path, response)
        unknown = unknown_keys(path, body)
        if unknown and not wrong_method:
            # Refused however good the rest is, each unknown key named.
            assert response.status_code == 400, (body, response.content)
            message = response.json()["message"]
            for key in unknown:
                assert f"{shown(key)}: unknown field" in message, (key, message)
            refused_for_unknown.append(path)

    send()
    record_property("bodies", len(sent))
    assert len(sent) >= EXAMPLES_PER_ENDPOINT
    if path in SERIALIZERS:
        assert refused_for_unknown  # the bodies with extra keys reached the check


def unknown_keys(path: str, body: object) -> set[str]:
    """The keys of a POST body that its endpoint does not take."""
    if path not in SERIALIZERS or not isinstance(body, dict):
        return set()
    return set(body) - set(SERIALIZERS[path]().fields)


raw_bodies = (
    st.binary(max_size=200)
    | st.text(max_size=200).map(str.encode)
    | st.sampled_from(
        [
            b"NaN",
            b"[1, 2",
            b'{"session_id": 1e400}',
            b'{"session_id": "1",}',
            b"\xef\xbb\xbf{}",
            b"[" * 50_000 + b"]" * 50_000,
            '{"prompt": "\udcff"}'.encode("utf-8", "surrogatepass"),
            base64.b64encode(b"{}"),
        ]
    )
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=latin-1",
        "application/json; charset=bz2_codec",
        "application/json; charset=nonsense",
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "",
    ]
)


def test_generated_raw_bodies_and_content_types(sessions, record_property):
    client = APIClient()
    sent = []

    @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
    @given(path=st.sampled_from(list(ENDPOINTS)), body=raw_bodies, content_type=content_types)
    def send(path, body, content_type):
        response = client.generic(ENDPOINTS[path][0], path, body, content_type=content_type)
        sent.append(response.status_code)
        assert_well_formed(path, response)

    send()
    record_property("bodies", len(sent))
    assert len(sent) >= RAW_EXAMPLES
