"""Samplers by name (sdxl_engine.schedulers) through generate / generate_batch: 64x64, 4
steps (3 of the Base, 1 of the Refiner) on the tiny random-weight model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdxl_engine.errors import EngineError
from sdxl_engine.generation import generate, generate_batch
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import GenerationParams
from sdxl_engine.schedulers import SCHEDULER_NAMES, SCHEDULERS
from tests.engine.test_generation import BATCHED, _max_difference, _same

REQUEST = {"prompt": "a red apple", "seed": 3, **BATCHED}
# The schedulers that draw noise in their steps.
STOCHASTIC = ("euler_a", "dpmpp_sde_karras")


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def test_the_names_are_the_documented_ones_in_order() -> None:
    assert SCHEDULER_NAMES == (
        "euler",
        "euler_a",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "dpmpp_sde_karras",
        "ddim",
        "unipc",
    )
    assert [SCHEDULERS[name].a1111_name for name in SCHEDULER_NAMES] == [
        "Euler",
        "Euler a",
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "DPM++ SDE Karras",
        "DDIM",
        "UniPC",
    ]


def test_each_scheduler_runs_base_and_refiner_and_gives_its_own_images(
    pipelines: Pipelines,
) -> None:
    default = generate(pipelines, **REQUEST)
    images = {name: generate(pipelines, scheduler=name, **REQUEST) for name in SCHEDULER_NAMES}

    assert all(len(found) == 1 and found[0].size == (64, 64) for found in images.values())
    # The tiny model's own scheduler is SDXL's Euler discrete: `euler` is it, exactly.
    assert _same(images["euler"], default)
    pixels = {name: _pixels(found) for name, found in images.items()}
    for index, name in enumerate(SCHEDULER_NAMES):
        for other in SCHEDULER_NAMES[index + 1 :]:
            assert not np.array_equal(pixels[name], pixels[other]), (name, other)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_a_noisy_scheduler_gives_the_same_images_for_the_same_seed(
    pipelines: Pipelines, name: str
) -> None:
    first = generate(pipelines, scheduler=name, num_images=2, **REQUEST)
    again = generate(pipelines, scheduler=name, num_images=2, **REQUEST)
    other = generate(pipelines, scheduler=name, num_images=2, **{**REQUEST, "seed": 4})

    assert _same(first, again)
    assert not _same(first, other)
    assert not np.array_equal(*_pixels(first))  # the images of one request differ


def test_a_request_with_a_scheduler_leaves_the_pipelines_own(pipelines: Pipelines) -> None:
    own = pipelines.base.scheduler, pipelines.refiner.scheduler
    before = generate(pipelines, **REQUEST)

    generate(pipelines, scheduler="euler_a", **REQUEST)

    def fail(_done: int, _steps: int) -> None:
        raise RuntimeError("stopped mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        generate(pipelines, scheduler="dpmpp_2m", on_step=fail, **REQUEST)
    assert pipelines.base.scheduler is own[0] and pipelines.refiner.scheduler is own[1]
    assert _same(generate(pipelines, **REQUEST), before)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_a_noisy_scheduler_gives_each_job_of_a_batch_the_images_it_gets_alone(
    pipelines: Pipelines, name: str
) -> None:
    """As test_generation's batch test, with step noise: each job's comes from its own
    seed, so the batch changes its images only in the last bits of float arithmetic."""
    apple = GenerationParams("a red apple", num_images=1, seed=1, scheduler=name, **BATCHED)
    car = GenerationParams("a blue car", num_images=2, seed=2, scheduler=name, **BATCHED)

    batched = generate_batch(pipelines, [apple, car])
    alone = [generate_batch(pipelines, [job])[0] for job in (apple, car)]

    assert _max_difference(batched[0], alone[0]) <= 2
    assert _max_difference(batched[1], alone[1]) <= 2
    assert not np.array_equal(*_pixels(batched[1]))


def test_an_unknown_scheduler_is_an_engine_error_naming_the_valid_ones(
    pipelines: Pipelines,
) -> None:
    own = pipelines.base.scheduler, pipelines.refiner.scheduler

    with pytest.raises(EngineError) as raised:
        generate(pipelines, scheduler="heun", **REQUEST)

    assert str(raised.value) == "scheduler must be one of: " + ", ".join(SCHEDULER_NAMES)
    assert pipelines.base.scheduler is own[0] and pipelines.refiner.scheduler is own[1]
