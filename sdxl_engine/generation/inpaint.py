"""Inpainting and outpainting: batch.generate_batch's first pass for requests with a mask
or outpaint margins, as AUTOMATIC1111's img2img inpaints (modules/processing.py).

Each request is prepared in pixels first (prepare: its mask blurred, the canvas grown for
outpainting, the "only masked" crop, the masked content), then denoised with diffusers'
StableDiffusionXLInpaintPipeline over the Base's own modules: with SDXL's 4-channel UNet
the latents outside the (rounded) mask are put back to the init image's, noised to each
step's level, after every step (latent blending); with a 9-channel inpainting UNet
(diffusers/stable-diffusion-xl-1.0-inpainting-0.1's layout) the UNet also sees the mask
and the masked image's latents. The Refiner (4 channels) blends the same way from where
the Base handed over. Last, A1111's overlay puts the original pixels back outside the
blurred mask (finish).

An inpainting Base renders text-to-image and image-to-image requests too, as A1111 does
with an inpainting model: the whole image masked (as_inpainting).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
    retrieve_latents,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
    StableDiffusionXLInpaintPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from sdxl_engine.errors import EngineError
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.inpaint_images import (
    Margins,
    blur_mask,
    crop_region,
    expand_region,
    fill_masked,
    open_mask,
    open_rgb,
    outpaint_canvas,
    overlay,
    paste_region,
    resize,
)
from sdxl_engine.parameters import GenerationParams

# The channels of a UNet that takes the mask and the masked image's latents beside its
# latents (4 + 1 + 4), as SD's and SDXL's inpainting checkpoints.
INPAINTING_UNET_CHANNELS = 9


@dataclass
class InpaintJob:
    """One request's images around the denoising: what it starts from at the processing
    size (`image`, `mask`), and what finish pastes the result into (`original` with its
    `overlay_mask`, the crop `region` for "only masked")."""

    original: np.ndarray  # the init image (outpainting: on its grown canvas), full size
    overlay_mask: np.ndarray  # blurred mask the result is blended in with
    region: tuple[int, int, int, int] | None  # "only masked": the crop box of original
    image: np.ndarray  # at the processing size (the request's canvas_size)
    mask: np.ndarray  # blurred, at the processing size
    fill: str


def is_inpainting_unet(pipelines: Pipelines) -> bool:
    return bool(pipelines.base.unet.config.in_channels == INPAINTING_UNET_CHANNELS)


def prepare(request: GenerationParams) -> InpaintJob:
    """The request's pixels, as A1111 prepares them before encoding: the mask blurred by
    mask_blur (outpainting: the grown canvas and its new area's mask); for "only masked"
    the box around the mask plus inpaint_padding, grown to the size's aspect ratio and
    resized to it; the masked area painted with the colours around it for every content
    but "original" (A1111 fills before latent noise/nothing too)."""
    assert request.init_image is not None and request.mask_blur is not None, "filled()"
    size = request.size
    original = open_rgb(request.init_image, size)
    if request.outpaint is not None:
        margins = request.outpaint
        original, mask = outpaint_canvas(
            original,
            Margins(margins.left, margins.right, margins.top, margins.bottom),
            seam=request.mask_blur,
        )
    else:
        assert request.mask is not None
        mask = open_mask(request.mask, size)
    mask = blur_mask(mask, request.mask_blur)
    canvas = request.canvas_size
    region = None
    image, work_mask = original, mask
    if request.inpaint_area == "masked":
        box = crop_region(mask, request.inpaint_padding or 0)
        if box is None:
            raise EngineError("mask_base64 has nothing white: white marks what is repainted")
        region = expand_region(box, *canvas, original.shape[1], original.shape[0])
        x1, y1, x2, y2 = region
        image = resize(original[y1:y2, x1:x2], canvas)
        work_mask = resize(mask[y1:y2, x1:x2], canvas)
        overlay_mask = mask
    else:
        # A1111 blends the whole image's result in with the mask doubled (clipped at 1):
        # the blur's inner half is all generated, its outer half fades to the original.
        overlay_mask = np.clip(mask * 2.0, 0.0, 1.0)
    if not (work_mask >= 0.5).any():
        raise EngineError("mask_base64 has nothing white: white marks what is repainted")
    fill = request.inpaint_fill or "original"
    if fill != "original":
        image = fill_masked(image, work_mask)
    return InpaintJob(original, overlay_mask, region, image, work_mask, fill)


def finish(job: InpaintJob, generated: PIL.Image.Image) -> PIL.Image.Image:
    """A generated image of the job blended into its original (A1111's apply_overlay):
    within 1/255 of the original wherever the blurred mask is black."""
    pixels = np.asarray(generated.convert("RGB"), dtype=np.uint8)
    if job.region is not None:
        return PIL.Image.fromarray(paste_region(job.original, pixels, job.region, job.overlay_mask))
    return PIL.Image.fromarray(overlay(job.original, pixels, job.overlay_mask))


def _pixels(image: np.ndarray, device: str) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1], as the VAE takes it."""
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].to(torch.float32) / 127.5 - 1.0
    return tensor.to(device)


def _latent_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The rounded mask at the latents' size, as the pipeline blends with it."""
    small = torch.nn.functional.interpolate((mask >= 0.5).to(latents.dtype), latents.shape[-2:])
    return small


def _inpaint_of(
    pipeline: StableDiffusionXLPipeline | StableDiffusionXLImg2ImgPipeline,
) -> StableDiffusionXLInpaintPipeline:
    """diffusers' inpaint pipeline over `pipeline`'s own modules and current scheduler
    (not `from_pipe`, which casts them to one dtype: the VAE stays float32), with its
    config's prompt flags (the Refiner's aesthetic-score conditioning)."""
    config = pipeline.config
    inpaint = StableDiffusionXLInpaintPipeline(
        **pipeline.components,
        requires_aesthetics_score=bool(getattr(config, "requires_aesthetics_score", False)),
        force_zeros_for_empty_prompt=bool(getattr(config, "force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


@dataclass
class InpaintInputs:
    """The batch's tensors, one row per image: init latents (masked content applied), the
    masks at pixel size, and for a 9-channel UNet the masked image's latents."""

    latents: torch.Tensor
    masks: torch.Tensor
    masked_image_latents: torch.Tensor | None


def inputs(
    pipelines: Pipelines,
    requests: Sequence[GenerationParams],
    jobs: Sequence[InpaintJob],
    generators: list[torch.Generator],
) -> InpaintInputs:
    """Each image's starting latents, encoded with the float32 VAE and sampled with the
    image's generator (as batch._init_latents; the pipeline's own encoding would cast the
    shared VAE), the masked content applied in latent space (A1111's inpainting_fill 2
    and 3: noise of the image's own seed, or zeros, under the rounded mask)."""
    vae, device = pipelines.base.vae, pipelines.device
    nine = is_inpainting_unet(pipelines)
    latents, masks, masked = [], [], []
    image_generators = iter(generators)
    for request, job in zip(requests, jobs, strict=True):
        pixels = _pixels(job.image, device)
        mask = torch.from_numpy(job.mask)[None, None].to(device, torch.float32)
        masked_latents = None
        if nine:
            # The UNet's own view of the hole: the image with the rounded mask's area
            # grey (0), its latents' mode (no generator drawn: the noise stays the seed's).
            hole = pixels * (mask < 0.5)
            masked_latents = retrieve_latents(vae.encode(hole), sample_mode="argmax")
        for seed in request.seeds:
            encoded = retrieve_latents(vae.encode(pixels), generator=next(image_generators))
            encoded = encoded * vae.config.scaling_factor
            latent_mask = _latent_mask(mask, encoded)
            if job.fill == "latent_noise":
                noise = randn_tensor(
                    encoded.shape,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    dtype=torch.float32,
                ).to(device)
                encoded = encoded * (1 - latent_mask) + noise * latent_mask
            elif job.fill == "latent_nothing":
                encoded = encoded * (1 - latent_mask)
            latents.append(encoded)
            masks.append(mask)
            if masked_latents is not None:
                masked.append(masked_latents * vae.config.scaling_factor)
    return InpaintInputs(
        latents=torch.cat(latents).to(pipelines.dtype),
        masks=torch.cat(masks),
        masked_image_latents=torch.cat(masked).to(pipelines.dtype) if masked else None,
    )


def base_pass(
    pipelines: Pipelines,
    batch: InpaintInputs,
    *,
    strength: float,
    height: int,
    width: int,
    stage: dict[str, Any],
) -> torch.Tensor:
    """The Base's part: the inpaint pipeline from the init latents at `strength` (1: from
    noise alone, the area outside the mask still blended back)."""
    latents: torch.Tensor = (
        _inpaint_of(pipelines.base)(
            image=batch.latents,
            mask_image=batch.masks,
            masked_image_latents=batch.masked_image_latents,
            strength=strength,
            height=height,
            width=width,
            **stage,
        )
    ).images
    return latents


def refiner_pass(
    pipelines: Pipelines,
    batch: InpaintInputs,
    latents: torch.Tensor,
    *,
    height: int,
    width: int,
    stage: dict[str, Any],
) -> torch.Tensor:
    """The Refiner's part from the Base's `latents` (stage has its denoising_start).

    diffusers blends a pipeline started at denoising_start with the latents it continues
    from, noised to each step: the Base's last step put the init latents back outside the
    mask, so those are the init image's, and the Refiner keeps the outside as the Base
    did (test_inpaint: its final latents there are the init latents exactly)."""
    assert pipelines.refiner is not None
    refined: torch.Tensor = (
        _inpaint_of(pipelines.refiner)(
            image=latents,
            mask_image=batch.masks,
            height=height,
            width=width,
            **stage,
        )
    ).images
    return refined


def as_inpainting(request: GenerationParams) -> GenerationParams:
    """A text-to-image or image-to-image request as an inpainting UNet renders it, as
    A1111 feeds one: the whole image masked (white), the UNet's masked image all grey
    (zeros), from the init image at its strength or, for text-to-image, from a grey one
    at strength 1 (pure noise). Inpainting requests are returned as they are."""
    if request.inpainting:
        return request
    width, height = request.size
    init_image, strength = request.init_image, request.strength
    if init_image is None:
        init_image, strength = _png(np.full((height, width, 3), 127, np.uint8)), 1.0
    return replace(
        request,
        init_image=init_image,
        strength=strength,
        mask=_png(np.full((height, width), 255, np.uint8)),
        mask_blur=0,
        inpaint_area="whole",
        inpaint_padding=0,
        inpaint_fill="original",
    )


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def check(pipelines: Pipelines, requests: Sequence[GenerationParams]) -> dict[str, str]:
    """What keeps these requests from inpainting together (batch.check_inputs adds it)."""
    problems = {}
    if len({request.inpainting for request in requests}) > 1:
        problems["batch"] = "inpainting requests cannot batch with others"
    if any(request.inpainting and request.mask_blur is None for request in requests):
        problems["mask"] = "needs its settings (GenerationParams.filled gives the defaults)"
    return problems
