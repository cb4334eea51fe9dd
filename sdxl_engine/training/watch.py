"""What a run shows and keeps along the way: sample images, checkpoints and their scores
(see train_lora)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from PIL import Image

from sdxl_engine.parameters import checkpoint_steps, sample_steps
from sdxl_engine.training.adapters import MasterWeights, save_lora
from sdxl_engine.training.caching import Encoders, Run
from sdxl_engine.training.checkpoints import ResumeState, save_resume_state
from sdxl_engine.training.evaluation import Evaluation
from sdxl_engine.training.samples import render_samples


@dataclass(frozen=True)
class Optimisation:
    """What the loop changes from step to step: what a checkpoint saves to resume from."""

    masters: MasterWeights
    optimizer: torch.optim.Optimizer
    learning_rates: torch.optim.lr_scheduler.LRScheduler
    noise_generator: torch.Generator


class Watch:
    """Sample images and checkpoints along a run (see train_lora)."""

    def __init__(
        self,
        run: Run,
        state_dir: Path | None,
        on_checkpoint: Callable[[int, Path, str], None] | None,
        on_samples: Callable[[int, list[tuple[str, Image.Image]]], None] | None,
        sample_prompts: list[str],
        encoders: Encoders,
        on_resume: Callable[[int], None] | None,
        evaluation: Evaluation,
    ) -> None:
        params = run.params
        self._run, self._state_dir, self._encoders = run, state_dir, encoders
        self.evaluation = evaluation
        self._on_checkpoint, self._on_samples = on_checkpoint, on_samples
        self._on_resume = on_resume
        self._sample_prompts = sample_prompts
        self._sample_seed = params.sample_seed if params.sample_seed is not None else run.seed
        # Every sample_every steps and the last, so the finished LoRA has its samples.
        self.sample_steps = frozenset(sample_steps(params.sample_every, run.total_steps))
        # Every checkpoint_every steps before the last, whose file is the LoRA itself.
        self.checkpoint_steps = frozenset(
            checkpoint_steps(params.checkpoint_every, run.total_steps)
        )

    def resumed(self, step: int) -> None:
        if self._on_resume is not None:
            self._on_resume(step)

    def after_step(self, step: int, loss: float, optimisation: Optimisation) -> None:
        on_samples, state_dir = self._on_samples, self._state_dir
        if on_samples is not None and self._sample_prompts and step in self.sample_steps:
            self._samples(step, on_samples)
        if state_dir is not None and step in self.checkpoint_steps:
            self._checkpoint(step, state_dir, loss, optimisation)

    def _samples(
        self, step: int, on_samples: Callable[[int, list[tuple[str, Image.Image]]], None]
    ) -> None:
        run = self._run
        with self._encoders.borrowed():
            images = render_samples(
                run.pipelines, self._sample_prompts, self._sample_seed, run.resolution
            )
        self.evaluation.samples_rendered(step, images)
        on_samples(step, list(zip(self._sample_prompts, images, strict=True)))

    def _checkpoint(
        self, step: int, state_dir: Path, loss: float, optimisation: Optimisation
    ) -> None:
        run, masters = self._run, optimisation.masters
        models = (run.pipelines.base.unet, *run.text_encoders)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / f"checkpoint-{step}.safetensors"
        # The file holds the float32 weights the optimiser has reached, as the final one.
        for model in models:
            cast_training_params(model, dtype=torch.float32)
        masters.copy_to_model()
        try:
            # Scored as saved: the same weights as the file's.
            self.evaluation.evaluate(step)
            sha256 = save_lora(
                run.pipelines.base,
                bool(run.text_encoders),
                path,
                run.metadata(loss, checkpoint_step=step, scores=self.evaluation.header(step)),
            )
        finally:
            for model in models:
                cast_training_params(model, dtype=run.pipelines.dtype)
            masters.copy_to_model()
        save_resume_state(
            state_dir,
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
