"""The optimisation steps of a run: noise, the UNet's prediction, the loss, the update."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import cast_training_params, compute_snr

from sdxl_engine.buckets import bucketed_batches
from sdxl_engine.errors import EngineError, TrainingCancelled
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import TrainingParams
from sdxl_engine.training.adapters import MasterWeights
from sdxl_engine.training.caching import EncodedImages, Run
from sdxl_engine.training.checkpoints import ResumeState
from sdxl_engine.training.watch import Optimisation, Watch

# Clip LoRA gradients like diffusers' SDXL LoRA training script: one bad batch cannot
# throw the weights far.
MAX_GRAD_NORM = 1.0


def optimise(
    run: Run,
    noise_generator: torch.Generator,
    on_progress: Callable[[int, int, float], None] | None,
    stop: Callable[[], bool],
    watch: Watch,
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
    # The masters start from the adapters' values before the cast: a continued LoRA's
    # float32 weights (adapters.load_parent_weights), not their rounding.
    starting_values = [
        parameter.detach().float().clone()
        for model in (unet, *trained_text_encoders)
        for parameter in _trainable(model)
    ]
    for model in (unet, *trained_text_encoders):
        cast_training_params(model, dtype=dtype)
    unet_parameters = _trainable(unet)
    text_encoder_parameters = [p for model in trained_text_encoders for p in _trainable(model)]
    masters = MasterWeights(unet_parameters + text_encoder_parameters)
    masters.load(starting_values)
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
    noise_scheduler: DDPMScheduler = DDPMScheduler.from_config(pipelines.base.scheduler.config)
    prediction_type = noise_scheduler.config["prediction_type"]
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
        for step, batch in enumerate(batches, start=1):
            if step <= resumed_from_step:
                continue  # replays the batch order up to where the run stopped
            if stop():
                raise TrainingCancelled("training was cancelled; no LoRA was saved")
            latents = torch.stack([encoded.latents[index] for index in batch])
            indices = torch.tensor(batch, device=device)
            noise = _noise(latents, params.noise_offset, noise_generator)
            timesteps = torch.randint(
                0,
                noise_scheduler.config["num_train_timesteps"],
                (len(indices),),
                generator=noise_generator,
                device=device,
            )
            # diffusers annotates timesteps as the legacy torch.IntTensor (int32); its own
            # training scripts pass randint's int64 tensor, as here.
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)  # type: ignore[arg-type]
            target = (
                noise
                if prediction_type == "epsilon"
                else noise_scheduler.get_velocity(latents, noise, timesteps)  # type: ignore[arg-type]
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
            loss = training_loss(
                prediction,
                target,
                timesteps,
                noise_scheduler,
                params.min_snr_gamma,
                mask_weights(encoded.masks, batch, params.background_weight),
            )
            if params.prior_preservation_weight:
                loss = loss + params.prior_preservation_weight * prior_preservation_loss(
                    run, noisy_latents.to(dtype), timesteps, indices, noise_generator
                )
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
                Optimisation(masters, optimizer, learning_rates, noise_generator),
            )
    if stop():
        raise TrainingCancelled("training was cancelled; no LoRA was saved")
    # The file keeps the full-precision weights the optimiser arrived at.
    for model in (unet, *trained_text_encoders):
        cast_training_params(model, dtype=torch.float32)
    masters.copy_to_model()
    return loss_value, resumed_from_step


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
    encoded: EncodedImages,
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
    empty, empty_pooled = encoded.empty_prompt_embeds, encoded.empty_pooled_prompt_embeds
    # The run encodes the empty caption whenever captions drop out (encode_images).
    assert empty is not None and empty_pooled is not None
    draws = torch.rand(len(indices), generator=generator, device=indices.device)
    dropped = draws < caption_dropout
    return (
        torch.where(dropped[:, None, None], empty, prompt_embeds),
        torch.where(dropped[:, None], empty_pooled, pooled),
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
        # diffusers annotates prompt as str; it takes a list too (its docstring).
        prompt=batch,  # type: ignore[arg-type]
        device=torch.device(pipelines.device),
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
    )
    return prompt_embeds, pooled


def prior_preservation_loss(
    run: Run,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    indices: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """How far the LoRA moves the UNet's prediction for each image's class prompt from the
    base model's own (OneTrainer's prior-model preservation: no regularisation images).

    The step's noisy latents and timesteps are predicted under the class prompt twice:
    with the LoRA switched off and no gradients (the target: the base model's prediction,
    conditioned on the class prompt as encoded once without any LoRA), then with it on.
    The MSE between them is unweighted, as diffusers' DreamBooth script keeps its prior
    loss outside Min-SNR. Costs one more forward pass without gradients and one with them
    per step. With a text-encoder LoRA, the LoRA's side encodes the class prompts through
    it, so the encoders' LoRA is held to the base's conditioning too.
    """
    unet, encoded = run.pipelines.base.unet, run.encoded
    # encode_images encodes them whenever the run preserves the prior (train_lora).
    assert encoded.class_prompts is not None
    assert encoded.class_prompt_embeds is not None
    assert encoded.class_pooled_prompt_embeds is not None
    time_ids = encoded.time_ids[indices]
    with torch.no_grad(), _adapters_disabled(unet):
        base_prediction = unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoded.class_prompt_embeds[indices],
            added_cond_kwargs={
                "text_embeds": encoded.class_pooled_prompt_embeds[indices],
                "time_ids": time_ids,
            },
            return_dict=False,
        )[0]
    if run.text_encoders:
        prompt_embeds, pooled = encoded_caption_conditioning(
            run.pipelines, encoded.class_prompts, indices, 0.0, generator
        )
    else:
        prompt_embeds = encoded.class_prompt_embeds[indices]
        pooled = encoded.class_pooled_prompt_embeds[indices]
    prediction = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )[0]
    return F.mse_loss(prediction.float(), base_prediction.float())


@contextmanager
def _adapters_disabled(unet: UNet2DConditionModel) -> Iterator[None]:
    """The UNet as it was before its LoRA, for the block (PEFT keeps the adapter's weights
    and marks them trainable again when it is switched back on)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def min_snr_loss_weights(
    noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Each sample's Min-SNR-gamma weight: min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction (whose target's scale differs), as in
    diffusers' SDXL LoRA training script."""
    snr: torch.Tensor = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config["prediction_type"] == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def mask_weights(
    masks: list[torch.Tensor] | None, batch: list[int], background_weight: float
) -> torch.Tensor | None:
    """The batch's per-pixel loss weights, (batch, 1, h, w): background_weight + (1 -
    background_weight) x mask, 1 on the subject and background_weight where the mask is
    black; None for a run without masks."""
    if masks is None:
        return None
    mask = torch.stack([masks[index] for index in batch])
    return background_weight + (1 - background_weight) * mask


def training_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    min_snr_gamma: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's MSE, each sample weighted by Min-SNR when `min_snr_gamma` is set.

    With `weights` (mask_weights), each pixel's squared error is multiplied by its weight
    before the mean over every pixel, as kohya's masked loss and cog-sdxl do: a weight of 0
    takes the pixel out of the gradient entirely, and the mean still divides by all pixels,
    so a small subject trains with a smaller loss (neither of them renormalises by its area).
    """
    if weights is None and not min_snr_gamma:
        return F.mse_loss(prediction.float(), target.float())
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if weights is not None:
        squared = squared * weights
    if not min_snr_gamma:
        return squared.mean()
    per_sample = squared.mean(dim=list(range(1, squared.ndim)))
    return (per_sample * min_snr_loss_weights(noise_scheduler, timesteps, min_snr_gamma)).mean()


@contextmanager
def _training_compilation(unet: UNet2DConditionModel, compiled: bool) -> Iterator[None]:
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
