"""The hires fix (A1111's enable_hr): a first pass that is the plain image, then an img2img
pass at the scaled size that reworks it, counted in the progress and stoppable."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch

from sdxl_engine.errors import GenerationCancelled
from sdxl_engine.generation import generate, render
from sdxl_engine.generation.batch import decode_latents
from sdxl_engine.generation.hires import hires_steps
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.generation.render import render_batch
from sdxl_engine.parameters import GenerationParams, HiresFix

PLAIN = {"prompt": "a red cube", "steps": 5, "seed": 11, "height": 64, "width": 64}


def _pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _spy_first_pass(monkeypatch: pytest.MonkeyPatch) -> list[list[torch.Tensor]]:
    """What render_batch hands the hires pass: the first pass's latents, per request."""
    seen: list[list[torch.Tensor]] = []
    real = render.hires_fix

    def spy(pipelines, requests, first_pass, **kwargs):  # type: ignore[no-untyped-def]
        seen.append([latents.clone() for latents in first_pass])
        return real(pipelines, requests, first_pass, **kwargs)

    monkeypatch.setattr(render, "hires_fix", spy)
    return seen


@pytest.mark.parametrize(
    ("upscaler", "scale", "size"), [("latent", 2.0, 128), ("lanczos", 1.5, 96)]
)
def test_hires_images_have_the_scaled_size_and_their_first_pass_is_the_plain_image(
    pipelines: Pipelines,
    monkeypatch: pytest.MonkeyPatch,
    upscaler: str,
    scale: float,
    size: int,
) -> None:
    seen = _spy_first_pass(monkeypatch)
    hires = HiresFix(scale=scale, upscaler=upscaler, steps=4, denoising_strength=0.6)
    [rendered] = render_batch(pipelines, [GenerationParams(**PLAIN, hires=hires)])
    [plain] = generate(pipelines, **PLAIN)

    [image] = rendered.images
    assert image.size == (size, size)
    [[first_latents]] = seen
    with torch.no_grad():
        [first_image] = decode_latents(pipelines, first_latents)
    assert np.array_equal(_pixels(first_image), _pixels(plain))
    # Reworked, not only resized: far from the plain image resized alike.
    resized = plain.resize((size, size), PIL.Image.Resampling.LANCZOS)
    assert np.abs(_pixels(image) - _pixels(resized)).mean() > 10


def test_the_latent_and_lanczos_upscalers_differ(pipelines: Pipelines) -> None:
    images = [
        render_batch(
            pipelines,
            [GenerationParams(**PLAIN, hires=HiresFix(scale=2.0, upscaler=upscaler, steps=4))],
        )[0].images[0]
        for upscaler in ("latent", "lanczos")
    ]
    assert np.abs(_pixels(images[0]) - _pixels(images[1])).mean() > 1


def test_a_batch_of_two_hires_requests_equals_each_alone(pipelines: Pipelines) -> None:
    hires = HiresFix(scale=1.5, upscaler="latent", steps=4)
    first = GenerationParams(**PLAIN, hires=hires, num_images=2)
    second = replace(first, prompt="a blue ball", seed=40, num_images=1)
    together = render_batch(pipelines, [first, second])
    alone = [render_batch(pipelines, [request])[0] for request in (first, second)]

    assert [len(result.images) for result in together] == [2, 1]
    for batched, single in zip(together, alone, strict=True):
        for a, b in zip(batched.images, single.images, strict=True):
            assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
    # Image 1 of the first request is the request for one image of its seed + 1.
    [second_image] = render_batch(pipelines, [replace(first, seed=12, num_images=1)])[0].images
    assert np.abs(_pixels(second_image) - _pixels(together[0].images[1])).max() <= 1


@pytest.mark.parametrize("refiner", ["ensemble", "none"])
def test_progress_counts_both_passes_with_the_total_known_from_the_start(
    pipelines: Pipelines, refiner: str
) -> None:
    request = GenerationParams(
        **PLAIN, refiner=refiner, hires=HiresFix(scale=1.5, steps=6, denoising_strength=0.5)
    )
    seen: list[tuple[int, int]] = []
    render_batch(pipelines, [request], on_step=lambda done, total: seen.append((done, total)))

    # 5 first-pass steps, then half of the 6-step schedule.
    assert hires_steps(request) == 3
    assert seen == [(done, 8) for done in range(1, 9)]


@pytest.mark.parametrize(
    ("scheduler", "refiner", "steps", "strength"),
    [(None, "ensemble", 5, 0.7), ("dpmpp_2m_karras", "ensemble", 7, 0.7), ("ddim", "none", 3, 0.4)],
)
def test_the_planned_hires_steps_are_those_the_pass_runs(
    pipelines: Pipelines, scheduler: str | None, refiner: str, steps: int, strength: float
) -> None:
    hires = HiresFix(scale=1.5, steps=steps, denoising_strength=strength)
    request = GenerationParams(**PLAIN, scheduler=scheduler, refiner=refiner, hires=hires)
    seen: list[tuple[int, int]] = []
    render_batch(pipelines, [request], on_step=lambda done, total: seen.append((done, total)))

    # int(steps x strength), as diffusers' img2img: 3, 4 (7 x 0.7 is 4.8999...), 1.
    assert seen[-1] == (5 + hires_steps(request),) * 2
    assert hires_steps(request) == int(steps * strength)


def test_the_hires_steps_default_to_the_requests_and_must_run_one() -> None:
    request = GenerationParams(**PLAIN, hires=HiresFix(denoising_strength=0.7))
    assert hires_steps(request) == 3  # int(5 x 0.7)
    assert hires_steps(replace(request, hires=HiresFix(denoising_strength=1.0))) == 5
    assert hires_steps(replace(request, hires=None)) == 0
    too_few = replace(request, hires=HiresFix(steps=4, denoising_strength=0.2))
    assert too_few.problems() == {
        "hires": "its steps x denoising_strength is under 1: the pass would run no step"
    }


def test_a_cancel_during_the_second_pass_stops_it(pipelines: Pipelines) -> None:
    request = GenerationParams(**PLAIN, hires=HiresFix(scale=2.0, steps=6, denoising_strength=1.0))
    seen: list[int] = []

    def on_step(done: int, total: int) -> None:
        seen.append(done)
        if done == 6:  # the second pass's first step
            raise GenerationCancelled("cancelled")

    with pytest.raises(GenerationCancelled):
        render_batch(pipelines, [request], on_step=on_step)
    assert seen == [1, 2, 3, 4, 5, 6]
    # The pipelines are as before: the next plain request renders as ever.
    [after] = render_batch(pipelines, [GenerationParams(**PLAIN)])[0].images
    [plain] = generate(pipelines, **PLAIN)
    assert np.array_equal(_pixels(after), _pixels(plain))


@pytest.mark.parametrize(
    ("size", "scale", "expected"),
    [((64, 64), 2.0, (128, 128)), ((1024, 1024), 1.5, (1536, 1536)), ((80, 64), 1.45, (112, 88))],
)
def test_the_hires_size_is_a1111s_rounded_down_to_its_latents(size, scale, expected) -> None:
    # A1111: hr_upscale_to = int(side * scale); its latents are that // 8.
    assert HiresFix(scale=scale).size(*size) == expected
    params = GenerationParams(**{**PLAIN, "width": size[0], "height": size[1]})
    assert replace(params, hires=HiresFix(scale=scale)).output_size == expected
    assert params.output_size == size


def test_hires_is_recorded_as_a_dict_and_read_back_as_its_dataclass() -> None:
    hires = HiresFix(scale=1.5, upscaler="lanczos")
    params = GenerationParams(**PLAIN, hires=hires)
    record = params.record()
    assert record["hires"] == {
        "scale": 1.5,
        "upscaler": "lanczos",
        "steps": None,
        "denoising_strength": 0.7,
    }
    assert GenerationParams(**record).hires == hires
    assert "hires" not in GenerationParams(**PLAIN).record()
    # Requests batch only with the same hires fix.
    assert params.batch_key() != GenerationParams(**PLAIN).batch_key()
    assert params.batch_key() == replace(params, prompt="other", seed=1).batch_key()
