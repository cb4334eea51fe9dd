"""Inpainting and outpainting: the original kept outside the blurred mask, the masked area
repainted, "only masked" as the crop rendered alone then pasted, the canvas grown and its
new area filled; a 9-channel inpainting UNet as the Base."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from PIL import Image

from sdxl_engine.errors import EngineError
from sdxl_engine.generation import inpaint
from sdxl_engine.generation.batch import generate, generate_batch
from sdxl_engine.generation.builder import load_component_config
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.inpaint_images import (
    Margins,
    blur_mask,
    fill_masked,
    open_mask,
    open_rgb,
    outpaint_canvas,
    paste_region,
)
from sdxl_engine.parameters import GenerationParams, Outpaint

SIZE = 64
REQUEST = {"prompt": "a red square", "seed": 5, "height": SIZE, "width": SIZE, "steps": 5}


def _png(pixels: np.ndarray) -> bytes:
    file = io.BytesIO()
    Image.fromarray(pixels).save(file, format="PNG")
    return file.getvalue()


def _picture(seed: int = 1, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """Smooth colours (a blurred random field): something a fill can tell apart."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC))


def _rect_mask(box: tuple[int, int, int, int], size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    x1, y1, x2, y2 = box
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 255
    return mask


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _params(**given: object) -> GenerationParams:
    return GenerationParams(**{**REQUEST, **given}).filled()


def _inpainted(pipelines: Pipelines, **given: object) -> Image.Image:
    return generate_batch(pipelines, [_params(**given)])[0][0]


PICTURE = _picture()
MASK = _rect_mask((20, 20, 44, 44))


@pytest.mark.parametrize("refiner", ["none", "ensemble"])
def test_outside_the_blurred_mask_is_kept_and_inside_repainted(
    pipelines: Pipelines, refiner: str
) -> None:
    image = _inpainted(
        pipelines, init_image=_png(PICTURE), mask=_png(MASK), refiner=refiner, strength=0.9
    )
    assert image.size == (SIZE, SIZE)
    blurred = blur_mask(MASK.astype(np.float32) / 255, 4)
    difference = np.abs(_pixels(image) - PICTURE.astype(np.int16))
    # Outside the blurred mask: the input (the overlay), within 2/255.
    assert difference[blurred == 0].max() <= 2
    # Inside: repainted by the (random-weight) model.
    assert difference[blurred > 0.99].mean() > 20


def test_fills_differ_inside_only(pipelines: Pipelines) -> None:
    common = {"init_image": _png(PICTURE), "mask": _png(MASK), "refiner": "none"}
    images = {
        fill: _pixels(_inpainted(pipelines, inpaint_fill=fill, **common))
        for fill in ("original", "fill", "latent_noise", "latent_nothing")
    }
    blurred = blur_mask(MASK.astype(np.float32) / 255, 4)
    for fill, pixels in images.items():
        if fill == "original":
            continue
        inside = np.abs(pixels - images["original"])[blurred > 0.99].mean()
        assert inside > 3, fill
        assert np.abs(pixels - images["original"])[blurred == 0].max() == 0, fill


def test_fill_paints_the_hole_with_the_colours_around_it() -> None:
    picture = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    picture[:, :32] = (200, 40, 40)
    picture[:, 32:] = (40, 40, 200)
    mask = _rect_mask((24, 24, 40, 40)).astype(np.float32) / 255
    filled = fill_masked(picture, mask).astype(np.int16)
    # Outside the mask: untouched; inside: red on the red side, blue on the blue side.
    assert (filled[mask == 0] == picture[mask == 0]).all()
    assert filled[32, 25, 0] > filled[32, 25, 2] and filled[32, 38, 2] > filled[32, 38, 0]


def test_only_masked_equals_the_crop_rendered_alone_then_pasted(
    pipelines: Pipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    mask = _rect_mask((26, 22, 38, 34))
    request = _params(
        init_image=_png(PICTURE),
        mask=_png(mask),
        inpaint_area="masked",
        inpaint_padding=6,
        refiner="none",
        strength=0.9,
    )
    job = inpaint.prepare(request)
    # The 12 px box, grown 10 px by the blur's kernel and 6 px of padding (square already).
    assert job.region == (10, 6, 54, 50)
    masked = generate_batch(pipelines, [request])[0][0]
    # The crop alone: the job's crop (already blurred: mask_blur 0) at the request size,
    # whole-image inpainting, its raw render (before its own overlay) pasted back.
    monkeypatch.setattr(inpaint, "finish", lambda _job, image: image)
    alone = generate_batch(
        pipelines,
        [
            replace(
                request,
                init_image=_png(job.image),
                mask=_png(np.round(job.mask * 255).astype(np.uint8)),
                mask_blur=0,
                inpaint_area="whole",
            )
        ],
    )[0][0]
    pasted = paste_region(
        job.original, np.asarray(alone.convert("RGB")), job.region, job.overlay_mask
    )
    assert (np.asarray(masked) == pasted).all()
    # And it did repaint: the masked area changed.
    assert np.abs(_pixels(masked) - PICTURE)[mask > 0].mean() > 10


def test_requests_with_different_masks_batch_as_alone(pipelines: Pipelines) -> None:
    first = _params(init_image=_png(PICTURE), mask=_png(MASK), num_images=2)
    second = _params(init_image=_png(_picture(2)), mask=_png(_rect_mask((0, 0, 30, 64))), seed=11)
    together = generate_batch(pipelines, [first, second])
    for request, images in zip((first, second), together, strict=True):
        alone = generate_batch(pipelines, [request])[0]
        for mine, batched in zip(alone, images, strict=True):
            assert np.abs(_pixels(mine) - _pixels(batched)).max() <= 1


def test_outpainting_keeps_the_image_and_fills_the_new_area(pipelines: Pipelines) -> None:
    margins = Outpaint(right=32, top=16)
    image = _inpainted(pipelines, init_image=_png(PICTURE), outpaint=margins, refiner="ensemble")
    assert image.size == (SIZE + 32, SIZE + 16)
    pixels = _pixels(image)
    # The original region, away from the seam (mask_blur's 4 px into it, then the blur's
    # kernel, 10 px more): the input.
    seam = 4 + 10
    kept = pixels[16 + seam :, : SIZE - seam]
    assert np.abs(kept - PICTURE[seam:, : SIZE - seam]).max() <= 2
    # The new area: repainted, not the edge-stretched fill it started from.
    canvas, _ = outpaint_canvas(PICTURE, Margins(0, 32, 16, 0), seam=4)
    new_area = np.ones(pixels.shape[:2], dtype=bool)
    new_area[16:, :SIZE] = False
    assert np.abs(pixels - canvas.astype(np.int16))[new_area].mean() > 10


def test_loras_apply_when_inpainting(pipelines: Pipelines, trained_lora: Path) -> None:
    given = {"init_image": _png(PICTURE), "mask": _png(MASK), "strength": 0.9}
    plain = _pixels(_inpainted(pipelines, **given))
    with_lora = _pixels(
        generate_batch(pipelines, [_params(**given)], loras=[AppliedLora(trained_lora, 1.0)])[0][0]
    )
    blurred = blur_mask(MASK.astype(np.float32) / 255, 4)
    assert np.abs(with_lora - plain)[blurred > 0.99].mean() > 2
    assert np.abs(with_lora - plain)[blurred == 0].max() == 0
    # Restored afterwards: the next call without it is the plain one again.
    assert (_pixels(_inpainted(pipelines, **given)) == plain).all()


def test_mask_without_white_is_refused(pipelines: Pipelines) -> None:
    black = np.zeros((SIZE, SIZE), dtype=np.uint8)
    with pytest.raises(EngineError, match="nothing white"):
        _inpainted(pipelines, init_image=_png(PICTURE), mask=_png(black))


@pytest.fixture(scope="module")
def inpainting_pipelines(pipelines: Pipelines) -> Pipelines:
    """The tiny pair with a random 9-channel Base UNet, the layout of
    diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (latents, mask, masked image)."""
    config = {**load_component_config("tiny", "unet_base"), "in_channels": 9}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
    base = StableDiffusionXLPipeline(**{**pipelines.base.components, "unet": unet})
    base.set_progress_bar_config(disable=True)
    return Pipelines(
        base=base,
        refiner=pipelines.refiner,
        device=pipelines.device,
        dtype=pipelines.dtype,
        source=pipelines.source,
    )


@pytest.mark.parametrize("refiner", ["none", "ensemble"])
def test_a_nine_channel_base_inpaints(inpainting_pipelines: Pipelines, refiner: str) -> None:
    image = _inpainted(
        inpainting_pipelines,
        init_image=_png(PICTURE),
        mask=_png(MASK),
        refiner=refiner,
        strength=1.0,
    )
    blurred = blur_mask(MASK.astype(np.float32) / 255, 4)
    difference = np.abs(_pixels(image) - PICTURE.astype(np.int16))
    assert difference[blurred == 0].max() <= 2
    assert difference[blurred > 0.99].mean() > 20
    # The UNet sees the masked image: another hole gives another result inside.
    other = _pixels(
        _inpainted(
            inpainting_pipelines,
            init_image=_png(_picture(3)),
            mask=_png(MASK),
            refiner=refiner,
            strength=1.0,
        )
    )
    assert np.abs(other - _pixels(image))[blurred > 0.99].mean() > 1


def test_a_nine_channel_base_renders_text_to_image_and_img2img(
    inpainting_pipelines: Pipelines,
) -> None:
    """As A1111 runs an inpainting model without a mask: the whole image masked."""
    first = _pixels(generate(inpainting_pipelines, **REQUEST)[0])
    again = _pixels(generate(inpainting_pipelines, **REQUEST)[0])
    other_seed = _pixels(generate(inpainting_pipelines, **{**REQUEST, "seed": 6})[0])
    assert first.shape == (SIZE, SIZE, 3) and (first == again).all()
    assert np.abs(first - other_seed).mean() > 1
    img2img = [
        _pixels(
            generate(inpainting_pipelines, **REQUEST, init_image=_png(picture), strength=0.5)[0]
        )
        for picture in (PICTURE, _picture(4))
    ]
    assert np.abs(img2img[0] - img2img[1]).mean() > 1


def test_masks_are_read_at_the_request_size() -> None:
    small = _rect_mask((10, 10, 22, 22), (32, 32))
    mask = open_mask(_png(small), (SIZE, SIZE))
    assert mask.shape == (SIZE, SIZE) and mask[32, 32] == 1.0 and mask[5, 5] == 0.0
    assert open_rgb(_png(PICTURE), (32, 32)).shape == (32, 32, 3)


def test_the_refiner_blends_back_to_the_init_latents(
    pipelines: Pipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under "ensemble" the Refiner continues from the Base's latents; outside the mask
    the final latents are the init image's, exactly."""
    from sdxl_engine.generation import batch

    seen: dict[str, torch.Tensor] = {}
    original_inputs, original_decode = inpaint.inputs, batch.decode_latents

    def inputs(*args, **kwargs):
        seen["init"] = original_inputs(*args, **kwargs)
        return seen["init"]

    def decode(pipelines_, latents):
        seen["final"] = latents
        return original_decode(pipelines_, latents)

    monkeypatch.setattr(inpaint, "inputs", inputs)
    monkeypatch.setattr(batch, "decode_latents", decode)
    _inpainted(pipelines, init_image=_png(PICTURE), mask=_png(MASK), refiner="ensemble")
    init = seen["init"].latents
    outside = inpaint._latent_mask(seen["init"].masks, init) == 0
    assert torch.equal(seen["final"][outside.expand_as(init)], init[outside.expand_as(init)])


def test_inpainting_batches_across_masks_and_apart_from_img2img() -> None:
    """The row's params (without the mask's bytes) keep inpainting apart from img2img by
    the settings filled() records; different masks are each request's own."""
    first = _params(init_image=_png(PICTURE), mask=_png(MASK))
    second = _params(init_image=_png(_picture(2)), mask=_png(_rect_mask((0, 0, 8, 8))), seed=9)
    img2img = _params(init_image=_png(PICTURE))
    recorded = [GenerationParams(**params.record()) for params in (first, second, img2img)]
    assert first.batch_key() == second.batch_key() != img2img.batch_key()
    assert recorded[0].batch_key() == recorded[1].batch_key() != recorded[2].batch_key()
    assert first.record()["mask_blur"] == 4 and "mask" not in first.record()
    outpainted = _params(init_image=_png(PICTURE), outpaint={"right": 8})
    assert outpainted.outpaint == Outpaint(right=8) and outpainted.canvas_size == (72, 64)
    assert outpainted.record()["outpaint"] == {"left": 0, "right": 8, "top": 0, "bottom": 0}
    assert GenerationParams(**outpainted.record()).outpaint == Outpaint(right=8)
    # A later pass (hires, face detail) takes the finished images at their size.
    later = outpainted.for_later_pass()
    assert (later.size, later.inpainting, later.mask_blur) == ((72, 64), False, None)
