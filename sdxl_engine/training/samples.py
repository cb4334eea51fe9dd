"""Sample images during training: the Base with the LoRA as it stands, a few prompts.

As kohya's `sample_every_n_steps` and ai-toolkit's `sample_every` do, so the user sees
what the LoRA has learnt while it trains. The Refiner is not used (the training worker
does not hold it). Rendering touches neither the training state nor its random streams:
the pipeline draws from its own seeded generators, the global generators are forked,
and the UNet is put back in training mode.
"""

from __future__ import annotations

import torch
from PIL import Image

from sdxl_engine.generation.batch import decode_latents
from sdxl_engine.generation.pipelines import Pipelines, forked_rng
from sdxl_engine.parameters import DEFAULT_SAMPLE_PROMPTS, GENERATION_DEFAULTS

# Enough steps for Euler to give a recognisable image; the generation default.
SAMPLE_STEPS = GENERATION_DEFAULTS.steps
SAMPLE_GUIDANCE = GENERATION_DEFAULTS.guidance_scale


def default_sample_prompts(trigger: str | None, captions: list[str]) -> list[str]:
    """The trigger alone (when there is one), then the first distinct training captions."""
    prompts = [trigger] if trigger else []
    for caption in captions:
        if len(prompts) == DEFAULT_SAMPLE_PROMPTS:
            break
        if caption and caption not in prompts:
            prompts.append(caption)
    return prompts


def render_samples(
    pipelines: Pipelines, prompts: list[str], seed: int, size: int
) -> list[Image.Image]:
    """One `size`² image per prompt, each from a generator seeded with `seed`."""
    base, device = pipelines.base, torch.device(pipelines.device)
    was_training = base.unet.training
    base.unet.eval()
    try:
        with forked_rng(device):
            latents = base(
                prompt=prompts,
                height=size,
                width=size,
                num_inference_steps=SAMPLE_STEPS,
                guidance_scale=SAMPLE_GUIDANCE,
                generator=[torch.Generator(device).manual_seed(seed) for _ in prompts],
                output_type="latent",
            ).images
            with torch.no_grad():
                return decode_latents(pipelines, latents)
    finally:
        base.unet.train(was_training)
