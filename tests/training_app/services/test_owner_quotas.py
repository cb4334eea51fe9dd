"""training_app.services.owner_quotas: the stored-MB quota against what trainings write."""

import pytest

from access_app.callers import Caller
from access_app.models import SCOPES
from access_app.selectors import owner_stored_bytes
from core.errors import ServiceError
from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import FAST_TRAINING
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun
from training_app.services import owner_quotas
from training_app.services import runs as run_services
from training_app.services.watch import checkpoint_path, resume_state_dir

pytestmark = pytest.mark.django_db

MB = 1024 * 1024


def _owners_caller(session) -> Caller:
    return Caller("the owner's token", session.owner_id, frozenset(SCOPES))


def _folder_listing(session) -> list[str]:
    folder = storage.session_dir(session.pk)
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_training_whose_output_cannot_fit_is_refused_before_anything_is_created(
    session_with_images, settings
):
    """The issue's run at tiny scale: 39 checkpoints, the final LoRA and 320 samples do not
    fit a 1 MB quota."""
    settings.SDXL_QUOTA_STORED_MB = 1
    before = _folder_listing(session_with_images)
    watched = {
        **FAST_TRAINING,
        "steps": 40,
        "checkpoint_every": 1,
        "sample_every": 1,
        "sample_prompts": [f"prompt {n}" for n in range(8)],
    }
    with pytest.raises(ServiceError, match="quota exceeded: stored MB") as refused:
        run_services.training_run_start(
            session_with_images.pk, watched, caller=_owners_caller(session_with_images)
        )
    assert refused.value.status == 429
    assert not TrainingRun.objects.exists()
    assert _folder_listing(session_with_images) == before


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"steps": 150, "checkpoint_every": 1},
            "checkpoint_every: 1 keeps 149 checkpoints in a run of up to 150 steps, more than "
            "the 100 a run may keep: at least 2",
        ),
        (
            {"steps": 60, "sample_every": 1, "sample_prompts": ["a"] * 8},
            "sample_every: 1 renders 480 sample images (8 prompts) in a run of up to 60 steps, "
            "more than the 400 a run may render: at least 2",
        ),
    ],
)
def test_checkpoint_every_and_sample_every_are_bounded_per_run(session_with_images, given, message):
    with pytest.raises(ServiceError) as refused:
        run_services.training_run_start(session_with_images.pk, {**FAST_TRAINING, **given})
    assert (refused.value.status, refused.value.message) == (400, message + " (or 0: none)")
    assert not TrainingRun.objects.exists()


def test_a_run_that_grows_past_the_quota_stops_keeping_its_latest_checkpoint(
    session_with_images, settings, monkeypatch
):
    settings.SDXL_QUOTA_STORED_MB = 1
    watched = {**FAST_TRAINING, "steps": 4, "checkpoint_every": 1}
    # The estimate lets it start...
    run = run_services.training_run_start(
        session_with_images.pk, watched, caller=_owners_caller(session_with_images)
    )
    elsewhere = session_services.session_create(owner_id=session_with_images.owner_id)
    real_store = run_services.checkpoint_store

    def an_upload_lands_after_the_first_checkpoint(run, step, written, sha256):
        real_store(run, step, written, sha256)
        if step == 1:  # ...then the owner's other files leave one byte of room
            room = MB - owner_stored_bytes(session_with_images.owner_id) - 1
            LoraArtifact.objects.create(
                session=elsewhere, number=1, filename="big.safetensors", size=room, sha256=""
            )

    monkeypatch.setattr(
        run_services, "checkpoint_store", an_upload_lands_after_the_first_checkpoint
    )
    run_services.training_run_execute(run.pk)

    run.refresh_from_db()
    latest = f"lora_run{run.pk}_step2.safetensors"
    assert run.status == "error" and run.step == 2
    assert run.error_message.startswith("quota exceeded: stored MB (owner 'default' may have 1,")
    assert f"training stopped at step 2; its latest checkpoint {latest} is kept" in (
        run.error_message
    )
    kept = TrainingCheckpoint.objects.filter(run=run)
    assert [checkpoint.step for checkpoint in kept] == [1, 2]
    assert all(checkpoint_path(checkpoint).is_file() for checkpoint in kept)
    assert not LoraArtifact.objects.filter(session=session_with_images).exists()
    assert not resume_state_dir(session_with_images.pk, run.pk).exists()


def test_a_lora_files_size_is_estimated_from_its_rank_and_the_models_modules(
    session_with_images,
):
    run = run_services.training_run_start(session_with_images.pk, {**FAST_TRAINING, "rank": 8})
    run_services.training_run_execute(run.pk)
    written = LoraArtifact.objects.get().size
    estimate = owner_quotas.lora_file_bytes(8, train_text_encoder=False)
    # The weights exactly, the header's share at most: within 25% on the tiny model (whose
    # header is a large part of its files), within 1% for SDXL's.
    assert written <= estimate <= written * 1.25
    assert owner_quotas.lora_file_bytes(8, True) > estimate
    assert owner_quotas.lora_file_bytes(16, False) > estimate
