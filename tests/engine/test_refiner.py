"""The refiner policy (refiner "ensemble" / "none", refiner_switch) through generate /
generate_batch: 64x64, 4 steps on the tiny random-weight model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxl_engine.errors import EngineError
from sdxl_engine.generation.batch import decode_latents, generate, generate_batch
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import GenerationParams
from tests.engine.test_generation import BATCHED, _max_difference, _same

REQUEST = {"prompt": "a red apple", "seed": 3, **BATCHED}


class _RefinerSpy:
    """Counts the calls of pipelines.refiner, which still runs; restored on exit."""

    def __init__(self, pipelines: Pipelines, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        refiner = pipelines.refiner
        own_call = type(refiner).__call__

        def counted(pipeline, *args, **kwargs):
            if pipeline is refiner:
                self.calls += 1
            return own_call(pipeline, *args, **kwargs)

        monkeypatch.setattr(type(refiner), "__call__", counted)


def test_the_defaults_are_ensemble_at_0_8_exactly(pipelines: Pipelines) -> None:
    assert _same(
        generate(pipelines, **REQUEST),
        generate(pipelines, refiner="ensemble", refiner_switch=0.8, **REQUEST),
    )


def test_none_never_calls_the_refiner_and_gives_stock_base_alone(
    pipelines: Pipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _RefinerSpy(pipelines, monkeypatch)
    reports: list[tuple[int, int]] = []

    ensemble = generate(pipelines, **REQUEST)
    assert spy.calls == 1  # the spy sees the Refiner when it runs
    alone = generate(
        pipelines, refiner="none", num_images=2, on_step=lambda *r: reports.append(r), **REQUEST
    )

    assert spy.calls == 1
    # The Base ran every step: the progress still ends at steps/steps.
    assert reports == [(step, BATCHED["steps"]) for step in range(1, BATCHED["steps"] + 1)]
    with torch.no_grad():
        latents = pipelines.base(
            prompt=REQUEST["prompt"],
            negative_prompt=None,
            guidance_scale=BATCHED["guidance_scale"],
            height=BATCHED["height"],
            width=BATCHED["width"],
            num_inference_steps=BATCHED["steps"],
            num_images_per_prompt=2,
            generator=[
                torch.Generator("cpu").manual_seed(seed)
                for seed in (REQUEST["seed"], REQUEST["seed"] + 1)
            ],
            output_type="latent",
        ).images
        stock = decode_latents(pipelines, latents)
    assert len(alone) == 2 and _same(alone, stock)
    assert not _same(alone[:1], ensemble)


def test_another_switch_gives_another_image(pipelines: Pipelines) -> None:
    default = generate(pipelines, **REQUEST)
    assert not _same(generate(pipelines, refiner_switch=0.5, **REQUEST), default)
    # The highest switch still leaves the Refiner its last step (of 4 steps: 0.99 splits
    # them as 0.8 does, 3 + 1), so it is not the Base alone.
    reports: list[tuple[int, int]] = []
    highest = generate(
        pipelines, refiner_switch=0.99, on_step=lambda *r: reports.append(r), **REQUEST
    )
    assert reports[-1] == (BATCHED["steps"], BATCHED["steps"])
    assert not _same(highest, generate(pipelines, refiner="none", **REQUEST))


def test_a_batch_under_none_gives_each_job_its_images_alone(pipelines: Pipelines) -> None:
    apple = GenerationParams("a red apple", num_images=1, seed=1, refiner="none", **BATCHED)
    car = GenerationParams("a blue car", num_images=2, seed=2, refiner="none", **BATCHED)

    batched = generate_batch(pipelines, [apple, car])
    alone = [generate_batch(pipelines, [job])[0] for job in (apple, car)]

    assert _max_difference(batched[0], alone[0]) <= 2
    assert _max_difference(batched[1], alone[1]) <= 2
    assert not np.array_equal(*[np.asarray(image) for image in batched[1]])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"refiner": "both"}, "refiner must be one of: ensemble, none"),
        ({"refiner_switch": 0.4}, "refiner_switch must be from 0.5 to 0.99"),
        ({"refiner_switch": 1.0}, "refiner_switch must be from 0.5 to 0.99"),
    ],
)
def test_an_unknown_policy_or_a_switch_out_of_range_is_an_engine_error(
    pipelines: Pipelines, options: dict, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        generate(pipelines, **options, **REQUEST)
