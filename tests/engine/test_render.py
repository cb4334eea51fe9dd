"""render_batch: the first pass is generate_batch's, and progress counts on across passes."""

from __future__ import annotations

import numpy as np

from sdxl_engine.generation import generate
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.generation.render import Progress, render_batch
from sdxl_engine.parameters import GenerationParams


def test_a_request_without_later_passes_is_generate_batchs(pipelines: Pipelines) -> None:
    params = {"prompt": "a red cube", "steps": 5, "seed": 11, "height": 64, "width": 64}
    steps_seen: list[tuple[int, int]] = []
    [rendered] = render_batch(
        pipelines,
        [GenerationParams(**params)],
        on_step=lambda done, total: steps_seen.append((done, total)),
    )
    [expected] = generate(pipelines, **params)
    assert np.array_equal(np.asarray(rendered.images[0]), np.asarray(expected))
    assert rendered.faces_redone is None
    # Base and Refiner together, as generate_batch reports them.
    assert steps_seen == [(done, 5) for done in range(1, 6)]


def test_progress_counts_on_across_passes_and_grows_its_total() -> None:
    seen: list[tuple[int, int]] = []
    progress = Progress(lambda done, total: seen.append((done, total)), total=4)
    first = progress.pass_reporter()
    for done in range(1, 5):
        first(done, 4)
    progress.add(3)
    second = progress.pass_reporter()
    for done in range(1, 4):
        second(done, 3)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4), (5, 7), (6, 7), (7, 7)]


def test_progress_never_reports_more_done_than_total() -> None:
    seen: list[tuple[int, int]] = []
    progress = Progress(lambda done, total: seen.append((done, total)), total=2)
    reporter = progress.pass_reporter()
    for done in range(1, 4):
        reporter(done, 2)
    assert seen == [(1, 2), (2, 2), (3, 3)]
