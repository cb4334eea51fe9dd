import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from django.utils import timezone
from PIL import Image

from core.errors import ServiceError
from datadir_app.rescan import rescan_session
from sdxl_engine.errors import EngineError
from sdxl_engine.files import sha256_file
from sdxl_engine.image_output import lora_short_hash, read_infotext
from sdxl_engine.parameters import LoraChoice
from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import image_bytes, images_close
from training_app import bodies, jobs
from training_app.models import Generation, LoraArtifact
from training_app.services import loras as lora_services
from training_app.services import runs as run_services
from training_app.services.generations import batches, lifecycle
from training_app.services.generations.requests import GenerationRequest, generation_request

pytestmark = pytest.mark.django_db

SMALL = {"height": 64, "width": 64, "steps": 5}


def test_request_without_a_live_worker_is_503_and_records_nothing():
    with pytest.raises(ServiceError) as error:
        generation_request(GenerationRequest(prompt="x"))
    assert error.value.status == 503 and "no generation worker" in error.value.message
    assert not Generation.objects.exists()


def test_stale_heartbeat_counts_as_no_worker(generation_worker, settings):
    generation_worker.last_seen = timezone.now() - timezone.timedelta(
        seconds=settings.SDXL_WORKER_STALE_AFTER + 1
    )
    generation_worker.save()
    with pytest.raises(ServiceError) as error:
        generation_request(GenerationRequest(prompt="x"))
    assert error.value.status == 503


def test_request_execute_wait_returns_pngs_of_the_asked_size(generation_worker):
    generation = generation_request(
        GenerationRequest(prompt="a cat", num_images=2, seed=7, **SMALL)
    )
    assert generation.status == "queued" and generation.seed == 7
    batches.generation_execute(generation.pk)
    finished, pngs = lifecycle.generation_wait(generation.pk, timeout_s=5)
    assert finished.status == "completed" and finished.image_count == 2
    assert finished.duration_ms is not None
    for index, png in enumerate(pngs):
        image = Image.open(io.BytesIO(png))
        assert (image.format, image.size) == ("PNG", (64, 64))
        assert json.loads(image.text["sdxl_service"])["seed"] == 7 + index  # its own seed


def test_pngs_carry_the_parameters_as_sdxl_tools_write_them(generation_worker):
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64)), "red")
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    run_services.training_run_execute(run.pk)
    generation = generation_request(
        GenerationRequest(
            prompt="a red apple, studio light",
            negative_prompt="blurry",
            guidance_scale=5.5,
            seed=123,
            use_lora=True,
            session_id=session.pk,
            lora_scale=0.8,
            **SMALL,
        )
    )
    batches.generation_execute(generation.pk)
    finished, pngs = lifecycle.generation_wait(generation.pk, timeout_s=5)

    text = Image.open(io.BytesIO(pngs[0])).text
    prompt, negative, settings_line = text["parameters"].split("\n")
    # The LoRA in the prompt as AUTOMATIC1111 writes it, so its PNG Info re-applies it.
    assert prompt == "a red apple, studio light <lora:lora_1:0.8>"
    assert negative == "Negative prompt: blurry"
    # "Key: value" pairs as AUTOMATIC1111 writes them; values holding ", :" are quoted.
    fields = dict(re.findall(r'([A-Za-z0-9 ]+): ("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)', settings_line))
    assert fields["Steps"] == "5" and fields["CFG scale"] == "5.5" and fields["Seed"] == "123"
    assert fields["Size"] == "64x64" and fields["Refiner switch at"] == "0.8"
    lora_file = storage.session_dir(session.pk) / "lora_1.safetensors"
    assert fields["Lora hashes"] == f'"lora_1: {lora_short_hash(lora_file)}"'
    # The models by name (the tiny preset's), never the folders they load from.
    assert (fields["Model"], fields["Refiner"]) == ("tiny", "tiny-refiner")
    record = json.loads(text["sdxl_service"])
    assert (record["seed"], record["lora"], record["lora_scale"]) == (
        123,
        "lora_1.safetensors",
        0.8,
    )


def test_seed_is_random_and_63_bit_when_absent(generation_worker):
    seeds = {generation_request(GenerationRequest(prompt="x")).seed for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= seed < 2**63 for seed in seeds)


def test_same_seed_same_image_and_lora_changes_it(generation_worker):
    session = session_services.session_create()
    for color in ("red", "blue"):
        session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64), color), color)
    run = run_services.training_run_start(
        session.pk, {"steps": 3, "resolution": 64, "learning_rate": 0.05, "seed": 3}
    )
    run_services.training_run_execute(run.pk)

    def png(**extra) -> bytes:
        generation = generation_request(GenerationRequest(prompt="red", seed=11, **SMALL, **extra))
        batches.generation_execute(generation.pk)
        return lifecycle.generation_wait(generation.pk, timeout_s=5)[1][0]

    plain = png()
    with_lora = png(use_lora=True, session_id=session.pk)
    assert png() == plain  # the LoRA was applied for its request only
    assert with_lora != plain
    assert Generation.objects.filter(applied_loras__filename="lora_1.safetensors").count() == 1


def test_use_lora_without_any_lora_is_404(generation_worker):
    session = session_services.session_create()
    with pytest.raises(ServiceError) as error:
        generation_request(GenerationRequest(prompt="x", use_lora=True, session_id=session.pk))
    assert (error.value.status, error.value.message) == (404, "Requested LoRA not found")


def test_executing_twice_generates_once(generation_worker):
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    batches.generation_execute(generation.pk)
    first_finish = Generation.objects.get(pk=generation.pk).finished_at
    batches.generation_execute(generation.pk)
    assert Generation.objects.get(pk=generation.pk).finished_at == first_finish


def test_wait_gives_503_and_abandons_when_the_worker_goes_away(generation_worker):
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    generation_worker.delete()
    with pytest.raises(ServiceError) as error:
        lifecycle.generation_wait(generation.pk, timeout_s=5)
    assert error.value.status == 503
    assert Generation.objects.get(pk=generation.pk).status == "abandoned"
    batches.generation_execute(generation.pk)  # a late delivery does no work
    assert Generation.objects.get(pk=generation.pk).status == "abandoned"


def _stale(settings) -> timezone.datetime:
    return timezone.now() - timezone.timedelta(seconds=settings.SDXL_WORKER_STALE_AFTER + 1)


def test_a_job_process_lost_mid_job_answers_503_at_once_and_records_why(
    generation_worker, settings
):
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    # The job's process took it, then died (kill -9): the row's own heartbeat goes stale,
    # while the worker's main process (generation_worker) still beats.
    Generation.objects.filter(pk=generation.pk).update(
        status=Generation.Status.RUNNING, started_at=_stale(settings), heartbeat_at=_stale(settings)
    )
    started = time.monotonic()
    with pytest.raises(ServiceError) as error:
        lifecycle.generation_wait(generation.pk, timeout_s=60)
    assert time.monotonic() - started < 5
    assert error.value.status == 503 and error.value.message == lifecycle.WORKER_LOST_MESSAGE
    row = Generation.objects.get(pk=generation.pk)
    assert row.status == "error" and row.error_message == lifecycle.WORKER_LOST_MESSAGE
    assert row.finished_at is not None


def test_end_lost_ends_only_running_generations_with_a_stale_heartbeat_and_frees_redelivery(
    queue_namespace, generation_worker, settings, monkeypatch
):
    # A queue of its own: redelivery waits while the broker holds any task, and on Redis
    # the shared queue may hold tasks other tests enqueued.
    settings.SDXL_WORKER_STALE_AFTER = 30  # the worker's own heartbeat is fresh
    lost, alive, old_row, waiting = (
        generation_request(GenerationRequest(prompt=p, **SMALL))
        for p in ("lost", "alive", "old row", "waiting")
    )
    running = {"status": Generation.Status.RUNNING, "started_at": _stale(settings)}
    Generation.objects.filter(pk=lost.pk).update(**running, heartbeat_at=_stale(settings))
    Generation.objects.filter(pk=alive.pk).update(**running, heartbeat_at=timezone.now())
    # Claimed before heartbeats existed: its start counts as its last beat.
    Generation.objects.filter(pk=old_row.pk).update(**running, heartbeat_at=None)
    Generation.objects.filter(pk=waiting.pk).update(created_at=_stale(settings))
    redelivered = []
    monkeypatch.setattr(jobs, "enqueue", lambda kind, row_id: redelivered.append(row_id))
    assert jobs.redeliver(lifecycle.GENERATIONS) == []  # running rows hold it back

    assert sorted(jobs.end_lost(lifecycle.GENERATIONS)) == sorted([lost.pk, old_row.pk])

    assert _statuses(lost, alive, old_row, waiting) == ["error", "running", "error", "queued"]
    assert jobs.end_lost(lifecycle.GENERATIONS) == []  # nothing twice
    assert jobs.redeliver(lifecycle.GENERATIONS) == []  # the live one may yet batch it
    Generation.objects.filter(pk=alive.pk).update(status=Generation.Status.COMPLETED)
    assert jobs.redeliver(lifecycle.GENERATIONS) == [waiting.pk] == redelivered


@pytest.mark.django_db(transaction=True)
def test_the_job_process_beats_its_rows_while_the_engine_runs(
    generation_worker, settings, monkeypatch
):
    import sdxl_engine.generation.render

    settings.SDXL_WORKER_STALE_AFTER = 0.4  # a beat every 0.1 s
    real_render_batch = sdxl_engine.generation.render.render_batch
    beats = []

    def slow_render_batch(*args, **kwargs):
        for _ in range(5):
            time.sleep(0.2)
            beats.append(Generation.objects.get(pk=generation.pk).heartbeat_at)
        return real_render_batch(*args, **kwargs)

    monkeypatch.setattr(sdxl_engine.generation.render, "render_batch", slow_render_batch)
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    batches.generation_execute(generation.pk)

    assert len(set(beats)) >= 3, beats  # fresh beats while the engine worked
    row = Generation.objects.get(pk=generation.pk)
    assert row.status == "completed" and row.worker.endswith(f":{os.getpid()}")


def test_cancel_a_queued_generation_at_once_and_it_never_runs(generation_worker):
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    cancelled = lifecycle.generation_cancel(generation.pk)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert cancelled.error_message == lifecycle.CANCELLED_BY_REQUEST
    batches.generation_execute(generation.pk)  # its task, delivered late
    assert _statuses(generation) == ["cancelled"] and _files(generation) == {}


def test_cancel_of_an_ended_generation_answers_it_unchanged_and_unknown_is_404(
    generation_worker,
):
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    batches.generation_execute(generation.pk)
    before = Generation.objects.get(pk=generation.pk)
    after = lifecycle.generation_cancel(generation.pk)
    assert (after.status, after.finished_at, after.image_count) == (
        "completed",
        before.finished_at,
        1,
    )
    with pytest.raises(ServiceError) as error:
        lifecycle.generation_cancel(generation.pk + 1000)
    assert error.value.status == 404
    assert Generation.objects.count() == 1


LONG = {"height": 64, "width": 64, "steps": 12}


def _cancel_at_step(monkeypatch, step: int, cancelled: list[int]) -> list[int]:
    """Makes the worker cancel `cancelled` when its batch reaches `step` (as a client's
    POST .../cancel would, from outside), with progress written at every step; returns the
    steps the engine reported."""
    monkeypatch.setattr(batches, "_PROGRESS_INTERVAL_S", 0)
    real_recorder = batches._progress_recorder
    steps = []

    def recorder(generation_ids):
        record = real_recorder(generation_ids)

        def on_step(done, total):
            steps.append(done)
            if done == step:
                for generation_id in cancelled:
                    lifecycle.generation_cancel(generation_id)
            record(done, total)

        return on_step

    monkeypatch.setattr(batches, "_progress_recorder", recorder)
    return steps


def test_a_running_generation_cancelled_stops_between_steps_and_writes_nothing(
    generation_worker, monkeypatch
):
    generation = generation_request(GenerationRequest(prompt="x", seed=3, **LONG))
    steps = _cancel_at_step(monkeypatch, 3, [generation.pk])

    batches.generation_execute(generation.pk)

    assert steps == [1, 2, 3]  # not one step more
    row = Generation.objects.get(pk=generation.pk)
    assert (row.status, row.image_count, row.error_message) == (
        "cancelled",
        0,
        lifecycle.CANCELLED_BY_REQUEST,
    )
    assert row.step == 2 and row.step < row.total_steps == 12
    assert _files(generation) == {}
    # The pipelines serve the next request as if nothing had happened.
    monkeypatch.undo()
    again = generation_request(GenerationRequest(prompt="x", seed=3, **LONG))
    batches.generation_execute(again.pk)
    assert _statuses(again) == ["completed"]


def test_in_a_batch_a_cancelled_request_gets_no_images_and_the_others_complete(
    generation_worker, settings, monkeypatch
):
    settings.SDXL_GENERATION_BATCH_IMAGES = 4
    lead, companion = (
        generation_request(GenerationRequest(prompt=p, **LONG))
        for p in ("a red apple", "a blue car")
    )
    steps = _cancel_at_step(monkeypatch, 3, [companion.pk])

    batches.generation_execute(lead.pk)

    assert steps[-1] == 12  # the batch went on for the request still wanted
    assert _statuses(lead, companion) == ["completed", "cancelled"]
    assert _files(companion) == {} and list(_files(lead)) == ["0.png"]
    assert Generation.objects.get(pk=companion.pk).image_count == 0


def _running_generation() -> Generation:
    """A generation a live worker runs (just claimed, beating)."""
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    Generation.objects.filter(pk=generation.pk).update(
        status=Generation.Status.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now()
    )
    return generation


def test_a_waiting_client_that_goes_away_cancels_its_running_generation(generation_worker):
    generation = _running_generation()
    with pytest.raises(ServiceError) as error:
        lifecycle.generation_wait(generation.pk, timeout_s=60, client_gone=lambda: True)
    assert error.value.status == 499
    row = Generation.objects.get(pk=generation.pk)
    assert (row.status, row.error_message) == ("cancelled", lifecycle.CANCELLED_CLIENT_GONE)


def test_a_waiting_client_that_goes_away_abandons_its_queued_generation(generation_worker):
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    with pytest.raises(ServiceError) as error:
        lifecycle.generation_wait(generation.pk, timeout_s=60, client_gone=lambda: True)
    assert error.value.status == 499 and _statuses(generation) == ["abandoned"]


def test_a_504_cancels_the_running_generation(generation_worker):
    generation = _running_generation()
    with pytest.raises(ServiceError) as error:
        lifecycle.generation_wait(generation.pk, timeout_s=0.3, client_gone=lambda: False)
    assert error.value.status == 504
    row = Generation.objects.get(pk=generation.pk)
    assert (row.status, row.error_message) == ("cancelled", lifecycle.CANCELLED_TIMED_OUT)


def test_a_generation_judged_lost_is_not_completed_by_its_late_worker(
    generation_worker, settings, monkeypatch
):
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    real_claim = jobs.claim

    def claim_then_judged_lost(kind, generation_id, **fields):
        claimed = real_claim(kind, generation_id, **fields)
        Generation.objects.filter(pk=generation_id).update(heartbeat_at=_stale(settings))
        assert jobs.end_lost(lifecycle.GENERATIONS) == [generation_id]
        return claimed

    monkeypatch.setattr(jobs, "claim", claim_then_judged_lost)
    batches.generation_execute(generation.pk)
    row = Generation.objects.get(pk=generation.pk)
    assert (row.status, row.error_message) == ("error", lifecycle.WORKER_LOST_MESSAGE)
    assert _files(generation) == {}


def test_wait_times_out_with_504(generation_worker):
    generation = generation_request(GenerationRequest(prompt="x", **SMALL))
    with pytest.raises(ServiceError) as error:
        lifecycle.generation_wait(generation.pk, timeout_s=0.3)
    assert error.value.status == 504


# A LoRA strong enough that its strength shows in a 64x64 image after 5 steps.
STRONG_TRAINING = {
    "steps": 4,
    "batch_size": 2,
    "learning_rate": 5e-2,
    "rank": 4,
    "resolution": 64,
    "seed": 7,
}


@pytest.mark.parametrize(
    "arrives_as", ["diffusers file found by rescan", "kohya file found by rescan", "kohya upload"]
)
def test_a_lora_with_alpha_twice_rank_generates_what_stock_diffusers_does(
    generation_worker, tmp_path, arrives_as
):
    """A session's LoRA written by another trainer with alpha = 2 x rank, reaching the
    session without conversion (rescan, verify --fix and import_sessions record found files
    as they are) or through /upload_lora (converted), gives the image stock diffusers'
    load_lora_weights gives for the same file and seed: neither half nor double strength."""
    from sdxl_engine.generation import generate
    from tests.lora_variants import (
        write_diffusers_lora_with_alpha_twice_rank,
        write_kohya_lora_with_alpha_twice_rank,
    )
    from training_app.runtime import generation_pipelines

    session = session_services.session_create()
    for color in ("red", "blue"):
        session_services.session_image_add(session.pk, image_bytes(color=color), color)
    run_services.training_run_execute(
        run_services.training_run_start(session.pk, STRONG_TRAINING).pk
    )
    folder = storage.session_dir(session.pk)
    trained = folder / "lora_1.safetensors"
    if arrives_as.startswith("diffusers"):
        written = write_diffusers_lora_with_alpha_twice_rank(trained, tmp_path)
    else:
        written = write_kohya_lora_with_alpha_twice_rank(trained, tmp_path / "kohya.safetensors")
    if arrives_as.endswith("rescan"):
        shutil.copyfile(written, folder / "from_another_trainer.safetensors")
        rescan_session(session.pk)
        artifact = LoraArtifact.objects.get(filename="from_another_trainer.safetensors")
        assert artifact.source == "found" and artifact.sha256 == sha256_file(written)
    else:
        artifact = lora_services.lora_upload(session.pk, written.read_bytes(), None)
    request = {"prompt": "a red square", "seed": 3, **SMALL}

    lora = {"use_lora": True, "session_id": session.pk, "iteration": artifact.number}
    generation = generation_request(GenerationRequest(**lora, **request))
    batches.generation_execute(generation.pk)
    _, pngs = lifecycle.generation_wait(generation.pk, timeout_s=5)
    ours = [Image.open(io.BytesIO(png)) for png in pngs]

    pipelines = generation_pipelines()
    pipelines.base.load_lora_weights(str(written))
    try:
        stock = generate(pipelines, **request)
    finally:
        pipelines.base.unload_lora_weights()
    without_lora = generate(pipelines, **request)
    assert images_close(ours, stock)
    assert not images_close(ours, without_lora, tolerance=8)  # the LoRA shows


# Batching: the worker runs queued requests that share size, steps, guidance and LoRA as
# one batch (generate_batch). 64x64, 4 steps.
BATCHED = {"height": 64, "width": 64, "steps": 4}


def _queue(prompt: str, num_images: int = 1, seed: int = 1, **extra) -> Generation:
    return generation_request(
        GenerationRequest(prompt=prompt, num_images=num_images, seed=seed, **{**BATCHED, **extra})
    )


def _statuses(*queued: Generation) -> list[str]:
    return [Generation.objects.get(pk=generation.pk).status for generation in queued]


def _files(generation: Generation) -> dict[str, bytes]:
    """The files in the generation's folder, by name (none when it has no folder)."""
    folder = lifecycle.generations_dir(generation.pk)
    return {path.name: path.read_bytes() for path in folder.iterdir()} if folder.exists() else {}


def _images(generation: Generation) -> list[Image.Image]:
    files = _files(generation)
    return [Image.open(io.BytesIO(files[f"{i}.png"])) for i in range(len(files))]


def _alone(generation: Generation) -> list[Image.Image]:
    """What the engine gives the generation's request run alone, with its seed."""
    from sdxl_engine.generation import generate
    from training_app.runtime import generation_pipelines

    params = generation.parameters
    return generate(
        generation_pipelines(),
        prompt=generation.prompt,
        negative_prompt=generation.negative_prompt,
        num_images=params["num_images"],
        seed=generation.seed,
        height=params["height"],
        width=params["width"],
        steps=params["steps"],
        guidance_scale=params["guidance_scale"],
    )


def test_one_call_completes_the_compatible_queued_requests_and_their_tasks_do_nothing(
    generation_worker, settings
):
    settings.SDXL_GENERATION_BATCH_IMAGES = 4
    lead = _queue("a red apple", seed=1)
    taller = _queue("a tall tree", seed=2, height=48)  # another size: never in this batch
    two = _queue("a blue car", num_images=2, seed=3, negative_prompt="blurry")
    last = _queue("a cat", seed=4)

    batches.generation_execute(lead.pk)

    batch = [lead, two, last]
    assert _statuses(*batch, taller) == ["completed", "completed", "completed", "queued"]
    rows = {row.pk: row for row in Generation.objects.filter(pk__in=[g.pk for g in batch])}
    for generation, count in zip(batch, [1, 2, 1], strict=True):
        row = rows[generation.pk]
        assert row.image_count == count and row.duration_ms is not None
        assert sorted(_files(generation)) == [f"{i}.png" for i in range(count)]
        for index, image in enumerate(_images(generation)):
            assert (image.format, image.size) == ("PNG", (64, 64))
            record = json.loads(image.text["sdxl_service"])
            assert (record["prompt"], record["seed"]) == (
                generation.prompt,
                generation.seed + index,
            )
    assert _files(taller) == {}
    written = {generation.pk: _files(generation) for generation in batch}
    finished = {pk: row.finished_at for pk, row in rows.items()}

    # The tasks of the rows that ran in the batch arrive later and do nothing.
    for generation in (two, last, lead):
        batches.generation_execute(generation.pk)
    batches.generation_execute(taller.pk)

    for generation in batch:
        row = Generation.objects.get(pk=generation.pk)
        assert (row.status, row.finished_at) == ("completed", finished[generation.pk])
        assert _files(generation) == written[generation.pk]
    row = Generation.objects.get(pk=taller.pk)
    assert (row.status, row.image_count) == ("completed", 1)
    assert _images(taller)[0].size == (64, 48)


def test_a_batch_takes_the_oldest_requests_that_fit_its_image_cap(generation_worker, settings):
    settings.SDXL_GENERATION_BATCH_IMAGES = 3
    lead = _queue("a red apple", num_images=2, seed=1)
    too_many = _queue("a blue car", num_images=2, seed=2)  # 2 + 2 > 3: left for later
    fits = _queue("a cat", num_images=1, seed=3)

    batches.generation_execute(lead.pk)

    assert _statuses(lead, too_many, fits) == ["completed", "queued", "completed"]
    assert [len(_files(g)) for g in (lead, too_many, fits)] == [2, 0, 1]
    batches.generation_execute(too_many.pk)
    assert _statuses(too_many) == ["completed"] and len(_files(too_many)) == 2


def test_a_batch_cap_of_one_image_turns_batching_off(generation_worker, settings):
    settings.SDXL_GENERATION_BATCH_IMAGES = 1
    lead = _queue("a red apple", num_images=2, seed=1)  # more than the cap: runs, alone
    other = _queue("a blue car", seed=2)

    batches.generation_execute(lead.pk)

    assert _statuses(lead, other) == ["completed", "queued"]
    assert Generation.objects.get(pk=lead.pk).image_count == 2
    assert _files(other) == {}


def test_requests_of_another_lora_or_of_none_are_never_batched_together(
    generation_worker, settings
):
    """Two sessions' lora_1.safetensors (the same name, other contents) and no LoRA: three
    batches, however the rows interleave in the queue."""
    settings.SDXL_GENERATION_BATCH_IMAGES = 4
    sessions = []
    for seed in (1, 2):
        session = session_services.session_create()
        session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64)), "red")
        run = run_services.training_run_start(
            session.pk, {"steps": 1, "resolution": 64, "seed": seed}
        )
        run_services.training_run_execute(run.pk)
        sessions.append(session)
    first_lora, second_lora = (
        LoraArtifact.objects.get(session=session, filename="lora_1.safetensors")
        for session in sessions
    )
    assert first_lora.sha256 != second_lora.sha256

    def with_lora(session, seed):
        return _queue("a red square", seed=seed, use_lora=True, session_id=session.pk)

    plain = _queue("a red square", seed=1)
    first_a = with_lora(sessions[0], 2)
    second = with_lora(sessions[1], 3)
    first_b = with_lora(sessions[0], 4)
    plain_b = _queue("a red square", seed=5)
    rows = (plain, first_a, second, first_b, plain_b)

    batches.generation_execute(first_a.pk)
    assert _statuses(*rows) == ["queued", "completed", "queued", "completed", "queued"]
    batches.generation_execute(plain.pk)
    assert _statuses(*rows) == ["completed", "completed", "queued", "completed", "completed"]
    batches.generation_execute(second.pk)
    assert _statuses(second) == ["completed"]
    for generation, lora in ((first_b, first_lora), (second, second_lora), (plain_b, None)):
        record = json.loads(_images(generation)[0].text["sdxl_service"])
        assert record["lora_sha256"] == (lora.sha256 if lora else None)


def test_requests_of_another_scheduler_are_never_batched_together(generation_worker, settings):
    """Requests that differ only in their scheduler run in separate batches; requests
    without one (like rows recorded before the field: no "scheduler" key) batch together."""
    settings.SDXL_GENERATION_BATCH_IMAGES = 4
    plain = _queue("a red apple", seed=1)
    euler_a = _queue("a red apple", seed=1, scheduler="euler_a")
    ddim = _queue("a red apple", seed=1, scheduler="ddim")
    euler_a_b = _queue("a red apple", seed=2, scheduler="euler_a")
    plain_b = _queue("a red apple", seed=2)
    rows = (plain, euler_a, ddim, euler_a_b, plain_b)
    assert "scheduler" not in plain.parameters and euler_a.parameters["scheduler"] == "euler_a"

    batches.generation_execute(euler_a.pk)
    assert _statuses(*rows) == ["queued", "completed", "queued", "completed", "queued"]
    batches.generation_execute(plain.pk)
    assert _statuses(*rows) == ["completed", "completed", "queued", "completed", "completed"]
    batches.generation_execute(ddim.pk)
    assert _statuses(ddim) == ["completed"]

    for generation, scheduler, sampler in (
        (plain, None, None),
        (plain_b, None, None),
        (euler_a_b, "euler_a", "Euler a"),
        (ddim, "ddim", "DDIM"),
    ):
        text = _images(generation)[0].text
        assert json.loads(text["sdxl_service"]).get("scheduler") == scheduler
        assert (f", Sampler: {sampler}, " in text["parameters"]) == (sampler is not None)
        assert ("Sampler" in text["parameters"]) == (sampler is not None)
    # The same prompt and seed: the scheduler reached the engine.
    assert not np.array_equal(np.asarray(_images(plain)[0]), np.asarray(_images(euler_a)[0]))


def test_requests_of_another_refiner_policy_or_switch_are_never_batched_together(
    generation_worker, settings
):
    """Requests that differ only in refiner or refiner_switch run in separate batches; a
    row without the keys is ensemble at 0.8, and batches with one that gave those."""
    settings.SDXL_GENERATION_BATCH_IMAGES = 4
    plain = _queue("a red apple", seed=1)
    alone = _queue("a red apple", seed=1, refiner="none")
    switched = _queue("a red apple", seed=1, refiner_switch=0.5)
    explicit = _queue("a red apple", seed=2, refiner="ensemble", refiner_switch=0.8)
    rows = (plain, alone, switched, explicit)
    assert "refiner" not in plain.parameters and "refiner_switch" not in plain.parameters
    assert alone.parameters["refiner"] == "none" and "refiner_switch" not in alone.parameters

    batches.generation_execute(alone.pk)
    assert _statuses(*rows) == ["queued", "completed", "queued", "queued"]
    batches.generation_execute(plain.pk)
    assert _statuses(*rows) == ["completed", "completed", "queued", "completed"]
    batches.generation_execute(switched.pk)
    assert _statuses(switched) == ["completed"]

    for generation, refiner_at in ((plain, 0.8), (explicit, 0.8), (switched, 0.5), (alone, None)):
        text = _images(generation)[0].text
        record = json.loads(text["sdxl_service"])
        assert record["refiner_switch_at"] == refiner_at
        assert (record["refiner"] is None) == (refiner_at is None)
        assert "refiner_switch" not in record
        if refiner_at is None:
            assert "Refiner" not in text["parameters"]
        else:
            assert f", Refiner switch at: {refiner_at}" in text["parameters"]
    # The same prompt and seed: the policy reached the engine.
    assert not np.array_equal(np.asarray(_images(plain)[0]), np.asarray(_images(alone)[0]))


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (EngineError("the model ran out of memory"), "the model ran out of memory"),
        (RuntimeError("CUDA error: an illegal memory access"), "RuntimeError: CUDA error"),
    ],
    ids=["engine error", "unexpected error"],
)
def test_an_error_in_a_batch_ends_every_request_of_it_in_error(
    generation_worker, settings, monkeypatch, error, message
):
    import sdxl_engine.generation.render

    settings.SDXL_GENERATION_BATCH_IMAGES = 4
    lead = _queue("a red apple", seed=1)
    companion = _queue("a blue car", num_images=2, seed=2)
    other_size = _queue("a cat", seed=3, height=48)
    batches_run = []

    def failing_render_batch(pipelines, jobs, **shared):
        batches_run.append([(job.prompt, job.num_images, job.seed) for job in jobs])
        raise error

    monkeypatch.setattr(sdxl_engine.generation.render, "render_batch", failing_render_batch)

    batches.generation_execute(lead.pk)

    assert batches_run == [[("a red apple", 1, 1), ("a blue car", 2, 2)]]
    for generation in (lead, companion):
        row = Generation.objects.get(pk=generation.pk)
        assert row.status == "error" and row.error_message.startswith(message)
        assert row.finished_at is not None and row.image_count == 0
        assert _files(generation) == {}
        with pytest.raises(ServiceError) as failed:
            lifecycle.generation_wait(generation.pk, timeout_s=1)
        assert failed.value.status == 500 and message in failed.value.message
    assert _statuses(other_size) == ["queued"]


def test_a_batch_that_fails_while_writing_keeps_no_image_of_any_request(
    generation_worker, settings, monkeypatch
):
    """The first request's PNG is written, the second's write fails: both requests end
    in error, and neither keeps a file (nothing is served for a request in error)."""
    settings.SDXL_GENERATION_BATCH_IMAGES = 4
    first = _queue("a red apple", seed=1)
    second = _queue("a blue car", seed=2)
    write = storage.atomic_write_bytes
    writes = []

    def second_write_fails(path, data):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        write(path, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", second_write_fails)

    batches.generation_execute(first.pk)

    assert len(writes) == 2 and writes[0].parent == lifecycle.generations_dir(first.pk)
    assert _statuses(first, second) == ["error", "error"]
    for generation in (first, second):
        assert not lifecycle.generations_dir(generation.pk).exists()


def test_each_request_of_a_batch_gets_the_images_it_gets_alone(generation_worker, settings):
    """The PNGs of every request of a batch match the engine's images for that request
    alone (its prompts and seed): within 2 of 255 per value (1 at most measured on the
    CPU); the requests' images differ far more than that from each other's."""
    settings.SDXL_GENERATION_BATCH_IMAGES = 4
    batch = [
        _queue("a red apple", seed=3, negative_prompt="blurry"),
        _queue("a blue car", num_images=2, seed=4),
        # Not 5: the car's second image has seed 5 (seed + 1).
        _queue("a cat on grass", seed=6, negative_prompt="dark"),
    ]

    batches.generation_execute(batch[0].pk)

    assert _statuses(*batch) == ["completed"] * 3
    pixels = []
    for generation in batch:
        ours = _images(generation)
        assert images_close(ours, _alone(Generation.objects.get(pk=generation.pk)))
        pixels += [np.asarray(image).astype(int) for image in ours]
    for i, first in enumerate(pixels):
        for second in pixels[i + 1 :]:
            assert np.abs(first - second).mean() > 10


@pytest.fixture
def two_sessions_with_loras(generation_worker) -> list[LoraArtifact]:
    """Two sessions, each with a trained lora_1.safetensors of other contents."""
    loras = []
    for seed in (1, 2):
        session = session_services.session_create()
        session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64)), "red")
        run = run_services.training_run_start(
            session.pk, {"steps": 1, "resolution": 64, "learning_rate": 0.05, "seed": seed}
        )
        run_services.training_run_execute(run.pk)
        loras.append(LoraArtifact.objects.get(session=session))
    return loras


def _finished(**fields) -> tuple[Generation, list[bytes]]:
    generation = generation_request(GenerationRequest(**{**SMALL, **fields}))
    batches.generation_execute(generation.pk)
    return lifecycle.generation_wait(generation.pk, timeout_s=5)


def test_loras_of_two_sessions_apply_together_and_are_recorded_in_order(
    two_sessions_with_loras,
):
    first, second = two_sessions_with_loras
    both = (
        LoraChoice(first.session_id, scale=0.8),
        LoraChoice(second.session_id, lora_filename="lora_1.safetensors", scale=-0.5),
    )
    request = {"prompt": "a red square", "seed": 4}

    generation, images = _finished(loras=both, **request)
    _, first_alone = _finished(loras=both[:1], **request)
    _, shorthand = _finished(use_lora=True, session_id=first.session_id, lora_scale=0.8, **request)

    assert first_alone == shorthand  # use_lora is the one-LoRA form of loras
    assert images != first_alone
    rows = list(generation.applied_loras.all())
    assert [(row.position, row.source_session_id, row.scale) for row in rows] == [
        (0, first.session_id, 0.8),
        (1, second.session_id, -0.5),
    ]
    assert [row.sha256 for row in rows] == [first.sha256, second.sha256]
    assert (rows[0].lora, rows[1].lora) == (first, second)
    summary = bodies.generation_summary(generation)
    assert summary["lora"] == {"filename": "lora_1.safetensors", "sha256": first.sha256}
    assert [lora["scale"] for lora in summary["loras"]] == [0.8, -0.5]
    # Two files of one name: told apart by their sessions in the prompt and the hashes.
    lines = read_infotext(images[0]).split("\n")
    prompt, settings_line = lines[0], lines[-1]
    names = [f"lora_1_s{first.session_id}", f"lora_1_s{second.session_id}"]
    assert prompt == f"a red square <lora:{names[0]}:0.8> <lora:{names[1]}:-0.5>"
    hashes = [
        lora_short_hash(storage.session_dir(lora.session_id) / lora.filename)
        for lora in (first, second)
    ]
    assert f'Lora hashes: "{names[0]}: {hashes[0]}, {names[1]}: {hashes[1]}"' in settings_line


@pytest.mark.parametrize(
    ("choice", "missing"),
    [
        ({"lora_filename": "lora_9.safetensors"}, "lora_9.safetensors"),
        ({"iteration": 9}, "9"),
        ({"session_id": 987654}, "987654"),
    ],
)
def test_a_missing_lora_is_404_naming_it_and_records_nothing(
    two_sessions_with_loras, choice, missing
):
    first, second = two_sessions_with_loras
    loras = (
        LoraChoice(first.session_id),
        LoraChoice(**{"session_id": second.session_id, **choice}),
    )
    before = Generation.objects.count()

    with pytest.raises(ServiceError) as error:
        generation_request(GenerationRequest(prompt="x", loras=loras))

    assert error.value.status == 404 and missing in error.value.message
    assert Generation.objects.count() == before


def test_requests_with_other_loras_scales_or_order_are_never_batched_together(
    two_sessions_with_loras, settings
):
    settings.SDXL_GENERATION_BATCH_IMAGES = 4
    first, second = (LoraChoice(lora.session_id) for lora in two_sessions_with_loras)
    lead = _queue("a", loras=(first, second))
    same = _queue("b", loras=(first, second))
    swapped = _queue("c", loras=(second, first))
    rescaled = _queue("d", loras=(first, LoraChoice(second.session_id, scale=0.5)))
    fewer = _queue("e", loras=(first,))

    batches.generation_execute(lead.pk)

    assert (
        _statuses(lead, same, swapped, rescaled, fewer)
        == ["completed", "completed"] + ["queued"] * 3
    )


def test_a_lora_replaced_before_its_generation_ran_ends_it_in_error(two_sessions_with_loras):
    lora = two_sessions_with_loras[0]
    generation = _queue("x", loras=(LoraChoice(lora.session_id),))
    LoraArtifact.objects.filter(pk=lora.pk).update(sha256="0" * 64)

    batches.generation_execute(generation.pk)

    generation.refresh_from_db()
    assert generation.status == "error"
    assert generation.error_message == "lora_1.safetensors was deleted before generation"
    assert _files(generation) == {}


def test_img2img_starts_from_the_image_and_records_its_strength(generation_worker):
    from sdxl_engine.generation import generate
    from training_app.runtime import generation_pipelines

    init = image_bytes("PNG", (80, 48), "red")
    generation, images = _finished(prompt="a red square", seed=3, init_image=init, strength=0.4)

    assert generation.parameters["strength"] == 0.4
    assert (lifecycle.generations_dir(generation.pk) / "init_image").read_bytes() == init
    alone = generate(
        generation_pipelines(),
        prompt="a red square",
        seed=3,
        init_image=init,
        strength=0.4,
        **SMALL,
    )
    assert images_close([Image.open(io.BytesIO(images[0]))], alone, tolerance=0)
    assert "Denoising strength: 0.4" in read_infotext(images[0])
    assert bodies.generation_summary(generation)["strength"] == 0.4
    # Without a strength, img2img takes AUTOMATIC1111's default.
    default, _ = _finished(prompt="x", init_image=init)
    assert default.parameters["strength"] == 0.75


def test_an_init_image_that_is_not_an_image_is_400_and_records_nothing(generation_worker):
    # The params' own rules are GenerationParams.problems' (tests/engine/test_parameters.py).
    with pytest.raises(ServiceError, match="init_image_base64 does not hold a PNG") as error:
        generation_request(GenerationRequest(prompt="x", init_image=b"not an image"))
    assert error.value.status == 400
    assert not Generation.objects.exists()
    assert not lifecycle.generations_dir(1).exists()


@pytest.mark.parametrize(("output_format", "pillow_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_carry_the_parameters_in_exif_as_automatic1111_writes_them(
    generation_worker, output_format, pillow_format
):
    generation, images = _finished(
        prompt="a cat", seed=9, num_images=2, output_format=output_format, quality=90
    )
    _, png = _finished(prompt="a cat", seed=9, num_images=2)

    extension = {"jpeg": "jpg", "webp": "webp"}[output_format]
    assert sorted(_files(generation)) == [f"0.{extension}", f"1.{extension}"]
    for index, data in enumerate(images):
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.size) == (pillow_format, (64, 64))
        assert f"Seed: {9 + index}," in read_infotext(data)
        assert read_infotext(data) == read_infotext(png[index])
    _, lower = _finished(prompt="a cat", seed=9, output_format=output_format, quality=20)
    assert len(lower[0]) < len(images[0])
    assert bodies.generation_summary(generation)["seeds"] == [9, 10]


def test_an_uploaded_kohya_locon_with_ff_conv_and_text_encoder_keys_generates_as_stock_diffusers(
    generation_worker, tmp_path
):
    """An sd-scripts LoCon (SGM block names, feed-forward, 3x3 convolutions, both text
    encoders, alphas unlike the ranks) uploaded, then applied at 0.7: the image stock
    diffusers makes loading the original file into its pipeline at that weight."""
    import torch
    from safetensors.torch import load_file

    from sdxl_engine.generation.batch import decode_latents
    from tests.community_loras import write_kohya_locon
    from training_app.runtime import generation_pipelines

    pipelines = generation_pipelines()
    original = write_kohya_locon(tmp_path / "locon.safetensors", Path(pipelines.source.base))
    keys = load_file(original)
    assert any("ff_net" in key for key in keys) and any("in_layers_2" in key for key in keys)
    assert any(key.startswith("lora_te1_") for key in keys)
    assert any(key.startswith("lora_te2_") for key in keys)
    assert any(tensor.dim() == 4 and tensor.shape[-1] == 3 for tensor in keys.values())
    session = session_services.session_create()
    lora_services.lora_upload(session.pk, original.read_bytes(), "community.safetensors")
    request = {"prompt": "a red square", "seed": 5, **SMALL}

    _, ours = _finished(
        use_lora=True,
        session_id=session.pk,
        lora_filename="community.safetensors",
        lora_scale=0.7,
        **request,
    )
    _, plain = _finished(**request)

    base = pipelines.base
    base.load_lora_weights(str(original), adapter_name="community")
    try:
        base.set_adapters(["community"], adapter_weights=[0.7])
        shared = {"num_inference_steps": SMALL["steps"], "output_type": "latent"}
        with torch.no_grad():
            latents = base(
                prompt=request["prompt"],
                height=SMALL["height"],
                width=SMALL["width"],
                guidance_scale=7.0,  # /txt2img's default (diffusers' is 5.0)
                denoising_end=0.8,
                generator=torch.Generator("cpu").manual_seed(request["seed"]),
                **shared,
            ).images
            base.disable_lora()  # text_encoder_2 is the Refiner's too
            refined = pipelines.refiner(
                prompt=request["prompt"],
                image=latents,
                denoising_start=0.8,
                guidance_scale=1.0,
                **shared,
            ).images
            stock = decode_latents(pipelines, refined)
    finally:
        base.unload_lora_weights()

    ours_image = Image.open(io.BytesIO(ours[0]))
    assert images_close([ours_image], stock)
    difference = np.abs(
        np.asarray(ours_image).astype(int)
        - np.asarray(Image.open(io.BytesIO(plain[0]))).astype(int)
    )
    assert difference.max() > 8  # the LoCon does change the image
