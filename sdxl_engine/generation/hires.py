"""AUTOMATIC1111's hires fix (enable_hr): the first pass's images, upscaled by the request's
hires.scale, reworked by an img2img pass at the larger size.

As A1111's StableDiffusionProcessingTxt2Img.sample_hr_pass does it: the "latent" upscaler
("Latent" there) resizes the first pass's final latents bilinearly without antialiasing
and starts the second pass from them; "lanczos" decodes them, resizes the images with
PIL's Lanczos and starts from those, as an img2img request would. The second pass is
generate_batch's img2img at hires.denoising_strength over hires.steps (None: the
request's), with the request's prompts, scheduler, Refiner policy and LoRAs (merged again
for it), each image from its own seed.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import replace

import PIL.Image
import torch

from sdxl_engine.generation.batch import decode_latents, generate_batch, native_side
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import GenerationParams, HiresFix


def hires_steps(request: GenerationParams) -> int:
    """The denoising steps the request's hires pass runs (0 without one): HiresFix.run_steps,
    diffusers' count for its img2img."""
    return 0 if request.hires is None else request.hires.run_steps(request.steps)


def hires_fix(
    pipelines: Pipelines,
    requests: Sequence[GenerationParams],
    first_pass: Sequence[torch.Tensor],
    *,
    loras: Sequence[AppliedLora] = (),
    on_step: Callable[[int, int], None] | None = None,
) -> list[list[PIL.Image.Image]]:
    """Each request's images after its hires pass, from `first_pass`: each request's final
    latents of the first pass (generate_batch's output_type "latent"). The requests share
    their batch_key, so one HiresFix and one size."""
    hires = requests[0].hires
    assert hires is not None, "render_batch calls the hires pass only for a hires fix"
    native = native_side(pipelines)
    requests = [request.sized(native) for request in requests]
    width, height = hires.size(*requests[0].size)
    # One img2img request per image, its own seed: image i of a request is the request for
    # one image of seed + i, and each has its own starting image.
    singles = [
        _second_pass(request, hires, seed, width, height)
        for request in requests
        for seed in request.seeds
    ]
    if hires.denoising_strength >= 1.0:
        # As generate_batch's img2img at strength 1: the starting image is not used at all,
        # the pass is text-to-image at the larger size.
        images = generate_batch(pipelines, singles, loras=loras, on_step=on_step)
    elif hires.upscaler == "latent":
        factor = pipelines.base.vae_scale_factor
        with torch.no_grad():
            upscaled = torch.nn.functional.interpolate(
                torch.cat(list(first_pass)),
                size=(height // factor, width // factor),
                mode="bilinear",
                antialias=False,
            )
        images = generate_batch(
            pipelines, singles, loras=loras, on_step=on_step, init_latents=upscaled
        )
    else:
        # One decode per request, as generate_batch decodes.
        with torch.no_grad():
            decoded = [
                image for latents in first_pass for image in decode_latents(pipelines, latents)
            ]
        singles = [
            replace(
                single, init_image=_png(image.resize((width, height), PIL.Image.Resampling.LANCZOS))
            )
            for single, image in zip(singles, decoded, strict=True)
        ]
        images = generate_batch(pipelines, singles, loras=loras, on_step=on_step)
    flat = iter(image for single_images in images for image in single_images)
    return [[next(flat) for _ in range(request.num_images)] for request in requests]


def _second_pass(
    request: GenerationParams, hires: HiresFix, seed: int, width: int, height: int
) -> GenerationParams:
    """The img2img request that reworks one image of `request` at width x height."""
    return replace(
        request,
        num_images=1,
        seed=seed,
        width=width,
        height=height,
        steps=hires.steps or request.steps,
        strength=hires.denoising_strength if hires.denoising_strength < 1.0 else None,
        hires=None,
    )


def _png(image: PIL.Image.Image) -> bytes:
    """The upscaled image as img2img's init_image takes it: lossless, quickly compressed."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
