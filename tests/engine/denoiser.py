"""A tiny model that can denoise, for tests that prove training learns: the tiny random
model pretrained briefly on quadrant images (see tests/engine/test_learning.py's docstring
for why and how), with the helpers to train a LoRA on it and measure what it learned.
The `denoiser` fixture (tests/engine/conftest.py) holds one per test session; a test that
uses it must leave it as it found it (train_lora removes its adapters afterwards).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw

from sdxl_engine.dataset import TrainingPair
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import Pipelines, load_pipelines
from sdxl_engine.parameters import TrainingParams
from sdxl_engine.source import ModelSource
from sdxl_engine.training import train_lora

from .conftest import encoded_prompt

# Latents of 4x4, attention at 2x2: the smallest size the tiny UNet runs at (at 16 its
# inner blocks are 1x1, which their group norms refuse).
RESOLUTION = 32
TRIGGER = "sks"
PRETRAINING_CAPTION = "a picture"
PRETRAINING_IMAGES = 256
PRETRAINING_STEPS = 200
PRETRAINING_BATCH = 16
PRETRAINING_RATE = 3e-3
SEED = 0
# Generations compared with and without the LoRA: the same seeds, so each pair starts
# from the same noise.
GENERATION_SEEDS = range(8)
GENERATION_STEPS = 10
LORA_STEPS = 200
LORA_RATE = 5e-3
LORA_RANK = 16
REPEATS = 8

TRAINED_COLOURS = [(240, 200, 20), (20, 30, 160), (20, 30, 160), (220, 30, 30)]
CONTROL_COLOURS = [(230, 230, 230), (20, 160, 60), (10, 10, 10), (230, 230, 230)]


def quadrants(colours: list[tuple[int, int, int]]) -> Image.Image:
    """An image of four quadrants, coloured left to right, top to bottom."""
    image = Image.new("RGB", (RESOLUTION, RESOLUTION))
    draw = ImageDraw.Draw(image)
    half = RESOLUTION // 2
    for (left, top), colour in zip(
        [(0, 0), (half, 0), (0, half), (half, half)], colours, strict=True
    ):
        draw.rectangle([left, top, left + half - 1, top + half - 1], fill=colour)
    return image


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """In [-1, 1], as train_lora reads them."""
    arrays = [np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def image_latents(pipelines: Pipelines, images: list[Image.Image]) -> torch.Tensor:
    vae = pipelines.base.vae
    with torch.no_grad():
        return vae.encode(_pixels(images)).latent_dist.mean * vae.config.scaling_factor


def _conditioning(base: StableDiffusionXLPipeline, prompt: str, count: int) -> dict:
    prompt_embeds, pooled = encoded_prompt(base, prompt)
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * count)
    return {
        "encoder_hidden_states": prompt_embeds.expand(count, -1, -1),
        "added_cond_kwargs": {"text_embeds": pooled.expand(count, -1), "time_ids": time_ids},
    }


def make_denoiser(source: ModelSource, seed: int) -> Pipelines:
    """A private copy of the tiny model that denoises quadrant images (see the module's
    docstring): the session's pipelines stay as they are."""
    pipelines = load_pipelines(source, purpose="training")
    base = pipelines.base
    vae, unet = base.vae, base.unet
    channels = vae.config.latent_channels
    with torch.no_grad():
        # quant_conv gives each latent's mean, then its log-variance: -30 is the floor that
        # diffusers clamps to, a standard deviation of 3e-7.
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = -30
    rng = random.Random(seed)
    images = [
        quadrants([tuple(rng.randrange(256) for _ in range(3)) for _ in range(4)])
        for _ in range(PRETRAINING_IMAGES)
    ]
    vae.register_to_config(scaling_factor=1.0)
    latents = image_latents(pipelines, images)
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    latents = latents / latents.std()

    base.scheduler = EulerDiscreteScheduler.from_config(
        base.scheduler.config, prediction_type="v_prediction"
    )
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    conditioning = _conditioning(base, PRETRAINING_CAPTION, PRETRAINING_BATCH)
    generator = torch.Generator().manual_seed(seed)
    unet.requires_grad_(True)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=PRETRAINING_RATE)
    for _ in range(PRETRAINING_STEPS):
        clean = latents[torch.randint(0, len(latents), (PRETRAINING_BATCH,), generator=generator)]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (PRETRAINING_BATCH,), generator=generator)
        prediction = unet(
            noise_scheduler.add_noise(clean, noise, timesteps), timesteps, **conditioning
        ).sample
        loss = F.mse_loss(prediction, noise_scheduler.get_velocity(clean, noise, timesteps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.requires_grad_(False)
    unet.eval()
    return pipelines


def train_on_one_image(
    pipelines: Pipelines, image_path: Path, seed: int, output: Path, **changes: object
) -> Path:
    """The LoRA of one image captioned by the trigger alone (with the TrainingParams fields
    in `changes` changed).

    The image is listed 8 times and trained at batch 8 (kohya's repeats): each step then
    averages 8 noise draws and timesteps. 800 steps at batch 1 (learning rate 1e-3) learned
    about as much, in three times as long; 400 at batch 1 (5e-3) learned less.
    """
    params = TrainingParams(
        steps=LORA_STEPS,
        batch_size=REPEATS,
        learning_rate=LORA_RATE,
        rank=LORA_RANK,
        resolution=RESOLUTION,
        seed=seed,
        trigger=TRIGGER,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        min_snr_gamma=0.0,
        noise_offset=0.0,
        caption_dropout=0.0,
        enable_bucket=False,
    )
    params = replace(params, **changes)  # type: ignore[arg-type]  # TrainingParams' fields
    train_lora(pipelines, [TrainingPair(image_path, "")] * REPEATS, params, output)
    return output


@contextmanager
def lora_applied(pipelines: Pipelines, lora: Path) -> Iterator[None]:
    """As generate applies a trainer's LoRA: merged into the Base UNet, then restored."""
    pipelines.loras.merge([AppliedLora(lora)])
    try:
        yield
    finally:
        pipelines.loras.restore()


def generate_latents(pipelines: Pipelines, prompt: str) -> torch.Tensor:
    """The Base's generations of `prompt`, one per generation seed, as latents.

    Without guidance: the model was trained with one caption, so there is no unconditional
    prediction to guide away from. The Refiner is left out: the LoRA is the Base's, and
    the tiny Refiner is still random.
    """
    with torch.no_grad():
        return pipelines.base(
            prompt=prompt,
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=GENERATION_STEPS,
            guidance_scale=1.0,
            num_images_per_prompt=len(GENERATION_SEEDS),
            generator=[torch.Generator().manual_seed(seed) for seed in GENERATION_SEEDS],
            output_type="latent",
        ).images


def denoising_loss(pipelines: Pipelines, latent: torch.Tensor) -> float:
    """The training objective on `latent` under the trigger's caption: the MSE of the UNet's
    (velocity) prediction over fixed noise at timesteps across the schedule."""
    base = pipelines.base
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    timesteps = torch.tensor([100, 300, 500, 700, 900]).repeat_interleave(8)
    noise = torch.randn((len(timesteps), *latent.shape), generator=torch.Generator().manual_seed(1))
    clean = latent.expand_as(noise)
    with torch.no_grad():
        prediction = base.unet(
            noise_scheduler.add_noise(clean, noise, timesteps),
            timesteps,
            **_conditioning(base, TRIGGER, len(timesteps)),
        ).sample
    return F.mse_loss(prediction, noise_scheduler.get_velocity(clean, noise, timesteps)).item()
