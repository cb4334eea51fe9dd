"""LoRA training on the SDXL Base UNet (and, optionally, its text encoders), saved in
diffusers' own LoRA format."""

from __future__ import annotations

import hashlib
import math
import secrets
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from sdxl_engine.buckets import (
    MAX_UPSCALE,
    Placement,
    bucket_sizes,
    bucket_summary,
    bucketed_batches,
    place,
)
from sdxl_engine.checkpoints import (
    ResumeState,
    load_resume_state,
    run_fingerprint,
    save_resume_state,
)
from sdxl_engine.dataset import TrainingPair, training_captions
from sdxl_engine.errors import EngineError, TrainingCancelled
from sdxl_engine.files import write_atomically
from sdxl_engine.lora_keys import TARGET_PROJECTIONS
from sdxl_engine.parameters import (
    LR_SCHEDULERS,
    RECIPES,
    TrainingParams,
    every_steps,
    lr_warmup_problem,
)
from sdxl_engine.pipelines import Pipelines, forked_rng
from sdxl_engine.samples import default_sample_prompts, render_samples

ADAPTER_NAME = "sdxl_service_training"
# The attention projections of the key table: what uploads are checked against.
LORA_TARGET_MODULES = list(TARGET_PROJECTIONS)
# The CLIP text encoders' attention projections, as diffusers' SDXL LoRA script targets.
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Clip LoRA gradients like diffusers' SDXL LoRA training script: one bad batch cannot
# throw the weights far.
MAX_GRAD_NORM = 1.0
METADATA_PREFIX = "sdxl_service."
# Below this much free GPU memory (with the Base loaded), training recomputes activations
# instead of keeping them: at 1024², batch 4, keeping them takes 19.1 GiB beyond the Base
# (H100, bench/results/2026-11-27-h100-fp16/train-compiled.json), plus room to spare.
LOW_MEMORY_BELOW_FREE_GIB = 22


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    final_loss: float
    metadata: dict[str, str]  # the sdxl_service.* entries written into the file's header
    sha256: str  # of the bytes meant to be in the file: whoever moves it can verify it
    resumed_from_step: int = 0  # the checkpoint's step this run continued from


@dataclass
class _EncodedImages:
    """Per-image training inputs, computed once: VAE and text encoders are frozen."""

    # One (4, h/8, w/8) float32 tensor per image, at its bucket's size, already multiplied
    # by the VAE scaling factor.
    latents: list[torch.Tensor]
    placements: list[Placement]  # how each image was resized and cropped
    prompt_embeds: torch.Tensor  # (n, 77, te1 hidden + te2 hidden)
    pooled_prompt_embeds: torch.Tensor  # (n, te2 projection)
    captions: list[str]  # what each image trains with: encoded every step with a text encoder LoRA
    time_ids: torch.Tensor  # (n, 6): original h, w, crop top, left, target h, w
    # The empty caption's embeddings, (1, ...) each: what a dropped caption trains with.
    # None without caption dropout.
    empty_prompt_embeds: torch.Tensor | None = None
    empty_pooled_prompt_embeds: torch.Tensor | None = None


def train_lora(
    pipelines: Pipelines,
    pairs: list[TrainingPair],
    params: TrainingParams,
    output_path: Path,
    on_progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    low_memory: bool | None = None,
    state_dir: Path | None = None,
    on_checkpoint: Callable[[int, Path, str], None] | None = None,
    on_samples: Callable[[int, list[tuple[str, Image.Image]]], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
) -> TrainingResult:
    """Train a LoRA on the Base UNet's attention projections (and both text encoders'
    with `params.train_text_encoder`) and save it to `output_path`.

    `on_stage(stage)` runs as each stage begins: "caching" (the frozen VAE and text
    encoders encode every image once), "training" (the optimisation steps), "saving".
    `on_progress(step, total_steps, loss)` runs after every step. `should_stop()` is asked
    before every step and every caching batch; when it returns True, TrainingCancelled is
    raised and nothing is written. The adapters are removed from the models afterwards,
    whatever happens, so the loaded pipeline is as it was for the next job.
    `low_memory` trades speed for memory (see _low_memory_mode); None decides from the
    GPU's free memory.

    Every `params.checkpoint_every` steps (but the last) with a `state_dir`, the LoRA as it
    stands is written there and handed to `on_checkpoint(step, path, sha256)`, which may
    move it, and the state to resume from is saved there (sdxl_engine.checkpoints). A run
    that finds a state of its own settings and images in `state_dir` continues from it,
    and tells `on_resume(step)` which step it continues from before the first step.
    Every `params.sample_every` steps, `on_samples(step, [(prompt, image), ...])` gets
    sample images (sdxl_engine.samples).
    """
    if not pairs:
        raise EngineError(
            "no training images: add images with captions to the session (an image with a .txt "
            "of the same name beside it) and train again"
        )
    if pipelines.dtype == torch.float16:
        raise EngineError(
            "these pipelines were loaded for generation, in float16, whose gradients "
            "underflow without loss scaling; load them with purpose='training' to train"
        )
    base = pipelines.base
    resolution = params.resolution or base.unet.config.sample_size * base.vae_scale_factor
    multiple = _resolution_multiple(base)
    _check_params(params, resolution, multiple)
    captions = training_captions(pairs, params.trigger)
    buckets = bucket_sizes(resolution, multiple) if params.enable_bucket else [(resolution,) * 2]
    fingerprint = run_fingerprint(params, pairs, captions)
    resume = load_resume_state(state_dir, fingerprint) if state_dir is not None else None
    seed = (
        resume.seed
        if resume is not None
        else params.seed
        if params.seed is not None
        else secrets.randbelow(2**31)
    )
    stop = should_stop or (lambda: False)
    enter_stage = on_stage or (lambda stage: None)
    device = torch.device(pipelines.device)

    for frozen in (base.unet, base.vae, base.text_encoder, base.text_encoder_2):
        frozen.requires_grad_(False)
    low_memory = low_memory if low_memory is not None else needs_low_memory(device)
    # Seed a private copy of the global generators: PEFT draws the LoRA's initial weights
    # from them, and the worker's own random state stays untouched.
    with (
        forked_rng(device),
        _low_memory_mode(
            pipelines, low_memory, keep_text_encoders=params.train_text_encoder
        ) as encoders,
    ):
        torch.manual_seed(seed)
        noise_generator = torch.Generator(device).manual_seed(seed)
        enter_stage("caching")
        encoded = _encode_images(
            pipelines,
            pairs,
            captions,
            _Sizing(buckets, multiple, MAX_UPSCALE if params.enable_bucket else math.inf),
            params.batch_size,
            noise_generator,
            stop,
            with_empty_caption=params.caption_dropout > 0,
        )
        encoders.release()
        total_steps = params.steps or params.epochs * _batches_per_epoch(
            encoded.placements, params.batch_size
        )
        run = _Run(
            pipelines=pipelines,
            params=params,
            encoded=encoded,
            total_steps=total_steps,
            seed=seed,
            resolution=resolution,
            image_count=len(pairs),
            fingerprint=fingerprint,
        )
        watch = _Watch(
            run,
            state_dir=Path(state_dir) if state_dir is not None else None,
            on_checkpoint=on_checkpoint,
            on_samples=on_samples,
            on_resume=on_resume,
            sample_prompts=params.sample_prompts
            or default_sample_prompts(params.trigger, captions),
            encoders=encoders,
        )
        text_encoders = (
            [base.text_encoder, base.text_encoder_2] if params.train_text_encoder else []
        )
        try:
            base.unet.add_adapter(_lora_config(params.rank, LORA_TARGET_MODULES), ADAPTER_NAME)
            for text_encoder in text_encoders:
                _add_text_encoder_adapter(text_encoder, params.rank)
            enter_stage("training")
            final_loss, resumed_from_step = _optimise(
                run, noise_generator, on_progress, stop, watch, resume
            )
            metadata = run.metadata(final_loss)
            enter_stage("saving")
            sha256 = _save_lora(base, bool(text_encoders), Path(output_path), metadata)
        finally:
            base.unet.unload_lora()
            base.unet.eval()
            for text_encoder in text_encoders:
                _remove_adapters(text_encoder)
    return TrainingResult(
        steps=total_steps,
        final_loss=final_loss,
        metadata=metadata,
        sha256=sha256,
        resumed_from_step=resumed_from_step,
    )


@dataclass(frozen=True)
class _Run:
    """A run's settings as they were resolved, and its images as encoded."""

    pipelines: Pipelines
    params: TrainingParams
    encoded: _EncodedImages
    total_steps: int
    seed: int
    resolution: int
    image_count: int
    fingerprint: str

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        base = self.pipelines.base
        return [base.text_encoder, base.text_encoder_2] if self.params.train_text_encoder else []

    def metadata(self, loss: float, **extra) -> dict[str, str]:
        """The sdxl_service.* header entries of a LoRA file of this run."""
        params = self.params
        metadata = {
            "base_model": self.pipelines.source.base,
            "model_preset": self.pipelines.source.preset,
            "recipe": params.recipe,
            "rank": params.rank,
            "alpha": params.rank,
            **({"epochs": params.epochs} if not params.steps else {}),
            "steps": self.total_steps,
            "resolution": self.resolution,
            "enable_bucket": params.enable_bucket,
            "buckets": bucket_summary(self.encoded.placements),
            "learning_rate": params.learning_rate,
            "lr_scheduler": params.lr_scheduler,
            "lr_warmup_steps": params.lr_warmup_steps,
            "min_snr_gamma": params.min_snr_gamma,
            "noise_offset": params.noise_offset,
            "caption_dropout": params.caption_dropout,
            **({"trigger": params.trigger} if params.trigger is not None else {}),
            "train_text_encoder": params.train_text_encoder,
            **(
                {"text_encoder_lr": params.text_encoder_lr or params.learning_rate}
                if params.train_text_encoder
                else {}
            ),
            "batch_size": params.batch_size,
            "seed": self.seed,
            "num_images": self.image_count,
            "final_loss": f"{loss:.6g}",
            **extra,
        }
        return {METADATA_PREFIX + key: str(value) for key, value in metadata.items()}


def _lora_config(rank: int, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules
    )


def _add_text_encoder_adapter(text_encoder: torch.nn.Module, rank: int) -> None:
    """PEFT's own injection, recording the config where diffusers keeps a model's adapter
    configs (transformers' add_adapter would need a newer PEFT than is published)."""
    config = _lora_config(rank, TEXT_ENCODER_TARGET_MODULES)
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER_NAME)
    text_encoder.peft_config = {ADAPTER_NAME: config}


def _remove_adapters(text_encoder: torch.nn.Module) -> None:
    """Puts a text encoder's plain layers back in place of its LoRA layers, as diffusers'
    unload_lora_weights does for text encoders."""
    recurse_remove_peft_layers(text_encoder)
    if getattr(text_encoder, "peft_config", None) is not None:
        del text_encoder.peft_config
        text_encoder._hf_peft_config_loaded = None


@contextmanager
def _low_memory_mode(
    pipelines: Pipelines, enabled: bool, keep_text_encoders: bool
) -> Iterator[_Encoders]:
    """What lets SDXL train at 1024², batch 4, on a 16 GB card, when `enabled`:

    - the text encoders (unless `keep_text_encoders`: they train too) and the VAE (2 GB)
      wait in CPU memory while the UNet trains, once the images are cached (the yielded
      object's release()): they are not needed then, but for sample images;
    - gradient checkpointing: the UNet keeps each block's input and recomputes the rest
      in the backward pass, about a third more compute for a fraction of the memory.

    Everything is put back as it was afterwards, whatever happens.
    """
    base = pipelines.base
    models = (
        (base.vae,) if keep_text_encoders else (base.text_encoder, base.text_encoder_2, base.vae)
    )
    # On the CPU they are in CPU memory already.
    encoders = _Encoders(models, pipelines.device, offload=enabled and pipelines.device != "cpu")
    if not enabled:
        yield encoders
        return
    base.unet.enable_gradient_checkpointing()
    try:
        yield encoders
    finally:
        base.unet.disable_gradient_checkpointing()
        encoders.restore()


class _Encoders:
    """The frozen encoders low-memory mode keeps in CPU memory while the UNet trains."""

    def __init__(self, models: tuple[torch.nn.Module, ...], device: str, offload: bool):
        self._models, self._device, self._offload = models, device, offload
        self._released = False

    def release(self) -> None:
        if self._offload:
            for model in self._models:
                model.to("cpu")
            torch.cuda.empty_cache()
            self._released = True

    def restore(self) -> None:
        if self._released:
            for model in self._models:
                model.to(self._device)
            self._released = False

    @contextmanager
    def borrowed(self) -> Iterator[None]:
        """The encoders on the device for the block (sample images need them)."""
        released = self._released
        self.restore()
        try:
            yield
        finally:
            if released:
                self.release()


def needs_low_memory(device: torch.device) -> bool:
    """True when the GPU has too little free memory to train SDXL at 1024², batch 4, with
    every activation kept (see LOW_MEMORY_BELOW_FREE_GIB)."""
    if device.type != "cuda":
        return False
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return free_bytes < LOW_MEMORY_BELOW_FREE_GIB * 2**30


def _check_params(params: TrainingParams, resolution: int, multiple: int) -> None:
    problems = []
    if params.batch_size < 1:
        problems.append("batch_size must be at least 1")
    if params.steps is None and params.epochs is None:
        problems.append("give steps or epochs (training_params fills them from the recipe)")
    if params.epochs is not None and params.epochs < 1:
        problems.append("epochs must be at least 1")
    if params.steps is not None and params.steps < 1:
        problems.append("steps must be at least 1")
    for name in ("learning_rate", "text_encoder_lr"):
        value = getattr(params, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            problems.append(f"{name} must be a positive number")
    if params.rank < 1:
        problems.append("rank must be at least 1")
    if params.lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}")
    if params.lr_warmup_steps < 0:
        problems.append("lr_warmup_steps must be 0 or more")
    elif warmup_problem := lr_warmup_problem(params.lr_scheduler, params.lr_warmup_steps):
        problems.append(f"lr_warmup_steps {warmup_problem}")
    for name in ("min_snr_gamma", "noise_offset"):
        value = getattr(params, name)
        if not (value >= 0 and math.isfinite(value)):
            problems.append(f"{name} must be 0 (off) or a positive number")
    if not 0 <= params.caption_dropout <= 1:
        problems.append("caption_dropout must be a probability, from 0 to 1")
    for name in ("sample_every", "checkpoint_every"):
        value = getattr(params, name)
        if value is not None and value < 0:
            problems.append(f"{name} must be 0 (never) or more")
    if params.sample_prompts is not None and not all(
        isinstance(prompt, str) and prompt.strip() for prompt in params.sample_prompts
    ):
        problems.append("sample_prompts must be non-blank strings")
    if params.recipe not in RECIPES:
        problems.append(f"recipe must be one of {', '.join(RECIPES)}")
    if params.trigger is not None and not params.trigger.strip():
        problems.append("trigger must not be blank")
    if resolution < multiple or resolution % multiple:
        problems.append(f"resolution must be a positive multiple of {multiple} for this model")
    if problems:
        raise EngineError("invalid training parameters: " + "; ".join(problems))


def _resolution_multiple(base: StableDiffusionXLPipeline) -> int:
    # The VAE divides the image by vae_scale_factor and each UNet down block but the last
    # halves the latent again; both must divide evenly for the skip connections to match.
    return base.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)


@dataclass(frozen=True)
class _Sizing:
    """The sizes images may train at, what their sides divide by, and how far a small
    image may be enlarged (sdxl_engine.buckets.place)."""

    buckets: list[tuple[int, int]]
    multiple: int
    max_upscale: float


def _encode_images(
    pipelines: Pipelines,
    pairs: list[TrainingPair],
    captions: list[str],
    sizing: _Sizing,
    batch_size: int,
    generator: torch.Generator,
    stop: Callable[[], bool],
    with_empty_caption: bool,
) -> _EncodedImages:
    """Each image's latents at its bucket's size, and its caption's embeddings (and,
    `with_empty_caption`, the empty caption's, encoded through the text encoders like any
    caption, as diffusers' SDXL training script does for its empty prompts)."""
    base, device = pipelines.base, pipelines.device
    latents, placements, time_ids = [], [], []
    parts: dict[str, list[torch.Tensor]] = {"prompt_embeds": [], "pooled": []}
    for start in range(0, len(pairs), batch_size):
        if stop():
            raise TrainingCancelled("training was cancelled; no LoRA was saved")
        with torch.no_grad():
            # The VAE is float32 (see load_pipelines); SDXL's overflows in float16. One
            # image at a time: each has its own size, and its activations at 1024² take
            # about 2 GB, while encoding four at once saves nothing worth having in a step
            # done once.
            for pair in pairs[start : start + batch_size]:
                pixels, placement = _load_image(pair.image_path, sizing)
                distribution = base.vae.encode(pixels[None].to(device, torch.float32)).latent_dist
                latents.append(distribution.sample(generator)[0] * base.vae.config.scaling_factor)
                placements.append(placement)
                time_ids.append(placement.time_ids)
            prompt_embeds, _, pooled, _ = base.encode_prompt(
                prompt=captions[start : start + batch_size],
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        parts["prompt_embeds"].append(prompt_embeds)
        parts["pooled"].append(pooled)
    prompt_embeds = torch.cat(parts["prompt_embeds"])
    encoded = _EncodedImages(
        latents=latents,
        placements=placements,
        captions=captions,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=torch.cat(parts["pooled"]),
        time_ids=torch.tensor(time_ids, device=device, dtype=prompt_embeds.dtype),
    )
    if with_empty_caption:
        with torch.no_grad():
            empty, _, empty_pooled, _ = base.encode_prompt(
                prompt=[""],
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        encoded.empty_prompt_embeds, encoded.empty_pooled_prompt_embeds = empty, empty_pooled
    return encoded


def _load_image(path: Path, sizing: _Sizing) -> tuple[torch.Tensor, Placement]:
    """The image as a (3, height, width) tensor in [-1, 1] at the size of its bucket, and
    how it was placed there (sdxl_engine.buckets: resized to cover the bucket, the excess
    cropped, centred; the time ids tell the UNet the original size and the crop, as in
    SDXL's own training)."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise EngineError(
            f"training image {path.name} could not be read ({error}); "
            "replace or delete it and train again"
        ) from error
    placement = place(image.size, sizing.buckets, sizing.multiple, sizing.max_upscale)
    image = placement.apply(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, placement


def _batches_per_epoch(placements: list[Placement], batch_size: int) -> int:
    counts = Counter(placement.size for placement in placements)
    return sum(math.ceil(count / batch_size) for count in counts.values())


def _optimise(
    run: _Run,
    noise_generator: torch.Generator,
    on_progress: Callable[[int, int, float], None] | None,
    stop: Callable[[], bool],
    watch: _Watch,
    resume: ResumeState | None,
) -> tuple[float, int]:
    """Runs the optimisation steps, from `resume`'s step when given; returns the last
    loss and the step the run resumed from (0 for a run from the start)."""
    pipelines, encoded, params, total_steps = (
        run.pipelines,
        run.encoded,
        run.params,
        run.total_steps,
    )
    unet, device, dtype = pipelines.base.unet, pipelines.device, pipelines.dtype
    # The LoRA factors run in the UNet's precision: float32 factors would make PEFT cast
    # every attention input up and back in each of 560 projections (training 6.9 -> 9.3
    # img/s in bfloat16 on an H200, bench/levers.py). Adam updates float32 master copies
    # instead, since half-precision updates of small weights round to zero.
    trained_text_encoders = run.text_encoders
    for model in (unet, *trained_text_encoders):
        cast_training_params(model, dtype=dtype)
    unet_parameters = _trainable(unet)
    text_encoder_parameters = [p for model in trained_text_encoders for p in _trainable(model)]
    masters = _MasterWeights(unet_parameters + text_encoder_parameters)
    groups = [{"params": masters.parameters[: len(unet_parameters)], "lr": params.learning_rate}]
    if text_encoder_parameters:
        groups.append(
            {
                "params": masters.parameters[len(unet_parameters) :],
                "lr": params.text_encoder_lr or params.learning_rate,
            }
        )
    # The fused CUDA kernel updates all LoRA tensors in one launch instead of several each.
    optimizer = torch.optim.AdamW(groups, fused=torch.device(device).type == "cuda")
    learning_rates = learning_rate_schedule(optimizer, params, total_steps)
    # The DDPM forward process with SDXL's betas: what SDXL was trained with.
    noise_scheduler = DDPMScheduler.from_config(pipelines.base.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise EngineError(
            f"cannot train a model with prediction_type {prediction_type!r}; use an SDXL model"
        )

    unet.train()
    loss_value, resumed_from_step = math.nan, 0
    if resume is not None and resume.total_steps == total_steps:
        masters.load(resume.masters)
        optimizer.load_state_dict(resume.optimizer)
        learning_rates.load_state_dict(resume.lr_scheduler)
        noise_generator.set_state(resume.noise_generator)
        loss_value, resumed_from_step = resume.loss, resume.step
        watch.resumed(resumed_from_step)
    batches = bucketed_batches(
        [placement.size for placement in encoded.placements],
        params.batch_size,
        total_steps,
        torch.Generator().manual_seed(run.seed),
        torch.Generator().manual_seed(run.seed + 1),
    )
    with _training_compilation(unet, pipelines.compiled):
        for step, indices in enumerate(batches, start=1):
            if step <= resumed_from_step:
                continue  # replays the batch order up to where the run stopped
            if stop():
                raise TrainingCancelled("training was cancelled; no LoRA was saved")
            latents = torch.stack([encoded.latents[index] for index in indices])
            indices = torch.tensor(indices, device=device)
            noise = _noise(latents, params.noise_offset, noise_generator)
            timesteps = torch.randint(
                0,
                noise_scheduler.config.num_train_timesteps,
                (len(indices),),
                generator=noise_generator,
                device=device,
            )
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            target = (
                noise
                if prediction_type == "epsilon"
                else noise_scheduler.get_velocity(latents, noise, timesteps)
            )
            if trained_text_encoders:
                prompt_embeds, pooled_prompt_embeds = encoded_caption_conditioning(
                    pipelines, encoded.captions, indices, params.caption_dropout, noise_generator
                )
            else:
                prompt_embeds, pooled_prompt_embeds = caption_conditioning(
                    encoded, indices, params.caption_dropout, noise_generator
                )
            # No autocast: the UNet's weights are already bfloat16, and autocast would run
            # its norms and softmax in float32 for nothing but memory traffic.
            prediction = unet(
                noisy_latents.to(dtype),
                timesteps,
                encoder_hidden_states=prompt_embeds,
                added_cond_kwargs={
                    "text_embeds": pooled_prompt_embeds,
                    "time_ids": encoded.time_ids[indices],
                },
                return_dict=False,
            )[0]
            loss = _loss(prediction, target, timesteps, noise_scheduler, params.min_snr_gamma)
            optimizer.zero_grad(set_to_none=True)
            # bfloat16 shares float32's exponent range: gradients need no loss scaling.
            loss.backward()
            masters.take_gradients()
            torch.nn.utils.clip_grad_norm_(masters.parameters, MAX_GRAD_NORM)
            optimizer.step()
            learning_rates.step()
            masters.copy_to_model()

            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise EngineError(
                    "training diverged (the loss is not finite); lower learning_rate and "
                    "train again"
                )
            if on_progress is not None:
                on_progress(step, total_steps, loss_value)
            watch.after_step(
                step,
                loss_value,
                _Optimisation(masters, optimizer, learning_rates, noise_generator),
            )
    if stop():
        raise TrainingCancelled("training was cancelled; no LoRA was saved")
    # The file keeps the full-precision weights the optimiser arrived at.
    for model in (unet, *trained_text_encoders):
        cast_training_params(model, dtype=torch.float32)
    masters.copy_to_model()
    return loss_value, resumed_from_step


@dataclass(frozen=True)
class _Optimisation:
    """What the loop changes from step to step: what a checkpoint saves to resume from."""

    masters: _MasterWeights
    optimizer: torch.optim.Optimizer
    learning_rates: torch.optim.lr_scheduler.LRScheduler
    noise_generator: torch.Generator


class _Watch:
    """Sample images and checkpoints along a run (see train_lora)."""

    def __init__(
        self,
        run: _Run,
        state_dir: Path | None,
        on_checkpoint: Callable[[int, Path, str], None] | None,
        on_samples: Callable[[int, list[tuple[str, Image.Image]]], None] | None,
        sample_prompts: list[str],
        encoders: _Encoders,
        on_resume: Callable[[int], None] | None,
    ):
        params = run.params
        self._run, self._state_dir, self._encoders = run, state_dir, encoders
        self._on_checkpoint, self._on_samples = on_checkpoint, on_samples
        self._on_resume = on_resume
        self._sample_prompts = sample_prompts
        self._sample_seed = params.sample_seed if params.sample_seed is not None else run.seed
        self.sample_every = every_steps(params.sample_every, run.total_steps)
        self.checkpoint_every = every_steps(params.checkpoint_every, run.total_steps)

    def resumed(self, step: int) -> None:
        if self._on_resume is not None:
            self._on_resume(step)

    def after_step(self, step: int, loss: float, optimisation: _Optimisation) -> None:
        if (
            self._on_samples is not None
            and self._sample_prompts
            and self.sample_every
            and step % self.sample_every == 0
        ):
            self._samples(step)
        if (
            self._state_dir is not None
            and self.checkpoint_every
            and step % self.checkpoint_every == 0
            and step < self._run.total_steps  # the last step's file is the LoRA itself
        ):
            self._checkpoint(step, loss, optimisation)

    def _samples(self, step: int) -> None:
        run = self._run
        with self._encoders.borrowed():
            images = render_samples(
                run.pipelines, self._sample_prompts, self._sample_seed, run.resolution
            )
        self._on_samples(step, list(zip(self._sample_prompts, images, strict=True)))

    def _checkpoint(self, step: int, loss: float, optimisation: _Optimisation) -> None:
        run, masters = self._run, optimisation.masters
        models = (run.pipelines.base.unet, *run.text_encoders)
        self._state_dir.mkdir(parents=True, exist_ok=True)
        path = self._state_dir / f"checkpoint-{step}.safetensors"
        # The file holds the float32 weights the optimiser has reached, as the final one.
        for model in models:
            cast_training_params(model, dtype=torch.float32)
        masters.copy_to_model()
        try:
            sha256 = _save_lora(
                run.pipelines.base,
                bool(run.text_encoders),
                path,
                run.metadata(loss, checkpoint_step=step),
            )
        finally:
            for model in models:
                cast_training_params(model, dtype=run.pipelines.dtype)
            masters.copy_to_model()
        save_resume_state(
            self._state_dir,
            ResumeState(
                fingerprint=run.fingerprint,
                step=step,
                total_steps=run.total_steps,
                seed=run.seed,
                loss=loss,
                masters=masters.parameters,
                optimizer=optimisation.optimizer.state_dict(),
                lr_scheduler=optimisation.learning_rates.state_dict(),
                noise_generator=optimisation.noise_generator.get_state(),
            ),
        )
        if self._on_checkpoint is not None:
            self._on_checkpoint(step, path, sha256)


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, params: TrainingParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """params.lr_scheduler over the run, stepped once per optimisation step: diffusers'
    schedules, which kohya's sd-scripts and diffusers' training scripts share by name."""
    return get_scheduler(
        params.lr_scheduler,
        optimizer,
        num_warmup_steps=params.lr_warmup_steps,
        num_training_steps=total_steps,
    )


def _noise(latents: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise for `latents`, plus `offset` times one draw per image and channel
    (noise offset); without an offset, the same draws as plain noise."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if offset:
        per_channel = (latents.shape[0], latents.shape[1], 1, 1)
        shift = torch.randn(per_channel, generator=generator, device=latents.device)
        noise = noise + offset * shift
    return noise


def caption_conditioning(
    encoded: _EncodedImages,
    indices: torch.Tensor,
    caption_dropout: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's caption embeddings and pooled embeddings, each sample's replaced by the
    empty caption's with probability `caption_dropout` (no random draw without it)."""
    prompt_embeds = encoded.prompt_embeds[indices]
    pooled = encoded.pooled_prompt_embeds[indices]
    if not caption_dropout:
        return prompt_embeds, pooled
    draws = torch.rand(len(indices), generator=generator, device=indices.device)
    dropped = draws < caption_dropout
    return (
        torch.where(dropped[:, None, None], encoded.empty_prompt_embeds, prompt_embeds),
        torch.where(dropped[:, None], encoded.empty_pooled_prompt_embeds, pooled),
    )


def encoded_caption_conditioning(
    pipelines: Pipelines,
    captions: list[str],
    indices: torch.Tensor,
    caption_dropout: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's captions through the text encoders, with their LoRA and gradients, each
    replaced by the empty caption with probability `caption_dropout` (the same draws as
    caption_conditioning)."""
    batch = [captions[index] for index in indices.tolist()]
    if caption_dropout:
        draws = torch.rand(len(indices), generator=generator, device=indices.device)
        batch = [
            "" if dropped else caption
            for caption, dropped in zip(batch, draws < caption_dropout, strict=True)
        ]
    prompt_embeds, _, pooled, _ = pipelines.base.encode_prompt(
        prompt=batch,
        device=pipelines.device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
    )
    return prompt_embeds, pooled


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def min_snr_loss_weights(
    noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Each sample's Min-SNR-gamma weight: min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction (whose target's scale differs), as in
    diffusers' SDXL LoRA training script."""
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    min_snr_gamma: float,
) -> torch.Tensor:
    """The batch's MSE, each sample weighted by Min-SNR when `min_snr_gamma` is set."""
    if not min_snr_gamma:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * min_snr_loss_weights(noise_scheduler, timesteps, min_snr_gamma)).mean()


class _MasterWeights:
    """Float32 copies of half-precision trainable weights, for the optimiser to update.

    For float32 weights (on the CPU) the weights themselves are the masters: no copies.
    """

    def __init__(self, model_parameters: list[torch.nn.Parameter]):
        self._model = model_parameters
        self._copies = any(parameter.dtype != torch.float32 for parameter in model_parameters)
        self.parameters = (
            [parameter.detach().float().requires_grad_() for parameter in model_parameters]
            if self._copies
            else model_parameters
        )

    def take_gradients(self) -> None:
        if self._copies:
            for master, parameter in zip(self.parameters, self._model, strict=True):
                master.grad = None if parameter.grad is None else parameter.grad.float()
                parameter.grad = None

    @torch.no_grad()
    def load(self, saved: list[torch.Tensor]) -> None:
        """Takes the values of masters saved from a run of the same adapters."""
        torch._foreach_copy_(
            self.parameters, [tensor.to(self.parameters[0].device) for tensor in saved]
        )
        self.copy_to_model()

    @torch.no_grad()
    def copy_to_model(self) -> None:
        if self._copies:
            torch._foreach_copy_(self._model, self.parameters)


@contextmanager
def _training_compilation(unet: torch.nn.Module, compiled: bool) -> Iterator[None]:
    """Compile the UNet's transformer blocks for training when the pipelines are compiled.

    The whole-UNet CUDA graphs compiled for generation do not fit training (LoRA layers
    change the graph, and compiling a training graph of the whole UNet takes over five
    minutes); regional compilation of the repeated blocks takes seconds. The generation
    graphs are set aside meanwhile and put back untouched.
    """
    if not compiled:
        yield
        return
    generation_graphs = unet._compiled_call_impl
    unet._compiled_call_impl = None
    try:
        unet.compile_repeated_blocks()
        yield
    finally:
        for module in unet.modules():
            module._compiled_call_impl = None
        unet._compiled_call_impl = generation_graphs


def _save_lora(
    base: StableDiffusionXLPipeline,
    with_text_encoders: bool,
    output_path: Path,
    metadata: dict[str, str],
) -> str:
    """Save the adapters (the UNet's, and the text encoders' `with_text_encoders`) with
    diffusers' own LoRA writer, adding our metadata to its header; returns the sha256 of
    the file's bytes.

    diffusers writes to a fixed file name and fills the header itself (format, adapter
    config) only with its default writer, so it writes to a scratch folder and the
    result is rewritten atomically to `output_path` with both sets of metadata. The bytes
    are hashed in memory, before they reach the disk, so a file that comes out truncated
    or altered does not match.
    """
    components = {"unet": base.unet}
    if with_text_encoders:
        components.update(text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2)
    layers = {}
    for name, model in components.items():
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        )
        layers[f"{name}_lora_adapter_metadata"] = {
            # Sets become lists in the header; sorted, so the same training gives the same
            # metadata.
            key: sorted(value) if isinstance(value, set) else value
            for key, value in model.peft_config[ADAPTER_NAME].to_dict().items()
        }
    try:
        with tempfile.TemporaryDirectory(prefix="sdxl-lora-") as scratch:
            StableDiffusionXLPipeline.save_lora_weights(
                scratch, weight_name="lora.safetensors", safe_serialization=True, **layers
            )
            with safe_open(Path(scratch, "lora.safetensors"), framework="pt") as written:
                tensors = {key: written.get_tensor(key) for key in written.keys()}
                header_metadata = {**(written.metadata() or {}), **metadata}
        data = safetensors_bytes(tensors, metadata=header_metadata)
        write_atomically(output_path, lambda tmp_path: tmp_path.write_bytes(data))
    except OSError as error:
        raise EngineError(
            f"the LoRA could not be saved to {output_path} ({error}); "
            "check that the session still exists and the disk has space, then train again"
        ) from error
    return hashlib.sha256(data).hexdigest()
