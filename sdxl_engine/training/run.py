"""LoRA training on the SDXL Base UNet (and, optionally, its text encoders), saved in
diffusers' own LoRA format: train_lora runs the stages in order."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from PIL import Image

from sdxl_engine.buckets import MAX_UPSCALE, bucket_sizes
from sdxl_engine.continuation import ParentLora, parent_problems, read_parent_lora
from sdxl_engine.dataset import (
    TrainingPair,
    class_prompts,
    held_out_indices,
    mask_problem,
    training_captions,
)
from sdxl_engine.errors import EngineError
from sdxl_engine.generation.pipelines import Pipelines, forked_rng
from sdxl_engine.lora_files import module_shapes
from sdxl_engine.lora_formats import SDXL_LAYERS_PER_BLOCK, canonical_tensors
from sdxl_engine.lora_keys import COMPONENTS, TEXT_ENCODERS, UNET
from sdxl_engine.parameters import (
    LR_SCHEDULERS,
    MAX_PRIOR_PRESERVATION_WEIGHT,
    RECIPES,
    TrainingParams,
    lr_warmup_problem,
)
from sdxl_engine.training.adapters import (
    ADAPTER_NAME,
    LORA_TARGET_MODULES,
    TEXT_ENCODER_TARGET_MODULES,
    adapter_targets,
    add_text_encoder_adapter,
    load_parent_weights,
    lora_config,
    remove_adapters,
    save_lora,
)
from sdxl_engine.training.caching import (
    Run,
    Sizing,
    batches_per_epoch,
    encode_images,
    low_memory_mode,
    needs_low_memory,
)
from sdxl_engine.training.checkpoints import load_resume_state, run_fingerprint
from sdxl_engine.training.console import StepProgress
from sdxl_engine.training.evaluation import EVAL_SEED, Evaluation, eval_images
from sdxl_engine.training.loop import optimise
from sdxl_engine.training.samples import default_sample_prompts
from sdxl_engine.training.similarity import ImageEmbedder
from sdxl_engine.training.watch import Watch


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    final_loss: float
    metadata: dict[str, str]  # the sdxl_service.* entries written into the file's header
    sha256: str  # of the bytes meant to be in the file: whoever moves it can verify it
    resumed_from_step: int = 0  # the checkpoint's step this run continued from
    eval_loss: float | None = None  # the finished LoRA's scores (training.evaluation)
    similarity: float | None = None


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
    console: TextIO | None = None,
    init_lora: Path | None = None,
    embedder: ImageEmbedder | None = None,
) -> TrainingResult:
    """Train a LoRA on the Base UNet's attention projections (and both text encoders'
    with `params.train_text_encoder`) and save it to `output_path`.

    `on_stage(stage)` runs as each stage begins: "caching" (the frozen VAE and text
    encoders encode every image once), "training" (the optimisation steps), "saving".
    `on_progress(step, total_steps, loss)` runs after every step. `should_stop()` is asked
    before every step and every caching batch; when it returns True, TrainingCancelled is
    raised and nothing is written. The adapters are removed from the models afterwards,
    whatever happens, so the loaded pipeline is as it was for the next job.
    `low_memory` trades speed for memory (see low_memory_mode); None decides from the
    GPU's free memory.

    Every `params.checkpoint_every` steps (but the last) with a `state_dir`, the LoRA as it
    stands is written there and handed to `on_checkpoint(step, path, sha256)`, which may
    move it, and the state to resume from is saved there (training.checkpoints). A run
    that finds a state of its own settings and images in `state_dir` continues from it,
    and tells `on_resume(step)` which step it continues from before the first step.
    Every `params.sample_every` steps and at the last step (as kohya's sd-scripts;
    parameters.sample_steps), `on_samples(step, [(prompt, image), ...])` gets sample
    images (training.samples).

    The weights are scored before the first step, at each checkpoint and at the end
    (training.evaluation: the eval loss over the `params.eval_holdout` photos withheld from
    training, or over the training photos without any; with an `embedder`, the similarity
    of the samples to the photos); each file's header records its scores.

    The steps show on `console` (stderr when None; training.console): a progress bar with
    the time per step and the loss on a terminal, a line per tenth of the run elsewhere.

    With `init_lora`, the run continues that LoRA file (sdxl_engine.continuation): its
    adapters are the file's modules at its rank, starting from its weights; the file must
    fit the model and agree with `params` (rank, train_text_encoder), and its sha256 is
    part of what a resume state must have been saved under.
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
    _check_params(params, resolution, multiple, len(pairs))
    if problem := mask_problem(pairs, params.masked_loss, params.use_alpha_mask):
        raise EngineError(problem)
    parent = _parent_lora(base, init_lora, params) if init_lora is not None else None
    captions = training_captions(pairs, params.trigger)
    buckets = bucket_sizes(resolution, multiple) if params.enable_bucket else [(resolution,) * 2]
    fingerprint = run_fingerprint(
        params, pairs, captions, parent_sha256=parent.sha256 if parent else None
    )
    photos = [pair.image_path for pair in pairs]
    (pairs, captions), (held_out_pairs, held_out_captions) = _held_out_split(
        pairs, captions, params.eval_holdout
    )
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
        low_memory_mode(
            pipelines, low_memory, keep_text_encoders=params.train_text_encoder
        ) as encoders,
    ):
        torch.manual_seed(seed)
        noise_generator = torch.Generator(device).manual_seed(seed)
        enter_stage("caching")
        sizing = Sizing(buckets, multiple, MAX_UPSCALE if params.enable_bucket else math.inf)
        encoded = encode_images(
            pipelines,
            pairs,
            captions,
            sizing,
            params.batch_size,
            noise_generator,
            stop,
            with_empty_caption=params.caption_dropout > 0,
            mask_source=(
                ("alpha" if params.use_alpha_mask else "file") if params.loss_masked else None
            ),
            class_prompts=class_prompts(pairs, params.trigger, params.class_prompt)
            if params.prior_preservation_weight
            else None,
        )
        # Encoded like the training photos but from a private generator: the training's
        # draws are those of a run without held-out photos.
        held_out_encoded = (
            encode_images(
                pipelines,
                held_out_pairs,
                held_out_captions,
                sizing,
                params.batch_size,
                torch.Generator(device).manual_seed(EVAL_SEED),
                stop,
                with_empty_caption=False,
            )
            if held_out_pairs
            else None
        )
        encoders.release()
        if params.steps is not None:
            total_steps = params.steps
        else:
            assert params.epochs is not None  # _check_params: steps or epochs
            total_steps = params.epochs * batches_per_epoch(encoded.placements, params.batch_size)
        run = Run(
            pipelines=pipelines,
            params=params,
            encoded=encoded,
            total_steps=total_steps,
            seed=seed,
            resolution=resolution,
            image_count=len(pairs),
            fingerprint=fingerprint,
            parent=parent,
        )
        watch = Watch(
            run,
            state_dir=Path(state_dir) if state_dir is not None else None,
            on_checkpoint=on_checkpoint,
            on_samples=on_samples,
            on_resume=on_resume,
            sample_prompts=params.sample_prompts
            or default_sample_prompts(params.trigger, captions),
            encoders=encoders,
            evaluation=Evaluation(
                pipelines,
                eval_images(encoded, held_out_encoded),
                encode_captions=params.train_text_encoder,
                holdout=params.eval_holdout,
                embedder=embedder,
                photos=photos,
            ),
        )
        text_encoders = (
            [base.text_encoder, base.text_encoder_2] if params.train_text_encoder else []
        )
        parent_weights = (
            canonical_tensors(parent.path, _layers_per_block(base)) if parent is not None else {}
        )
        targets = adapter_targets(parent_weights)
        try:
            base.unet.add_adapter(
                lora_config(params.rank, targets.get(UNET, LORA_TARGET_MODULES)), ADAPTER_NAME
            )
            for name, text_encoder in zip(TEXT_ENCODERS, text_encoders, strict=False):
                add_text_encoder_adapter(
                    text_encoder,
                    params.rank,
                    targets.get(name, TEXT_ENCODER_TARGET_MODULES),
                )
            if parent_weights:
                load_parent_weights(
                    dict(zip(COMPONENTS, (base.unet, *text_encoders), strict=False)),
                    parent_weights,
                )
            if resume is None:
                # Step 0 scores what the run starts from: the Base alone (a fresh LoRA is a
                # no-op), or the parent LoRA it continues.
                watch.evaluation.evaluate(0)
            enter_stage("training")
            bar = StepProgress(total_steps, console)

            def progress(step: int, total: int, loss: float) -> None:
                bar.step(step, loss)
                if on_progress is not None:
                    on_progress(step, total, loss)

            try:
                final_loss, resumed_from_step = optimise(
                    run, noise_generator, progress, stop, watch, resume
                )
            finally:
                bar.close()
            watch.evaluation.evaluate(total_steps)
            metadata = run.metadata(final_loss, scores=watch.evaluation.header(total_steps))
            enter_stage("saving")
            sha256 = save_lora(base, bool(text_encoders), Path(output_path), metadata)
        finally:
            base.unet.unload_lora()
            base.unet.eval()
            for text_encoder in text_encoders:
                remove_adapters(text_encoder)
    return TrainingResult(
        steps=total_steps,
        final_loss=final_loss,
        metadata=metadata,
        sha256=sha256,
        resumed_from_step=resumed_from_step,
        eval_loss=watch.evaluation.scores[total_steps].eval_loss,
        similarity=watch.evaluation.scores[total_steps].similarity,
    )


def _held_out_split(
    pairs: list[TrainingPair], captions: list[str], holdout: int
) -> tuple[tuple[list[TrainingPair], list[str]], tuple[list[TrainingPair], list[str]]]:
    """(the pairs and captions that train, those withheld for the eval loss)."""
    held_out = set(held_out_indices(len(pairs), holdout))
    chosen = [index in held_out for index in range(len(pairs))]
    return (
        (
            [pair for pair, out in zip(pairs, chosen, strict=True) if not out],
            [caption for caption, out in zip(captions, chosen, strict=True) if not out],
        ),
        (
            [pair for pair, out in zip(pairs, chosen, strict=True) if out],
            [caption for caption, out in zip(captions, chosen, strict=True) if out],
        ),
    )


def _check_params(params: TrainingParams, resolution: int, multiple: int, image_count: int) -> None:
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
    if not 0 <= params.background_weight <= 1:
        problems.append("background_weight must be from 0 (background ignored) to 1 (unmasked)")
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
    if not 0 <= params.prior_preservation_weight <= MAX_PRIOR_PRESERVATION_WEIGHT:
        problems.append(
            f"prior_preservation_weight must be 0 (off) to {MAX_PRIOR_PRESERVATION_WEIGHT}"
        )
    if params.class_prompt is not None and not params.class_prompt.strip():
        problems.append("class_prompt must not be blank")
    if params.prior_preservation_weight and params.class_prompt is None and params.trigger is None:
        problems.append(
            "prior_preservation_weight needs a class_prompt, or a trigger to take out of the "
            "captions"
        )
    if not 0 <= params.eval_holdout < image_count:
        problems.append(
            f"eval_holdout must be from 0 to {image_count - 1} (the image count - 1: at least "
            "one photo must train)"
        )
    if resolution < multiple or resolution % multiple:
        problems.append(f"resolution must be a positive multiple of {multiple} for this model")
    if problems:
        raise EngineError("invalid training parameters: " + "; ".join(problems))


def _parent_lora(base: StableDiffusionXLPipeline, path: Path, params: TrainingParams) -> ParentLora:
    """The LoRA the run continues, checked against the loaded models' modules and
    `params`; raises EngineError naming the file otherwise."""
    models = (base.unet, base.text_encoder, base.text_encoder_2)
    shapes = {
        component: module_shapes(model) for component, model in zip(COMPONENTS, models, strict=True)
    }
    parent = read_parent_lora(path, shapes)
    problems = parent_problems(parent, params.rank, params.train_text_encoder)
    if problems:
        raise EngineError("invalid training parameters: " + "; ".join(problems))
    return parent


def _layers_per_block(base: StableDiffusionXLPipeline) -> int:
    """The UNet's resnets per down block, which a kohya file in sd-scripts' block numbering
    needs to be read (files stored before uploads were made canonical may be one)."""
    layers = base.unet.config.layers_per_block
    return layers if isinstance(layers, int) else SDXL_LAYERS_PER_BLOCK


def _resolution_multiple(base: StableDiffusionXLPipeline) -> int:
    # The VAE divides the image by vae_scale_factor and each UNet down block but the last
    # halves the latent again; both must divide evenly for the skip connections to match.
    multiple: int = base.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)
    return multiple
