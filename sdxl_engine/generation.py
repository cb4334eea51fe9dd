"""Text-to-image with SDXL Base + Refiner as an ensemble of experts, optionally with a LoRA,
one request or several batched together."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor

from sdxl_engine.errors import EngineError
from sdxl_engine.lora_merge import is_unet_only
from sdxl_engine.parameters import (
    DEFAULT_REFINER_POLICY,
    DEFAULT_REFINER_SWITCH,
    GENERATION_DEFAULTS,
    refiner_problem,
)
from sdxl_engine.pipelines import Pipelines
from sdxl_engine.schedulers import build_scheduler, scheduler_spec

# By default the Base denoises the first 80% of the schedule (the high-noise steps), the
# Refiner the rest, as in SDXL's ensemble-of-experts setup (refiner_switch).
HANDOVER_FRACTION = DEFAULT_REFINER_SWITCH
LORA_ADAPTER_NAME = "sdxl_service_generation"


@dataclass(frozen=True)
class GenerationJob:
    """What differs between requests that can share one batch: each has its prompts, its
    image count and its seed, and gets the images it would get alone (the same starting
    noise; the arithmetic of a larger batch may differ in the last bits of float16)."""

    prompt: str
    negative_prompt: str = GENERATION_DEFAULTS.negative_prompt
    num_images: int = GENERATION_DEFAULTS.num_images
    seed: int = 0


def generate(
    pipelines: Pipelines,
    *,
    prompt: str,
    negative_prompt: str = GENERATION_DEFAULTS.negative_prompt,
    num_images: int = GENERATION_DEFAULTS.num_images,
    seed: int,
    **shared: Any,
) -> list[PIL.Image.Image]:
    """`num_images` images for `prompt`, the same for the same seed; the other arguments
    are generate_batch's."""
    job = GenerationJob(prompt, negative_prompt, num_images, seed)
    return generate_batch(pipelines, [job], **shared)[0]


def generate_batch(
    pipelines: Pipelines,
    jobs: list[GenerationJob],
    *,
    height: int = GENERATION_DEFAULTS.height,
    width: int = GENERATION_DEFAULTS.width,
    guidance_scale: float = GENERATION_DEFAULTS.guidance_scale,
    steps: int = GENERATION_DEFAULTS.steps,
    lora_path: Path | None = None,
    lora_scale: float = GENERATION_DEFAULTS.lora_scale,
    on_step: Callable[[int, int], None] | None = None,
    scheduler: str | None = None,
    refiner: str = DEFAULT_REFINER_POLICY,
    refiner_switch: float = HANDOVER_FRACTION,
) -> list[list[PIL.Image.Image]]:
    """The images of each job, `width`×`height`, made together in one batch: Base and
    Refiner run once for all of them, which costs less per image than one run per job.

    A LoRA, if given, applies to the Base only and to this call only: it is unloaded
    afterwards, so the next call without it matches a freshly loaded pipeline.
    `on_step(done, steps)` runs after each denoising step of Base and Refiner together.

    `scheduler` (a name of schedulers.SCHEDULERS) drives Base and Refiner for this call
    only; None keeps the pipelines' own (the model folder's: Euler for SDXL), untouched.

    `refiner` "ensemble": the Base denoises the first `refiner_switch` of the schedule and
    the Refiner the rest; "none": the Base alone runs every step and its latents are
    decoded (`refiner_switch` does not apply), the Refiner is not called.
    """
    _check_request(pipelines, jobs, height, width, steps)
    _check_refiner(refiner, refiner_switch)
    ensemble = refiner == "ensemble"
    refiner_switch = float(refiner_switch)  # diffusers ignores a denoising_start not float
    if scheduler is not None:
        scheduler_spec(scheduler)  # an unknown name fails before anything changes
    base, refiner_pipe = pipelines.base, pipelines.refiner
    if refiner_pipe is None:
        raise EngineError(
            "these pipelines were loaded for training, without the SDXL Refiner; "
            "load them with purpose='generation' to generate"
        )
    report_step = _step_reporter(steps, on_step)

    # A UNet-only LoRA (what the trainer writes) is merged into the weights for the
    # request; anything else (text-encoder LoRAs) goes through diffusers' PEFT layers.
    merged = lora_path is not None and is_unet_only(Path(lora_path))
    # Once the native size's graphs are compiled, a call the compiled code has not seen
    # (a PEFT-layered LoRA) runs eagerly: seconds slower, instead of a compile that would
    # hold the request for minutes. Other shapes replay CUDA graphs (graphs.UNetGraphs).
    stance = "eager_on_recompile" if pipelines.warmed_up else "default"
    own_schedulers = base.scheduler, refiner_pipe.scheduler
    try:
        if scheduler is not None:
            seeds = _noise_seeds(jobs)
            base.scheduler = build_scheduler(scheduler, own_schedulers[0].config, seeds)
            refiner_pipe.scheduler = build_scheduler(scheduler, own_schedulers[1].config, seeds)
        if merged:
            pipelines.unet_lora.merge(Path(lora_path), lora_scale)
        elif lora_path is not None:
            _load_lora(pipelines, Path(lora_path), lora_scale)
        graphs_off = pipelines.graphs_paused() if lora_path and not merged else nullcontext()
        with torch.no_grad(), torch.compiler.set_stance(stance), graphs_off:
            base_inputs, generators = _base_inputs(pipelines, jobs, height, width, guidance_scale)
            # A scheduler that draws noise in its steps (euler_a) draws each image's from
            # its job's generator, which drew its starting noise: a job's images do not
            # depend on its batch. Without a scheduler the pipelines get none, as before.
            step_noise = {"generator": generators} if scheduler is not None else {}
            latents = base(
                **base_inputs,
                height=height,
                width=width,
                guidance_scale=guidance_scale,
                num_inference_steps=steps,
                # None: the whole schedule (stock diffusers' Base alone).
                denoising_end=refiner_switch if ensemble else None,
                output_type="latent",
                callback_on_step_end=report_step,
                **step_noise,
            ).images
            if lora_path is not None and not merged:
                # text_encoder_2 is shared with the Refiner; a LoRA that also trained it
                # must not reach the Refiner's prompt encoding.
                base.disable_lora()
            if ensemble:
                # The Refiner runs without CFG (guidance 1.0): one prompt encoding per image,
                # matching the latents' batch.
                prompt_embeds, pooled = _concatenated(
                    refiner_pipe.encode_prompt(
                        job.prompt,
                        device=pipelines.device,
                        num_images_per_prompt=job.num_images,
                        do_classifier_free_guidance=False,
                    )
                    for job in jobs
                )[::2]
                refined = refiner_pipe(
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled,
                    image=latents,
                    num_inference_steps=steps,
                    denoising_start=refiner_switch,
                    guidance_scale=1.0,
                    output_type="latent",
                    callback_on_step_end=report_step,
                    **step_noise,
                ).images
            else:
                refined = latents
            # One decode per job: the VAE's memory grows with its batch, and a batch of
            # several requests must not need more than the largest of them alone.
            images = [
                decode_latents(pipelines, part)
                for part in refined.split([job.num_images for job in jobs])
            ]
    finally:
        # The pipelines are shared by every request: the next one without a scheduler
        # must find the model's own.
        base.scheduler, refiner_pipe.scheduler = own_schedulers
        if merged:
            pipelines.unet_lora.restore()
        elif lora_path is not None:
            base.unload_lora_weights()
    return images


def _base_inputs(
    pipelines: Pipelines,
    jobs: list[GenerationJob],
    height: int,
    width: int,
    guidance_scale: float,
) -> tuple[dict[str, Any], list[torch.Generator]]:
    """The Base's prompt embeddings and starting noise for every job, concatenated, and
    one generator per image: its job's, after drawing the job's starting noise.

    Each job's noise comes from its own seed, drawn exactly as the pipeline draws it for
    one request (randn_tensor on the device, in the UNet's dtype), so a job's images do
    not depend on the other jobs of its batch.
    """
    base, device = pipelines.base, pipelines.device
    encodings = [
        base.encode_prompt(
            job.prompt,
            device=device,
            num_images_per_prompt=job.num_images,
            do_classifier_free_guidance=guidance_scale > 1.0,
            # SDXL's Base is meant to see zeros for an empty negative prompt
            # (force_zeros_for_empty_prompt); diffusers applies that only to None.
            negative_prompt=job.negative_prompt or None,
        )
        for job in jobs
    ]
    prompt_embeds, negative_embeds, pooled, negative_pooled = _concatenated(encodings)
    latent_shape = (
        base.unet.config.in_channels,
        height // base.vae_scale_factor,
        width // base.vae_scale_factor,
    )
    job_generators = [torch.Generator(device).manual_seed(job.seed) for job in jobs]
    latents = torch.cat(
        [
            randn_tensor(
                (job.num_images, *latent_shape),
                generator=generator,
                device=torch.device(device),
                dtype=prompt_embeds.dtype,
            )
            for job, generator in zip(jobs, job_generators, strict=True)
        ]
    )
    generators = [
        generator
        for job, generator in zip(jobs, job_generators, strict=True)
        for _ in range(job.num_images)
    ]
    return {
        "prompt_embeds": prompt_embeds,
        "negative_prompt_embeds": negative_embeds,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
        "latents": latents,
    }, generators


def _noise_seeds(jobs: list[GenerationJob]) -> list[int]:
    """One Brownian-tree seed per image (DPMSolverSDEScheduler's noise), drawn from its
    job's seed: the images of a job differ, and do not depend on the other jobs."""
    return [
        int(seed)
        for job in jobs
        for seed in torch.randint(
            0, 2**63 - 1, (job.num_images,), generator=torch.Generator().manual_seed(job.seed)
        )
    ]


def _concatenated(encodings) -> list[torch.Tensor | None]:
    """encode_prompt's tuples of several jobs, concatenated field by field (None stays)."""
    fields = list(zip(*encodings, strict=True))
    return [None if parts[0] is None else torch.cat(parts) for parts in fields]


def warm_up(pipelines: Pipelines) -> None:
    """Compile the UNets and capture their CUDA graphs for one image of the model's native
    size (1024² for SDXL), so that the first request does not pay for it.

    Does nothing for pipelines loaded without compile_unets. Afterwards other shapes and
    batch sizes replay CUDA graphs of the eager UNets, captured on their first request
    (graphs.UNetGraphs), or run eagerly where there are none (CPU, cuda_graphs off).
    """
    if not pipelines.compiled or pipelines.warmed_up:
        return
    size = pipelines.base.unet.config.sample_size * pipelines.base.vae_scale_factor
    # CUDA graph trees record a shape on its second or third call: 20 steps give the Base
    # 16 calls and the Refiner 4.
    with pipelines.recording_compiled_shapes():
        generate(pipelines, prompt="warm-up", height=size, width=size, steps=20, seed=0)
    pipelines.warmed_up = True


def _check_request(
    pipelines: Pipelines, jobs: list[GenerationJob], height: int, width: int, steps: int
) -> None:
    multiple = pipelines.base.vae_scale_factor
    problems = []
    if not jobs:
        problems.append("at least one job is needed")
    if any(job.num_images < 1 for job in jobs):
        problems.append("num_images must be at least 1")
    if steps < 1:
        problems.append("steps must be at least 1")
    if height < multiple or width < multiple or height % multiple or width % multiple:
        problems.append(f"height and width must be positive multiples of {multiple}")
    if problems:
        raise EngineError("invalid generation parameters: " + "; ".join(problems))


def _check_refiner(refiner: str, refiner_switch: float) -> None:
    problem = refiner_problem(refiner, refiner_switch)
    if problem:
        raise EngineError(problem)


def _step_reporter(
    steps: int, on_step: Callable[[int, int], None] | None
) -> Callable[[Any, int, Any, dict], dict]:
    """A diffusers step-end callback counting the steps of both pipelines together (of
    the Base alone when the Refiner does not run: then it runs all `steps`)."""
    done = 0

    def report(_pipeline: Any, _step_index: int, _timestep: Any, callback_kwargs: dict) -> dict:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, steps)
        return callback_kwargs

    return report


def _load_lora(pipelines: Pipelines, lora_path: Path, lora_scale: float) -> None:
    base = pipelines.base
    try:
        base.load_lora_weights(str(lora_path), adapter_name=LORA_ADAPTER_NAME)
        base.set_adapters([LORA_ADAPTER_NAME], adapter_weights=[lora_scale])
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        # A partly loaded LoRA must not linger in the cached pipeline.
        base.unload_lora_weights()
        raise EngineError(
            f"LoRA {lora_path.name} could not be applied to the SDXL base model ({error}); "
            "train it again or upload an SDXL LoRA in diffusers or kohya format"
        ) from error


def decode_latents(pipelines: Pipelines, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Decode with the float32 VAE.

    The pipelines' own decoding casts the VAE to the latents' dtype or upcasts a half
    precision VAE on every call; ours is float32 for good (load_pipelines), so the
    latents are cast to it instead.
    """
    vae = pipelines.base.vae
    decoded = vae.decode(latents.to(torch.float32) / vae.config.scaling_factor, return_dict=False)[
        0
    ]
    return pipelines.base.image_processor.postprocess(decoded, output_type="pil")
