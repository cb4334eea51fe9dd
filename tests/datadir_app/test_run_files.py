"""What verify and rescan make of a run's files: checkpoints, sample images and the hidden
resume state (`.resume-run-<id>/`)."""

import pytest
from django.core.management.base import CommandError

from sessions_app import services, storage
from tests.helpers import image_bytes, lora_bytes
from tests.maintenance_helpers import make_old, run, snapshot, stored_checkpoint, stored_samples
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun, TrainingSample
from training_app.services import loras as lora_services
from training_app.services.watch import checkpoint_path, resume_state_dir, sample_path

pytestmark = pytest.mark.django_db(transaction=True, reset_sequences=True)


@pytest.fixture
def trained_session():
    """A session with an image and a LoRA, and a completed run with three checkpoints and
    two sample images, stored as the worker stores them."""
    session = services.session_create()
    services.session_image_add(session.pk, image_bytes(), "a red square")
    lora_services.lora_upload(session.pk, lora_bytes(seed=1), None)
    training = TrainingRun.objects.create(session=session, status="completed")
    for step in (2, 4, 6):
        stored_checkpoint(training, step, seed=step)
    stored_samples(training, 2, prompts=("a red square", "a cat"))
    session.refresh_from_db()
    return session, training


def _runs_rows() -> tuple:
    return (
        list(
            TrainingCheckpoint.objects.values_list("run_id", "step", "filename", "size", "sha256")
        ),
        list(TrainingSample.objects.values_list("run_id", "step", "index", "filename")),
    )


def test_verify_and_rescan_pass_on_what_the_worker_stored(trained_session):
    session, _ = trained_session

    output = run("verify")

    assert "1 LoRA files, 3 checkpoints, 2 sample images checked" in output
    assert "the rows and files agree" in output and "note" not in output
    assert "rescan: 0 changes" in run("rescan")
    # A checkpoint is never a LoRA of the session: no row, no number taken.
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_1.safetensors"]
    session.refresh_from_db()
    assert session.next_lora_number == 2


def test_verify_reports_checkpoint_and_sample_mismatches_and_fix_repairs_them(
    trained_session, data_dir
):
    session, training = trained_session
    gone, altered, broken = TrainingCheckpoint.objects.order_by("step")
    checkpoint_path(gone).unlink()  # row without file: fixable
    checkpoint_path(altered).write_bytes(lora_bytes(seed=42, rank=4))  # row differs: fixable
    checkpoint_path(broken).write_bytes(b"not a safetensors file")  # needs a person
    stray = storage.session_dir(session.pk) / "checkpoints" / "lora_run99_step1.safetensors"
    stray.write_bytes(lora_bytes(seed=7))  # a file without a row: a note, never a LoRA
    missing_sample, kept_sample = TrainingSample.objects.all()
    sample_path(missing_sample).unlink()  # row without file: fixable
    # A size the stored-MB quota would miscount: fixable.
    TrainingSample.objects.filter(pk=kept_sample.pk).update(size=1)

    with pytest.raises(CommandError, match="5 inconsistencies; `verify --fix`"):
        run("verify")
    before = snapshot(data_dir), _runs_rows()
    with pytest.raises(CommandError, match="5 inconsistencies"):
        run("verify")
    assert (snapshot(data_dir), _runs_rows()) == before  # verify alone changes nothing

    with pytest.raises(CommandError) as failure:
        run("verify", "--fix")

    assert "1 inconsistencies" in str(failure.value)  # only the unreadable checkpoint
    assert list(TrainingCheckpoint.objects.order_by("step").values_list("pk", flat=True)) == [
        altered.pk,
        broken.pk,
    ]
    altered.refresh_from_db()
    assert altered.sha256 == storage.sha256_bytes(checkpoint_path(altered).read_bytes())
    assert altered.size == checkpoint_path(altered).stat().st_size
    broken.refresh_from_db()
    assert broken.size != len(b"not a safetensors file")  # its row is left as it was
    assert checkpoint_path(broken).read_bytes() == b"not a safetensors file"
    assert list(TrainingSample.objects.all()) == [kept_sample]
    assert TrainingSample.objects.get().size == sample_path(kept_sample).stat().st_size > 1
    # The stray file stays, with no row of either kind and no number taken.
    assert stray.read_bytes() == lora_bytes(seed=7)
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_1.safetensors"]
    session.refresh_from_db()
    assert session.next_lora_number == 2
    assert training.checkpoints.count() == 2

    checkpoint_path(broken).write_bytes(lora_bytes(seed=6))  # a person restores it
    output = run("verify", "--fix")
    assert "the rows and files agree" in output
    assert f"note      session_data/session_{session.pk}/checkpoints/{stray.name}: " in output
    assert "no checkpoint row" in output


def test_rescan_follows_a_checkpoint_removed_by_hand(trained_session):
    _, training = trained_session
    first = training.checkpoints.order_by("step").first()
    checkpoint_path(first).unlink()

    output = run("rescan")

    assert "rescan: 1 changes" in output
    assert list(training.checkpoints.values_list("step", flat=True)) == [4, 6]


def test_resume_state_is_kept_while_its_run_is_active_and_goes_once_it_ended_and_is_stale(
    trained_session,
):
    session, completed = trained_session
    running = TrainingRun.objects.create(session=session, status="running")
    failed = TrainingRun.objects.create(session=session, status="error")
    ended_fresh = TrainingRun.objects.create(session=session, status="completed")

    def resume_state(run_id: int, old: bool):
        folder = resume_state_dir(session.pk, run_id)
        folder.mkdir()
        (folder / "resume.pt").write_bytes(b"state")
        (folder / ".resume.pt.1234.tmp").write_bytes(b"half written")
        if old:
            for path in (folder / "resume.pt", folder / ".resume.pt.1234.tmp", folder):
                make_old(path)
        return folder

    active = resume_state(running.pk, old=True)  # a run saving rarely: old, still in use
    ended = [resume_state(completed.pk, old=True), resume_state(failed.pk, old=True)]
    orphan = resume_state(999, old=True)  # no run row at all
    fresh = resume_state(ended_fresh.pk, old=False)  # may still be being removed: left

    with pytest.raises(CommandError, match="3 inconsistencies"):
        run("verify")
    output = run("verify", "--fix")

    assert "the rows and files agree" in output
    for folder in [*ended, orphan]:
        assert not folder.exists()
        assert f"{storage.relative_path(folder)} is the resume state of run" in output
    # Nothing inside the running run's state is touched, not even its stale *.tmp.
    assert sorted(p.name for p in active.iterdir()) == [".resume.pt.1234.tmp", "resume.pt"]
    assert fresh.is_dir()

    TrainingRun.objects.filter(pk=running.pk).update(status="completed")
    assert "is the resume state of run" in run("verify", "--fix")
    assert not active.exists()
