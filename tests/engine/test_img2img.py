"""Image-to-image: a job's init_image noised to `strength` of the schedule, then denoised by
the Base (and the Refiner, per policy), as diffusers' img2img pipelines do."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image

from sdxl_engine.errors import EngineError
from sdxl_engine.generation import batch as generation
from sdxl_engine.generation.batch import decode_latents, generate, generate_batch
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import GenerationParams

REQUEST = {"prompt": "a red square", "seed": 3, "height": 64, "width": 64, "steps": 10}


def _picture(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A PNG of random pixels, as a request sends its init_image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    file = io.BytesIO()
    Image.fromarray(pixels).save(file, format="PNG")
    return file.getvalue()


@contextmanager
def _final_latents() -> Iterator[list[torch.Tensor]]:
    """The latents each generate() call decodes, in call order."""
    seen: list[torch.Tensor] = []
    original = generation.decode_latents

    def capture(pipelines, latents):
        seen.append(latents.float().clone())
        return original(pipelines, latents)

    generation.decode_latents = capture
    try:
        yield seen
    finally:
        generation.decode_latents = original


def _decoded(image: bytes) -> Image.Image:
    return Image.open(io.BytesIO(image))


def _encoded(pipelines: Pipelines, image: bytes) -> torch.Tensor:
    """The image in latent space (the VAE's mean: no sampling noise)."""
    vae = pipelines.base.vae
    pixels = pipelines.base.image_processor.preprocess(_decoded(image), height=64, width=64)
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def _relative_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first - second).norm() / second.norm())


def test_img2img_is_stock_diffusers_img2img_base_then_refiner(pipelines: Pipelines) -> None:
    """Strength 0.5 under ensemble at 0.8: the Base runs the first 80% of the steps that are
    run (the schedule from 0.5 to 0.9), the Refiner the rest, as A1111 splits them."""
    init = _picture(0)
    ours = generate(pipelines, init_image=init, strength=0.5, **REQUEST)
    stock_img2img = StableDiffusionXLImg2ImgPipeline(**pipelines.base.components)
    stock_img2img.set_progress_bar_config(disable=True)
    generator = [torch.Generator().manual_seed(REQUEST["seed"])]
    shared = {"prompt": REQUEST["prompt"], "num_inference_steps": REQUEST["steps"]}
    with torch.no_grad():
        latents = stock_img2img(
            image=_decoded(init),
            strength=0.5,
            guidance_scale=7.0,
            denoising_end=0.9,
            generator=generator,
            output_type="latent",
            **shared,
        ).images
        refined = pipelines.refiner(
            image=latents,
            denoising_start=0.9,
            guidance_scale=1.0,
            generator=generator,
            output_type="latent",
            **shared,
        ).images
        stock = decode_latents(pipelines, refined)

    assert np.array_equal(np.asarray(ours[0]), np.asarray(stock[0]))


def test_low_strength_stays_near_the_image_and_strength_one_does_not_use_it(
    pipelines: Pipelines,
) -> None:
    init, other = _picture(0), _picture(1)
    target = _encoded(pipelines, init)
    with _final_latents() as latents:
        for strength in (0.1, 0.5, 0.9):
            generate(pipelines, init_image=init, strength=strength, refiner="none", **REQUEST)
        generate(pipelines, refiner="none", **REQUEST)  # text-to-image, the same seed
        whole = generate(pipelines, init_image=init, strength=1.0, refiner="none", **REQUEST)
        whole_other = generate(pipelines, init_image=other, strength=1.0, refiner="none", **REQUEST)
    low, middle, high, text_to_image = (_relative_distance(x, target) for x in latents[:4])

    # The more of the schedule runs, the further the result moves from the image (the tiny
    # model's random UNet moves latents far: 3.5x, 34x, 144x the image's norm at 0.1, 0.5,
    # 0.9, and 238x for text-to-image).
    assert low < middle < high < text_to_image
    assert low < text_to_image / 20
    # At strength 1 the image is replaced: the text-to-image result for the seed, whatever
    # the image was.
    assert torch.equal(latents[4], latents[3]) and torch.equal(latents[5], latents[3])
    assert np.array_equal(np.asarray(whole[0]), np.asarray(whole_other[0]))


def test_an_image_of_another_size_is_resized_to_the_request(pipelines: Pipelines) -> None:
    images = generate(
        pipelines, init_image=_picture(2, (96, 40)), strength=0.6, num_images=2, **REQUEST
    )
    assert [image.size for image in images] == [(64, 64)] * 2


def test_each_img2img_job_of_a_batch_gets_the_images_it_gets_alone(pipelines: Pipelines) -> None:
    shared = {key: REQUEST[key] for key in ("height", "width", "steps")} | {"strength": 0.7}
    first = GenerationParams("a red apple", num_images=2, seed=4, init_image=_picture(3), **shared)
    second = GenerationParams("a blue car", num_images=1, seed=9, init_image=_picture(4), **shared)

    together = generate_batch(pipelines, [first, second])
    alone = [generate_batch(pipelines, [job])[0] for job in (first, second)]

    for batched, single in zip(together, alone, strict=True):
        for a, b in zip(batched, single, strict=True):
            assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 2


@pytest.mark.parametrize(
    ("init_image", "strength", "problem"),
    [
        (_picture(0), None, "needs a strength"),
        (None, 0.5, "applies only with init_image"),
        (_picture(0), 0.0, "greater than 0"),
        (_picture(0), 1.5, "at most 1"),
    ],
)
def test_inconsistent_img2img_requests_are_engine_errors(
    pipelines: Pipelines, init_image, strength, problem
) -> None:
    request = GenerationParams(
        "x", init_image=init_image, strength=strength, seed=0, height=64, width=64, steps=4
    )
    with pytest.raises(EngineError, match=problem):
        generate_batch(pipelines, [request])


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((64, 64), (64, 64)),
        ((96, 64), (96, 64)),
        ((64, 128), (64, 128)),
        ((300, 100), (192, 64)),
        ((120, 200), (64, 104)),
    ],
)
def test_an_init_image_without_width_and_height_keeps_its_aspect_ratio(
    pipelines: Pipelines, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    """Issue 25: not stretched to a square: its aspect at about the native area (64² for
    the tiny model), each side a multiple of 8 and at least 64."""
    request = {"prompt": "a red square", "seed": 3, "steps": 5}
    images = generate(pipelines, **request, init_image=_picture(1, size), strength=0.6)
    assert images[0].size == expected


def test_text_to_image_without_a_size_is_the_models_native_square(pipelines: Pipelines) -> None:
    images = generate(pipelines, prompt="a red square", seed=3, steps=5)
    assert images[0].size == (64, 64)  # the tiny model's native size, not 1024²
