"""Masked loss (TrainingParams.masked_loss, background_weight, use_alpha_mask): each image's
mask follows its image through the buckets' placement down to latent resolution, the
loss ignores what the mask leaves out, and a LoRA trained with masks learns its subject
and less of the background around it."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw

from sdxl_engine.dataset import TrainingPair, mask_path_for
from sdxl_engine.errors import EngineError
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import TrainingParams, training_params
from sdxl_engine.training import train_lora
from sdxl_engine.training.caching import MaskSource, Sizing, encode_images
from sdxl_engine.training.checkpoints import run_fingerprint
from sdxl_engine.training.loop import mask_weights, training_loss

from .denoiser import (
    SEED,
    TRIGGER,
    generate_latents,
    image_latents,
    lora_applied,
    quadrants,
    train_on_one_image,
)

# Half of each image is subject: latent columns 0-1 of a 4x4 latent (pixels 0-15 of 32).
SUBJECT_COLUMNS = 2
MASKED = TrainingParams(
    batch_size=1, steps=1, rank=4, resolution=32, seed=3, masked_loss=True, min_snr_gamma=5.0
)


def _left_half_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle([0, 0, size[0] // 2 - 1, size[1] - 1], fill=255)
    return mask


def _random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A prediction, its target, and two images' masks at a 4x4 latent: the left half on
    the subject, one column half on it (a grey edge), the rest off."""
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randn(2, 4, 4, 4, generator=generator)
    target = torch.randn(2, 4, 4, 4, generator=generator)
    mask = torch.zeros(1, 4, 4)
    mask[..., :SUBJECT_COLUMNS] = 1.0
    mask[..., SUBJECT_COLUMNS] = 0.5
    return prediction, target, [mask, mask.flip(-2)]


@pytest.mark.parametrize("min_snr_gamma", [0.0, 5.0])
def test_masked_out_pixels_give_exactly_no_gradient(min_snr_gamma: float) -> None:
    prediction, target, masks = _random_batch(0)
    prediction.requires_grad_(True)
    weights = mask_weights(masks, [0, 1], background_weight=0.0)
    assert weights is not None
    timesteps = torch.tensor([10, 700])

    training_loss(prediction, target, timesteps, DDPMScheduler(), min_snr_gamma, weights).backward()

    assert prediction.grad is not None
    off = (weights == 0).expand_as(prediction)
    assert torch.all(prediction.grad[off] == 0)
    assert torch.all(prediction.grad[~off] != 0)


def test_a_background_weight_scales_the_background_gradient() -> None:
    prediction, target, masks = _random_batch(1)
    gradients = []
    for weights in (None, mask_weights(masks, [0, 1], background_weight=0.25)):
        leaf = prediction.clone().requires_grad_(True)
        training_loss(leaf, target, torch.tensor([1, 2]), DDPMScheduler(), 0.0, weights).backward()
        gradients.append(leaf.grad)
    unmasked, weighted = gradients
    assert weighted is not None and unmasked is not None
    # 1 on the subject, 0.25 off it, and 0.25 + 0.75 x 0.5 on the half column.
    expected = torch.full((2, 1, 4, 4), 0.25)
    expected[0, :, :, :SUBJECT_COLUMNS] = 1.0
    expected[0, :, :, SUBJECT_COLUMNS] = 0.625
    expected[1] = expected[0].flip(-2)
    torch.testing.assert_close(weighted, unmasked * expected)


def test_the_target_where_masked_out_does_not_change_the_weights_gradients() -> None:
    prediction_input, target, masks = _random_batch(2)
    weights = mask_weights(masks, [0, 1], background_weight=0.0)
    assert weights is not None
    other_target = torch.where(weights == 0, target + 3.0, target)
    layer = torch.nn.Conv2d(4, 4, 3, padding=1)  # mixes neighbouring pixels, as a UNet does

    def gradients(target: torch.Tensor, weights: torch.Tensor | None) -> list[torch.Tensor]:
        loss = training_loss(
            layer(prediction_input), target, torch.tensor([1, 2]), DDPMScheduler(), 0.0, weights
        )
        return list(torch.autograd.grad(loss, list(layer.parameters())))

    for same, other in zip(
        gradients(target, weights), gradients(other_target, weights), strict=True
    ):
        assert torch.equal(same, other)
    # Without the mask the same change does move them.
    assert not torch.equal(gradients(target, None)[0], gradients(other_target, None)[0])


def test_a_training_step_takes_no_gradient_from_the_masked_out_latents(
    pipelines: Pipelines, tmp_path: Path
) -> None:
    image = tmp_path / "0.png"
    Image.effect_noise((32, 32), 60).convert("RGB").save(image)
    _left_half_mask((32, 32)).save(mask_path_for(image))
    gradients: list[torch.Tensor] = []

    def keep_the_predictions_gradient(module, inputs, output) -> None:
        output[0].register_hook(gradients.append)

    hook = pipelines.base.unet.register_forward_hook(keep_the_predictions_gradient)
    try:
        result = train_lora(
            pipelines,
            [TrainingPair(image, "a texture", mask_path_for(image))],
            replace(MASKED, background_weight=0.0),
            tmp_path / "lora.safetensors",
        )
    finally:
        hook.remove()

    (gradient,) = gradients
    assert gradient.shape == (1, 4, 4, 4)
    assert torch.all(gradient[..., SUBJECT_COLUMNS:] == 0)
    assert torch.all(gradient[..., :SUBJECT_COLUMNS] != 0)
    assert result.metadata["sdxl_service.masked_loss"] == "True"
    assert result.metadata["sdxl_service.background_weight"] == "0.0"
    assert result.metadata["sdxl_service.use_alpha_mask"] == "False"


@pytest.mark.parametrize(
    ("source", "mask_scale", "tolerance"),
    [
        ("alpha", 1, 0.0),
        ("file", 1, 0.0),
        # A mask file of another size is resized to its image's: enlarging it softens its
        # edges by a pixel.
        ("file", 2, 0.05),
    ],
)
def test_masks_are_placed_as_their_images_then_averaged_to_latents(
    pipelines: Pipelines, tmp_path: Path, source: MaskSource, mask_scale: int, tolerance: float
) -> None:
    # A 64x32 image in a 32x32 bucket: resized to 64x32, 16 columns cropped each side.
    mask = Image.new("L", (64, 32), 0)
    ImageDraw.Draw(mask).rectangle([16, 0, 23, 31], fill=255)  # the crop's latent column 0
    ImageDraw.Draw(mask).rectangle([24, 0, 27, 31], fill=255)  # half of latent column 1
    image = tmp_path / "0.png"
    if source == "alpha":
        rgba = Image.new("RGBA", (64, 32), (200, 40, 40, 255))
        rgba.putalpha(mask)
        rgba.save(image)
        pair = TrainingPair(image, "x")
    else:
        Image.new("RGB", (64, 32), (200, 40, 40)).save(image)
        mask.resize((64 // mask_scale, 32 // mask_scale)).save(mask_path_for(image))
        pair = TrainingPair(image, "x", mask_path_for(image))
    unmasked = tmp_path / "1.png"
    Image.new("RGB", (32, 32), (40, 40, 200)).save(unmasked)  # no mask file, no alpha

    encoded = encode_images(
        pipelines,
        [pair, TrainingPair(unmasked, "y")],
        ["x", "y"],
        Sizing([(32, 32)], 16, math.inf),
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        stop=lambda: False,
        with_empty_caption=False,
        mask_source=source,
    )

    assert encoded.masks is not None
    placed, whole = encoded.masks
    assert placed.shape == whole.shape == (1, 4, 4)
    expected_columns = torch.tensor([1.0, 0.5, 0.0, 0.0])
    torch.testing.assert_close(placed, expected_columns.expand(1, 4, 4), atol=tolerance, rtol=0)
    assert torch.equal(whole, torch.ones(1, 4, 4))


def test_an_unmasked_run_keeps_no_masks(pipelines: Pipelines, training_pairs) -> None:
    encoded = encode_images(
        pipelines,
        training_pairs[:1],
        ["x"],
        Sizing([(32, 32)], 16, math.inf),
        batch_size=1,
        generator=torch.Generator().manual_seed(0),
        stop=lambda: False,
        with_empty_caption=False,
    )
    assert encoded.masks is None
    assert mask_weights(encoded.masks, [0], 0.0) is None


def test_masked_loss_without_any_mask_is_an_engine_error(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    with pytest.raises(EngineError, match="masked_loss needs a mask"):
        train_lora(pipelines, training_pairs, MASKED, tmp_path / "lora.safetensors")
    # With alpha masks an image needs no mask file (nor alpha: it then counts whole).
    alpha = replace(MASKED, masked_loss=False, use_alpha_mask=True)
    result = train_lora(pipelines, training_pairs[:1], alpha, tmp_path / "lora.safetensors")
    assert result.metadata["sdxl_service.use_alpha_mask"] == "True"
    assert result.metadata["sdxl_service.masked_loss"] == "True"  # implied


def test_the_alpha_mask_implies_masked_loss() -> None:
    assert training_params({"use_alpha_mask": True}, image_count=3).masked_loss
    assert TrainingParams(use_alpha_mask=True).loss_masked
    assert not training_params({}, image_count=3).masked_loss


def test_a_changed_mask_changes_the_runs_fingerprint(tmp_path: Path) -> None:
    image = tmp_path / "0.png"
    Image.new("RGB", (32, 32)).save(image)
    pairs = [TrainingPair(image, "x", mask_path_for(image))]
    _left_half_mask((32, 32)).save(mask_path_for(image))
    masked, unmasked = TrainingParams(masked_loss=True), TrainingParams()
    before = run_fingerprint(masked, pairs, ["x"]), run_fingerprint(unmasked, pairs, ["x"])

    Image.effect_noise((32, 32), 60).save(mask_path_for(image))

    assert run_fingerprint(masked, pairs, ["x"]) != before[0]
    # A run without masks does not start over for a mask it does not use.
    assert run_fingerprint(unmasked, pairs, ["x"]) == before[1]
    assert run_fingerprint(masked, [replace(pairs[0], mask_path=None)], ["x"]) != before[0]


# --- The leak: what a LoRA learns of the background its subject was photographed on ---

SUBJECT_COLOUR = (240, 200, 20)
BACKGROUND_COLOUR = (20, 30, 160)


@pytest.mark.slow  # trains two LoRAs on the pretrained denoiser
def test_a_masked_lora_learns_its_subject_and_leaks_less_of_its_background(
    denoiser: Pipelines, tmp_path: Path
) -> None:
    """The subject is the top-left quadrant, on a background of the other three in one
    colour; the mask is the subject's quadrant. Both LoRAs train as test_learning's, one
    with the mask (background_weight 0), one without; the trigger's generations are then
    measured against the training image's latent, in the subject's latents and in the
    background's. About 20 s on one CPU thread once the denoiser is pretrained."""
    image = tmp_path / "0.png"
    quadrants([SUBJECT_COLOUR] + [BACKGROUND_COLOUR] * 3).save(image)
    mask = mask_path_for(image)
    quadrants([(255, 255, 255)] + [(0, 0, 0)] * 3).convert("L").save(mask)
    with Image.open(image) as opened:
        target = image_latents(denoiser, [opened.convert("RGB")])
    subject = torch.zeros(4, 4, dtype=torch.bool)
    subject[:2, :2] = True  # the top-left quadrant of a 4x4 latent
    without = generate_latents(denoiser, TRIGGER)

    def distance(latents: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        return (latents - target)[:, :, region].flatten(1).norm(dim=1)

    def closeness(lora: Path) -> tuple[float, float]:
        """The generations' distance to the training image with the LoRA / without it,
        averaged over the seeds (below 1: closer), in the subject and in the background."""
        with lora_applied(denoiser, lora):
            generated = generate_latents(denoiser, TRIGGER)
        in_subject, in_background = (
            (distance(generated, region) / distance(without, region)).mean().item()
            for region in (subject, ~subject)
        )
        return in_subject, in_background

    plain_subject, plain_background = closeness(
        train_on_one_image(denoiser, image, SEED, tmp_path / "plain.safetensors")
    )
    masked_subject, masked_background = closeness(
        train_on_one_image(
            denoiser, image, SEED, tmp_path / "masked.safetensors", mask, masked_loss=True
        )
    )

    # Measured over seven seeds (the denoiser pretrained with 0-3, each LoRA trained with
    # 0 and 1; SEED is 0, 0): without the mask the LoRA brings the background 7-17 % closer
    # to the training background (0.83-0.93); with it, not at all: it moves it 11-25 %
    # further away (1.11-1.25; the subject's colour spreads), a gap of 0.21-0.37.
    assert plain_background < 0.965
    assert masked_background > plain_background + 0.10
    # Yet the subject is learned as without the mask, a little better even: its latents
    # 26-33 % closer (0.67-0.74; without the mask 0.73-0.79).
    assert masked_subject < 0.87
    assert plain_subject < 0.90
