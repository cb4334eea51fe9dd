"""Two owners, each with its API token: neither sees the other's anything (a 404 exactly as
for a missing id), scopes answer 403, quotas 429, an admin token sees all; without any
token the service behaves as before owners."""

import io
import re
from dataclasses import dataclass

import numpy as np
import pytest
from django.utils import timezone
from PIL import Image
from rest_framework.test import APIClient

from access_app.models import Owner
from access_app.services import api_token_create
from sessions_app import storage
from sessions_app.models import Session, TrainingImage
from tests.helpers import b64, image_bytes, lora_bytes
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import Generation, LoraArtifact, TrainingRun, TrainingSample
from training_app.services.generations import batches
from training_app.services.generations.lifecycle import generations_dir
from training_app.services.watch import sample_path

pytestmark = pytest.mark.django_db

MISSING = 987654  # an id nothing has
ENV_TOKEN = "operator-env-token-0123456789"


@dataclass
class Tenant:
    owner: Owner
    token: str

    @property
    def api(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.token}")
        return client


def tenant(name: str, scopes: list[str] | None = None) -> Tenant:
    token, plaintext = api_token_create(name, f"{name}'s token", scopes)
    return Tenant(token.owner, plaintext)


@pytest.fixture
def alice() -> Tenant:
    return tenant("alice")


@pytest.fixture
def bob() -> Tenant:
    return tenant("bob")


@pytest.fixture
def admin(settings) -> APIClient:
    settings.SDXL_API_TOKENS = [ENV_TOKEN]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {ENV_TOKEN}")
    return client


@dataclass
class Holdings:
    """What bob has: a session with an image and a LoRA, a run with a sample image, and a
    completed generation with its image."""

    session_id: int
    image_id: int
    lora_filename: str
    sample_id: int
    generation_id: int


@pytest.fixture
def bobs(bob) -> Holdings:
    session_id = bob.api.get("/create_session").json()["session_id"]
    body = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "a cat"}
    assert bob.api.post("/post_session_image", body, format="json").status_code == 200
    body = {"session_id": session_id, "lora_base64": b64(lora_bytes())}
    uploaded = bob.api.post("/upload_lora", body, format="json")
    assert uploaded.status_code == 200, uploaded.content
    run = TrainingRun.objects.create(
        session_id=session_id, status=TrainingRun.Status.COMPLETED, parameters={}
    )
    sample = TrainingSample.objects.create(
        run=run, step=1, index=0, prompt="a cat", filename="step_1_0.png"
    )
    sample_path(sample).parent.mkdir(parents=True)
    sample_path(sample).write_bytes(image_bytes())
    generation = Generation.objects.create(
        prompt="a cat",
        seed=1,
        parameters={"num_images": 1, "height": 64, "width": 64, "guidance_scale": 5, "steps": 2},
        owner=bob.owner,
        status=Generation.Status.COMPLETED,
        image_count=1,
        finished_at=timezone.now(),
    )
    generations_dir(generation.pk).mkdir(parents=True)
    (generations_dir(generation.pk) / "0.png").write_bytes(image_bytes())
    return Holdings(
        session_id,
        TrainingImage.objects.get(group__session_id=session_id).pk,
        uploaded.json()["lora_filename"],
        sample.pk,
        generation.pk,
    )


def _zip_of_one_image() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", image_bytes())
        archive.writestr("a.txt", "a dog")
    return buffer.getvalue()


def _calls(held: Holdings, session_id: int, other_id: int) -> dict:
    """Every endpoint that names a session, image, LoRA, sample or generation, aimed at
    `session_id` (and `other_id` for the ids that are not sessions')."""
    image = b64(image_bytes())
    return {
        "post_session_image": (
            "post",
            "/post_session_image",
            {"session_id": session_id, "image_base64": image, "prompt": "x"},
        ),
        "session_detail": ("get", f"/sessions/{session_id}", None),
        "images_upload": (
            "multipart",
            f"/sessions/{session_id}/images",
            {"image": [io.BytesIO(image_bytes())], "caption": ["x"]},
        ),
        "images_upload_zip": (
            "multipart",
            f"/sessions/{session_id}/images",
            {"archive": io.BytesIO(_zip_of_one_image())},
        ),
        "session_masks": ("post", f"/sessions/{session_id}/masks", {"kind": "face"}),
        "session_captions": ("post", f"/sessions/{session_id}/captions", {"overwrite": True}),
        "session_image": ("get", f"/sessions/{session_id}/images/{other_id}", None),
        "session_image_update": (
            "patch",
            f"/sessions/{session_id}/images/{other_id}",
            {"caption": "x"},
        ),
        "session_image_delete": ("delete", f"/sessions/{session_id}/images/{other_id}", None),
        "session_image_mask": ("get", f"/sessions/{session_id}/images/{other_id}/mask", None),
        "session_image_mask_set": (
            "put",
            f"/sessions/{session_id}/images/{other_id}/mask",
            {"mask_base64": image},
        ),
        "session_image_mask_delete": (
            "delete",
            f"/sessions/{session_id}/images/{other_id}/mask",
            None,
        ),
        "delete_session": ("post", "/delete_session", {"session_id": session_id}),
        "train_lora": ("post", "/train_lora", {"session_id": session_id, "steps": 1}),
        "train_status": ("post", "/train_status", {"session_id": session_id}),
        "cancel_training": ("post", "/cancel_training", {"session_id": session_id}),
        "get_lora_latest": ("post", "/get_lora", {"session_id": session_id}),
        "get_lora_iteration": ("post", "/get_lora", {"session_id": session_id, "iteration": 1}),
        "get_lora_by_name": (
            "post",
            "/get_lora",
            {"session_id": session_id, "lora_filename": held.lora_filename},
        ),
        "upload_lora": (
            "post",
            "/upload_lora",
            {"session_id": session_id, "lora_base64": b64(lora_bytes(seed=3))},
        ),
        "upload_lora_file": (
            "multipart",
            "/upload_lora",
            {"session_id": session_id, "lora": io.BytesIO(lora_bytes(seed=4))},
        ),
        "txt2img_use_lora": (
            "post",
            "/txt2img",
            {"prompt": "x", "use_lora": True, "session_id": session_id, "async": True},
        ),
        "txt2img_loras": (
            "post",
            "/txt2img",
            {"prompt": "x", "loras": [{"session_id": session_id}], "async": True},
        ),
        "txt2img_loras_by_name": (
            "post",
            "/txt2img",
            {
                "prompt": "x",
                "loras": [{"session_id": session_id, "lora_filename": held.lora_filename}],
                "async": True,
            },
        ),
        "generation_status": ("get", f"/generations/{other_id}", None),
        "generation_image": ("get", f"/generations/{other_id}/0.png", None),
        "generation_cancel": ("post", f"/generations/{other_id}/cancel", None),
        "training_sample": ("get", f"/training_samples/{other_id}.png", None),
    }


# The id each call names besides the session's: which of bob's things.
OTHER_IDS = {
    "session_image": "image_id",
    "session_image_update": "image_id",
    "session_image_delete": "image_id",
    "session_image_mask": "image_id",
    "session_image_mask_set": "image_id",
    "session_image_mask_delete": "image_id",
    "generation_status": "generation_id",
    "generation_image": "generation_id",
    "generation_cancel": "generation_id",
    "training_sample": "sample_id",
}


def _send(api: APIClient, call):
    method, path, body = call
    if method == "get":
        return api.get(path)
    if method == "multipart":
        return api.post(path, body, format="multipart")
    if method == "patch":
        return api.patch(path, body, format="json")
    if method == "put":
        return api.put(path, body, format="json")
    if method == "delete":
        return api.delete(path)
    return api.post(path, body, format="json")


def _without(message: str, *ids: int) -> str:
    for value in ids:
        message = re.sub(rf"\b{value}\b", "<id>", message)
    return message


def _what_bob_has(held: Holdings) -> tuple:
    return (
        Session.objects.filter(pk=held.session_id).exists(),
        list(
            TrainingImage.objects.filter(group__session_id=held.session_id).values_list(
                "caption", flat=True
            )
        ),
        LoraArtifact.objects.filter(session_id=held.session_id).count(),
        TrainingRun.objects.filter(session_id=held.session_id).count(),
        Generation.objects.count(),
        sorted(p.name for p in storage.session_dir(held.session_id).iterdir()),
    )


@pytest.mark.parametrize("name", list(_calls(Holdings(1, 1, "x", 1, 1), 1, 1)))
def test_another_owners_anything_is_a_404_exactly_like_a_missing_one(
    name, alice, bob, bobs, generation_worker
):
    other = getattr(bobs, OTHER_IDS[name]) if name in OTHER_IDS else bobs.image_id
    before = _what_bob_has(bobs)

    theirs = _send(alice.api, _calls(bobs, bobs.session_id, other)[name])
    missing = _send(alice.api, _calls(bobs, MISSING, MISSING)[name])

    assert missing.status_code == 404, missing.content
    assert_error(theirs, 404, "")
    assert _without(theirs.json()["message"], bobs.session_id, other) == _without(
        missing.json()["message"], MISSING
    )
    assert _what_bob_has(bobs) == before  # nothing read, written, trained or deleted


@pytest.mark.parametrize(
    "name",
    [
        "session_detail",
        "session_image",
        "train_status",
        "get_lora_latest",
        "get_lora_by_name",
        "generation_status",
        "generation_image",
        "training_sample",
    ],
)
def test_the_owner_and_an_admin_token_read_what_the_other_owner_cannot(
    name, alice, bob, bobs, admin
):
    other = getattr(bobs, OTHER_IDS[name]) if name in OTHER_IDS else bobs.image_id
    call = _calls(bobs, bobs.session_id, other)[name]
    assert _send(bob.api, call).status_code == 200
    assert _send(admin, call).status_code == 200
    assert _send(alice.api, call).status_code == 404


def test_list_sessions_lists_only_the_callers_own_and_counts_only_those(alice, bob, admin):
    alices = [alice.api.get("/create_session").json()["session_id"] for _ in range(2)]
    bobs = [bob.api.get("/create_session").json()["session_id"] for _ in range(3)]
    before_owners = Session.objects.create()  # a row from before owners (no owner)

    def listed(api, **query):
        body = api.get("/list_sessions", query).json()
        return [int(item["session_id"]) for item in body["sessions"]], body.get("count")

    assert listed(alice.api) == (alices, None)
    assert listed(bob.api) == (bobs, None)
    assert listed(bob.api, limit=2) == (bobs[:2], 3)
    assert listed(alice.api, limit=1, offset=1) == (alices[1:], 2)
    assert listed(admin) == (sorted([*alices, *bobs, before_owners.pk]), None)


def test_a_session_belongs_to_the_owner_of_the_token_that_created_it(alice, admin):
    mine = alice.api.get("/create_session").json()["session_id"]
    operators = admin.get("/create_session").json()["session_id"]
    assert Session.objects.get(pk=mine).owner == alice.owner
    assert Session.objects.get(pk=operators).owner.name == "default"
    assert_error(alice.api.get(f"/sessions/{operators}"), 404, f"session {operators} not found")


def test_a_generation_belongs_to_its_caller_and_only_it_reads_the_status_url(
    alice, bob, generation_worker
):
    response = alice.api.post("/txt2img", {"prompt": "a fox", "async": True}, format="json")
    assert response.status_code == 202
    generation = Generation.objects.get()
    assert generation.owner == alice.owner
    assert alice.api.get(response.json()["status_url"]).status_code == 200
    assert_error(
        bob.api.get(response.json()["status_url"]), 404, f"generation {generation.pk} not found"
    )


def test_a_session_detail_lists_no_generation_of_another_owner(alice, bobs, bob, admin):
    """An admin may generate with bob's LoRA; bob's session page does not list the
    operator's generation (its status URL would be a 404 to bob)."""
    Generation.objects.create(prompt="ops", seed=1, owner=alice.owner)
    detail = bob.api.get(f"/sessions/{bobs.session_id}").json()
    assert detail["recent_generations"] == []


# --- Scopes ---------------------------------------------------------------------------------

SCOPE_OF = {
    "create_session": "upload",
    "post_session_image": "upload",
    "images_upload": "upload",
    "upload_lora": "upload",
    "session_image_update": "upload",
    "session_image_mask_set": "upload",
    "session_image_mask_delete": "upload",
    "list_sessions": "read",
    "session_detail": "read",
    "session_image": "read",
    "session_image_mask": "read",
    "train_status": "read",
    "get_lora_latest": "read",
    "generation_status": "read",
    "generation_image": "read",
    "training_sample": "read",
    "train_lora": "train",
    "cancel_training": "train",
    "txt2img_loras": "generate",
    "generation_cancel": "generate",
    "delete_session": "delete",
    "session_image_delete": "delete",
}


@pytest.mark.parametrize(("name", "scope"), SCOPE_OF.items())
def test_a_call_outside_the_tokens_scopes_is_a_403_naming_the_scope(
    name, scope, bob, bobs, generation_worker
):
    others = [s for s in ("read", "upload", "train", "generate", "delete") if s != scope]
    limited = tenant("bob", others)  # bob's own token, without the scope
    calls = _calls(bobs, bobs.session_id, bobs.image_id) | {
        "create_session": ("get", "/create_session", None),
        "list_sessions": ("get", "/list_sessions", None),
    }
    other = getattr(bobs, OTHER_IDS[name]) if name in OTHER_IDS else bobs.image_id
    call = (calls | _calls(bobs, bobs.session_id, other))[name]
    before = (_what_bob_has(bobs), Session.objects.count())

    assert_error(_send(limited.api, call), 403, f"lacks the '{scope}' scope")
    assert (_what_bob_has(bobs), Session.objects.count()) == before

    with_it = tenant("bob", [scope])
    assert _send(with_it.api, call).status_code != 403


def test_an_admin_scoped_token_sees_every_owners_sessions(bob, bobs):
    operator = tenant("operators", ["admin"])
    assert operator.api.get(f"/sessions/{bobs.session_id}").status_code == 200
    listed = operator.api.get("/list_sessions").json()["sessions"]
    assert [item["session_id"] for item in listed] == [str(bobs.session_id)]


# --- Quotas ---------------------------------------------------------------------------------


def set_quotas(tenant: Tenant, **quotas) -> None:
    Owner.objects.filter(pk=tenant.owner.pk).update(**quotas)


def test_the_sessions_quota_answers_429_and_creates_nothing(alice, bob):
    set_quotas(alice, max_sessions=2)
    for _ in range(2):
        assert alice.api.get("/create_session").status_code == 200
    response = alice.api.get("/create_session")
    assert_error(response, 429, "quota exceeded: sessions")
    assert "Retry-After" not in response  # only deleting a session helps, not time
    assert Session.objects.filter(owner=alice.owner).count() == 2
    assert sorted(p.name for p in storage.session_dir(1).parent.iterdir()) == sorted(
        f"session_{s.pk}" for s in Session.objects.all()
    )
    assert bob.api.get("/create_session").status_code == 200  # bob has his own quota


def test_a_setting_gives_every_owner_its_default_quota_and_an_owner_row_overrides_it(
    settings, alice, bob
):
    settings.SDXL_QUOTA_SESSIONS = 1
    set_quotas(bob, max_sessions=0)  # 0: no limit for bob
    assert alice.api.get("/create_session").status_code == 200
    assert_error(alice.api.get("/create_session"), 429, "sessions")
    assert [bob.api.get("/create_session").status_code for _ in range(3)] == [200] * 3


def test_the_images_per_session_quota_counts_every_image_of_an_upload(alice):
    set_quotas(alice, max_images_per_session=2)
    session_id = alice.api.get("/create_session").json()["session_id"]
    body = {"image": [io.BytesIO(image_bytes()) for _ in range(3)], "caption": ["a", "b", "c"]}
    response = alice.api.post(f"/sessions/{session_id}/images", body, format="multipart")
    assert_error(response, 429, "quota exceeded: images per session")
    assert list(storage.session_dir(session_id).iterdir()) == []
    assert not TrainingImage.objects.exists()

    post = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "x"}
    for _ in range(2):
        assert alice.api.post("/post_session_image", post, format="json").status_code == 200
    assert_error(alice.api.post("/post_session_image", post, format="json"), 429, "images")
    assert TrainingImage.objects.count() == 2


def _noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_stored_bytes_quota_counts_images_and_loras_of_all_the_owners_sessions(alice):
    set_quotas(alice, max_stored_mb=1)
    first = alice.api.get("/create_session").json()["session_id"]
    second = alice.api.get("/create_session").json()["session_id"]
    big = _noise_png(400)  # ~0.5 MB: two fit in 1 MB, three do not
    assert 0.4 * 1024 * 1024 < len(big) < 0.5 * 1024 * 1024
    post = {"session_id": first, "image_base64": b64(big), "prompt": "x"}
    assert alice.api.post("/post_session_image", post, format="json").status_code == 200
    post["session_id"] = second
    assert alice.api.post("/post_session_image", post, format="json").status_code == 200

    response = alice.api.post("/post_session_image", post, format="json")
    assert_error(response, 429, "quota exceeded: stored MB")
    assert TrainingImage.objects.count() == 2
    assert sorted(p.name for p in storage.session_dir(second).iterdir()) == ["0"]
    # A LoRA counts too: one that would pass the limit is refused before it is written.
    LoraArtifact.objects.create(
        session_id=first, number=1, filename="big.safetensors", size=200_000, sha256="0" * 64
    )
    lora = {"session_id": first, "lora_base64": b64(lora_bytes())}
    response = alice.api.post("/upload_lora", lora, format="json")
    assert_error(response, 429, "stored MB")
    assert LoraArtifact.objects.count() == 1


def test_the_stored_bytes_quota_counts_masks(alice):
    set_quotas(alice, max_stored_mb=1)
    session_id = alice.api.get("/create_session").json()["session_id"]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    mask = buffer.getvalue()  # ~2 KB, as stored too: noise does not compress
    # Room for the image alone, not for the image with its mask.
    LoraArtifact.objects.create(
        session_id=session_id,
        number=1,
        filename="big.safetensors",
        size=1024 * 1024 - len(image_bytes()) - len(mask) // 2,
        sha256="0" * 64,
    )
    body = {"image": [io.BytesIO(image_bytes())], "mask": [io.BytesIO(mask)]}

    response = alice.api.post(f"/sessions/{session_id}/images", body, format="multipart")

    assert_error(response, 429, "quota exceeded: stored MB")
    assert not TrainingImage.objects.exists()
    assert list(storage.session_dir(session_id).iterdir()) == []
    post = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "x"}
    assert alice.api.post("/post_session_image", post, format="json").status_code == 200
    url = f"/sessions/{session_id}/images/{TrainingImage.objects.get().pk}/mask"
    response = alice.api.put(url, {"mask_base64": b64(mask)}, format="json")
    assert_error(response, 429, "quota exceeded: stored MB")
    assert TrainingImage.objects.get().mask_file == ""
    assert sorted(p.name for p in (storage.session_dir(session_id) / "0").iterdir()) == [
        "0.png",
        "0.txt",
    ]


def test_two_loras_uploaded_at_once_cannot_pass_the_stored_bytes_quota_together(alice, monkeypatch):
    from training_app.services import loras

    set_quotas(alice, max_stored_mb=1)
    session_id = alice.api.get("/create_session").json()["session_id"]
    lora = lora_bytes()
    # Room for one more LoRA, not for two.
    taken = 1024 * 1024 - len(lora) * 3 // 2
    LoraArtifact.objects.create(
        session_id=session_id, number=99, filename="big.safetensors", size=taken, sha256="0" * 64
    )
    body = {"session_id": session_id, "lora_base64": b64(lora)}
    converting = loras._canonical_lora_for_the_model
    second = []

    def the_other_upload_lands_meanwhile(upload, converted):
        # The first upload has passed the early check and is converting: the second one,
        # sent at the same moment, passes that check too and is stored first.
        if not second:
            second.append(None)
            second[0] = alice.api.post("/upload_lora", body, format="json")
        return converting(upload, converted)

    monkeypatch.setattr(loras, "_canonical_lora_for_the_model", the_other_upload_lands_meanwhile)
    first = alice.api.post("/upload_lora", body, format="json")

    assert second[0].status_code == 200, second[0].json()
    assert_error(first, 429, "quota exceeded: stored MB")
    stored = LoraArtifact.objects.exclude(filename="big.safetensors")
    assert [artifact.filename for artifact in stored] == ["lora_1.safetensors"]
    assert sorted(p.name for p in storage.session_dir(session_id).iterdir()) == [
        "lora_1.safetensors"
    ]


def test_the_generations_per_minute_quota_answers_429_with_retry_after(
    alice, bob, generation_worker
):
    set_quotas(alice, max_generations_per_minute=2)
    body = {"prompt": "a fox", "async": True}
    assert [alice.api.post("/txt2img", body, format="json").status_code for _ in range(2)] == [
        202,
        202,
    ]
    response = alice.api.post("/txt2img", body, format="json")
    assert_error(response, 429, "quota exceeded: generations per minute")
    assert 1 <= int(response["Retry-After"]) <= 60
    assert Generation.objects.filter(owner=alice.owner).count() == 2
    assert bob.api.post("/txt2img", body, format="json").status_code == 202

    # A minute later the window has room again.
    Generation.objects.update(created_at=timezone.now() - timezone.timedelta(seconds=61))
    assert alice.api.post("/txt2img", body, format="json").status_code == 202


def test_queued_generations_are_bounded_per_owner_and_in_all_with_retry_after(
    alice, bob, generation_worker, settings
):
    set_quotas(alice, max_queued_generations=1)
    settings.SDXL_MAX_QUEUED_GENERATIONS = 2
    body = {"prompt": "a fox", "async": True}
    assert alice.api.post("/txt2img", body, format="json").status_code == 202

    over_quota = alice.api.post("/txt2img", body, format="json")
    assert_error(over_quota, 429, "quota exceeded: queued generations")
    assert int(over_quota["Retry-After"]) >= 1
    assert bob.api.post("/txt2img", body, format="json").status_code == 202
    queue_full = bob.api.post("/txt2img", {**body, "async": False}, format="json")
    assert_error(queue_full, 429, "the generation queue is full")
    assert int(queue_full["Retry-After"]) >= 1
    assert Generation.objects.count() == 2

    # A worker takes alice's: it no longer waits, and there is room for one more.
    Generation.objects.filter(owner=alice.owner).update(status=Generation.Status.RUNNING)
    assert alice.api.post("/txt2img", body, format="json").status_code == 202


def test_the_stored_bytes_quota_counts_generated_images_and_refuses_what_cannot_fit(
    alice, generation_worker
):
    set_quotas(alice, max_stored_mb=1)
    body = {"prompt": "a fox", "num_images": 2, "async": True}
    assert alice.api.post("/txt2img", body, format="json").status_code == 202
    generation = Generation.objects.get()
    batches.generation_execute(generation.pk)  # as the worker runs it
    generation.refresh_from_db()
    written = sum(path.stat().st_size for path in generations_dir(generation.pk).iterdir())
    assert generation.stored_bytes == written > 0
    # Less room left than two more 64² PNGs may take (three bytes a pixel at most).
    session_id = alice.api.get("/create_session").json()["session_id"]
    LoraArtifact.objects.create(
        session_id=session_id,
        number=1,
        filename="big.safetensors",
        size=1024 * 1024 - written - 2 * 64 * 64 * 3,
        sha256="0" * 64,
    )

    response = alice.api.post("/txt2img", body, format="json")

    assert_error(response, 429, "quota exceeded: stored MB")
    assert "Retry-After" not in response  # only deleting helps, not time
    assert list(Generation.objects.all()) == [generation]


def _session_with_an_image(tenant: Tenant) -> int:
    session_id = tenant.api.get("/create_session").json()["session_id"]
    body = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "a cat"}
    assert tenant.api.post("/post_session_image", body, format="json").status_code == 200
    return session_id


def test_the_concurrent_trainings_quota_counts_the_owners_queued_and_running_runs(alice, bob):
    set_quotas(alice, max_concurrent_trainings=1)
    first, second = _session_with_an_image(alice), _session_with_an_image(alice)
    assert alice.api.post("/train_lora", {"session_id": first}, format="json").status_code == 200
    response = alice.api.post("/train_lora", {"session_id": second}, format="json")
    assert_error(response, 429, "quota exceeded: concurrent trainings")
    assert not TrainingRun.objects.filter(session_id=second).exists()
    theirs = _session_with_an_image(bob)
    assert bob.api.post("/train_lora", {"session_id": theirs}, format="json").status_code == 200
    # Once the first ends, the second may start.
    assert (
        alice.api.post("/cancel_training", {"session_id": first}, format="json").status_code == 200
    )
    assert alice.api.post("/train_lora", {"session_id": second}, format="json").status_code == 200


def test_a_training_whose_output_cannot_fit_the_stored_bytes_quota_answers_429(alice):
    """The issue's run: 1 MB, checkpoint_every 1, sample_every 1 and 8 prompts wrote 9.9 MB."""
    set_quotas(alice, max_stored_mb=1)
    session_id = _session_with_an_image(alice)
    before = sorted(storage.session_dir(session_id).rglob("*"))
    body = {
        "session_id": session_id,
        "steps": 40,
        "checkpoint_every": 1,
        "sample_every": 1,
        "sample_prompts": [f"prompt {n}" for n in range(8)],
    }
    response = alice.api.post("/train_lora", body, format="json")
    assert_error(response, 429, "quota exceeded: stored MB")
    assert "Retry-After" not in response
    assert not TrainingRun.objects.exists()
    assert sorted(storage.session_dir(session_id).rglob("*")) == before
    # Bounded whatever the quota: a 400 naming the field and its bound.
    response = alice.api.post("/train_lora", {**body, "steps": 150}, format="json")
    assert_error(response, 400, "checkpoint_every: 1 keeps 149 checkpoints")
    assert not TrainingRun.objects.exists()


# --- Without any token: as before owners ---------------------------------------------------


def test_without_any_token_everything_is_open_and_nothing_shows_owners():
    """The single-user default: no Authorization, every endpoint, every session (those of
    before owners too), no quota unless configured."""
    api = APIClient()
    old = Session.objects.create()
    storage.session_dir(old.pk).mkdir(parents=True)
    created = api.get("/create_session").json()["session_id"]
    assert Session.objects.get(pk=created).owner.name == "default"
    listed = api.get("/list_sessions").json()
    assert [item["session_id"] for item in listed["sessions"]] == [str(old.pk), str(created)]
    assert set(listed["sessions"][0]) == {"session_id", "latest_lora", "image_groups", "training"}
    assert api.get(f"/sessions/{old.pk}").status_code == 200
    assert api.post("/delete_session", {"session_id": old.pk}, format="json").status_code == 200


# --- The description ---------------------------------------------------------------------


def test_the_api_schema_names_each_operations_scope_and_its_403_and_429(schema_document):
    scopes, quota_limited = {}, set()
    for path, methods in schema_document["paths"].items():
        for method, operation in methods.items():
            if path == "/healthz":
                assert "403" not in operation["responses"]
                continue
            found = re.search(r"Token scope: `(\w+)`", operation["description"])
            assert found, (method, path)
            scopes[f"{method.upper()} {path}"] = found.group(1)
            assert {"401", "403"} <= set(operation["responses"]), path
            if "429" in operation["responses"]:
                quota_limited.add(f"{method.upper()} {path}")
    # The operations whose services check a quota, and no other.
    assert quota_limited == {
        "GET /create_session",
        "POST /post_session_image",
        "POST /sessions/{session_id}/images",
        "PUT /sessions/{session_id}/images/{image_id}/mask",
        "POST /train_lora",
        "POST /upload_lora",
        "POST /txt2img",
    }
    assert scopes["GET /create_session"] == "upload"
    assert scopes["POST /train_lora"] == "train"
    assert scopes["POST /txt2img"] == "generate"
    assert scopes["POST /delete_session"] == "delete"
    assert scopes["GET /generations/{generation_id}/{index}.{extension}"] == "read"
    bearer = schema_document["components"]["securitySchemes"]["bearerToken"]["description"]
    assert "owner" in bearer and "403" in bearer and "429" in bearer
