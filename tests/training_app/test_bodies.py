"""/train_status' best_checkpoint: the lowest eval loss among the checkpoints and the
final LoRA, the earlier step on a tie, null while none is scored."""

import pytest

from sessions_app import services as session_services
from training_app.bodies import training_status_body
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun

pytestmark = pytest.mark.django_db


def _checkpoint(run: TrainingRun, step: int, eval_loss: float | None) -> None:
    TrainingCheckpoint.objects.create(
        run=run,
        session=run.session,
        step=step,
        filename=f"lora_run{run.pk}_step{step}.safetensors",
        size=1,
        sha256="0" * 64,
        eval_loss=eval_loss,
    )


def test_the_best_checkpoint_is_the_lowest_eval_loss_the_earlier_on_a_tie():
    session = session_services.session_create()
    run = TrainingRun.objects.create(session=session, status="running", total_steps=40)
    assert training_status_body(run)["best_checkpoint"] is None  # nothing scored yet
    _checkpoint(run, 10, None)  # a file from before scores
    assert training_status_body(run)["best_checkpoint"] is None
    _checkpoint(run, 20, 0.4)
    _checkpoint(run, 30, 0.4)
    assert training_status_body(run)["best_checkpoint"] == {
        "step": 20,
        "lora_filename": f"lora_run{run.pk}_step20.safetensors",
        "eval_loss": 0.4,
    }

    run.status, run.eval_loss, run.similarity = "completed", 0.5, 0.25
    run.save()
    LoraArtifact.objects.create(
        session=session,
        number=1,
        filename="lora_1.safetensors",
        size=1,
        sha256="0" * 64,
        source="trained",
        training_run=run,
    )
    run = TrainingRun.objects.get(pk=run.pk)
    body = training_status_body(run)
    assert body["checkpoints"][-1] == {
        "step": 40,
        "lora_filename": "lora_1.safetensors",
        "eval_loss": 0.5,
        "similarity": 0.25,
    }
    assert body["best_checkpoint"]["step"] == 20  # the final LoRA scored worse

    run.eval_loss = 0.4  # a tie with step 20: the earlier stays best
    assert training_status_body(run)["best_checkpoint"]["step"] == 20
    run.eval_loss = 0.1
    assert training_status_body(run)["best_checkpoint"] == {
        "step": 40,
        "lora_filename": "lora_1.safetensors",
        "eval_loss": 0.1,
    }
