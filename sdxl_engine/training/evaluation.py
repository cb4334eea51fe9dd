"""A score for every checkpoint (SimpleTuner's eval loss, after "Demystifying SD
fine-tuning"; EasyPhoto's similarity of samples to photos).

- The eval loss is the training objective (the MSE of the UNet's epsilon or velocity
  prediction, without Min-SNR weights or noise offset) on EVAL_TIMESTEPS timesteps spread
  over the schedule and noise drawn from a private generator seeded with EVAL_SEED and the
  photo's place, both the same at every evaluation: the training loss jumps with each
  step's random timesteps, this one moves only with the weights, so its curve compares
  checkpoints, and the same weights score the same number. It is over the photos the run
  withholds (eval_holdout) or, without any, over (at most EVAL_MAX_PHOTOS of) the training
  photos themselves, where it keeps falling as the LoRA memorises them.
- The similarity (with an image embedder: training.similarity) is the mean cosine
  similarity of the samples rendered at a step to all the photos.

A run evaluates before its first step (step 0: the Base alone, as the LoRA starts as a
no-op), at each checkpoint and at its end; each LoRA file's header records its scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from PIL import Image

from sdxl_engine.dataset import evenly_spaced
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.training.caching import EncodedImages
from sdxl_engine.training.similarity import ImageEmbedder, mean_similarity

EVAL_TIMESTEPS = 8
EVAL_SEED = 0
# Without held-out photos, the eval loss is over this many training photos at most (evenly
# spaced): its cost stays that of a few training steps however many photos a run has.
EVAL_MAX_PHOTOS = 16


@dataclass(frozen=True)
class EvalImages:
    """The photos an eval loss is over: their cached latents and caption embeddings
    (`encoded`), those at `indices`."""

    encoded: EncodedImages
    indices: list[int]


def eval_images(encoded: EncodedImages, held_out: EncodedImages | None) -> EvalImages:
    """The held-out photos when a run withholds some, else the training photos (evenly
    spaced, at most EVAL_MAX_PHOTOS)."""
    if held_out is not None:
        return EvalImages(held_out, list(range(len(held_out.latents))))
    count = len(encoded.latents)
    chosen = min(count, EVAL_MAX_PHOTOS)
    return EvalImages(encoded, evenly_spaced(count, chosen))


def eval_timesteps(num_train_timesteps: int) -> list[int]:
    """EVAL_TIMESTEPS timesteps, the middles of equal stretches of the schedule."""
    return evenly_spaced(num_train_timesteps, EVAL_TIMESTEPS)


def eval_loss(pipelines: Pipelines, images: EvalImages, encode_captions: bool) -> float:
    """The mean denoising loss of the Base UNet as it stands (its LoRA included) over
    `images`, each at every eval timestep with its fixed noise, without gradients.
    `encode_captions`: the text encoders carry a LoRA too, so the captions are encoded
    through them now rather than taken from the cache."""
    base, device, dtype = pipelines.base, torch.device(pipelines.device), pipelines.dtype
    unet = base.unet
    scheduler: DDPMScheduler = DDPMScheduler.from_config(base.scheduler.config)
    timesteps = torch.tensor(eval_timesteps(scheduler.config["num_train_timesteps"]), device=device)
    velocity = scheduler.config["prediction_type"] == "v_prediction"
    encoded = images.encoded
    was_training = unet.training
    unet.eval()
    losses = []
    try:
        with torch.no_grad():
            for index in images.indices:
                latent = encoded.latents[index]
                clean = latent.expand(len(timesteps), *latent.shape)
                # On the CPU whatever the device, so the noise is the same on every machine.
                noise = torch.randn(
                    clean.shape, generator=torch.Generator().manual_seed(EVAL_SEED + index)
                ).to(device)
                # diffusers annotates timesteps as torch.IntTensor; a long tensor works.
                noisy = scheduler.add_noise(clean, noise, timesteps)  # type: ignore[arg-type]
                target = (
                    scheduler.get_velocity(clean, noise, timesteps)  # type: ignore[arg-type]
                    if velocity
                    else noise
                )
                prompt_embeds, pooled = _caption(pipelines, encoded, index, encode_captions)
                # The UNet's own forward: graphs compiled for generation (SDXL_COMPILE) fit
                # other shapes, and compiling one for this shape would take minutes.
                prediction = unet.forward(
                    noisy.to(dtype),
                    timesteps,
                    encoder_hidden_states=prompt_embeds.expand(len(timesteps), -1, -1),
                    added_cond_kwargs={
                        "text_embeds": pooled.expand(len(timesteps), -1),
                        "time_ids": encoded.time_ids[index].expand(len(timesteps), -1),
                    },
                    return_dict=False,
                )[0]
                losses.append(F.mse_loss(prediction.float(), target.float()).item())
    finally:
        unet.train(was_training)
    return sum(losses) / len(losses)


def _caption(
    pipelines: Pipelines, encoded: EncodedImages, index: int, encode: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if not encode:
        return encoded.prompt_embeds[index : index + 1], encoded.pooled_prompt_embeds[
            index : index + 1
        ]
    prompt_embeds, _, pooled, _ = pipelines.base.encode_prompt(
        prompt=encoded.captions[index],
        device=torch.device(pipelines.device),
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
    )
    return prompt_embeds, pooled


@dataclass
class Scores:
    eval_loss: float | None = None
    similarity: float | None = None


class Evaluation:
    """A run's scores by step (see the module's docstring), and the header entries of the
    LoRA file saved at a step."""

    def __init__(
        self,
        pipelines: Pipelines,
        images: EvalImages,
        encode_captions: bool,
        holdout: int,
        embedder: ImageEmbedder | None,
        photos: list[Path],
    ) -> None:
        self._pipelines, self._images, self._encode_captions = pipelines, images, encode_captions
        self._holdout = holdout
        self._embedder, self._photos = embedder, photos
        self._photo_embeddings: torch.Tensor | None = None
        self.scores: dict[int, Scores] = {}

    def evaluate(self, step: int) -> float:
        """The eval loss of the weights as they stand, recorded as `step`'s."""
        loss = eval_loss(self._pipelines, self._images, self._encode_captions)
        self.scores.setdefault(step, Scores()).eval_loss = loss
        return loss

    def samples_rendered(self, step: int, samples: list[Image.Image]) -> None:
        """Scores `step`'s samples against the photos (with an embedder)."""
        if self._embedder is None or not samples:
            return
        if self._photo_embeddings is None:
            self._photo_embeddings = self._embedder.embed_files(self._photos)
        similarity = mean_similarity(self._embedder.embed(samples), self._photo_embeddings)
        self.scores.setdefault(step, Scores()).similarity = similarity

    def header(self, step: int) -> dict[str, object]:
        """The sdxl_service.* entries (less the prefix) of a LoRA file saved at `step`; the
        scores in full (str of a float reads back as the same float)."""
        scores = self.scores.get(step, Scores())
        start = self.scores.get(0, Scores()).eval_loss
        entries: dict[str, object] = {
            "eval_holdout": self._holdout,
            "eval_images": len(self._images.indices),
        }
        if scores.eval_loss is not None:
            entries["eval_loss"] = scores.eval_loss
        if start is not None:
            entries["eval_loss_start"] = start
        if scores.similarity is not None:
            entries["similarity"] = scores.similarity
        return entries
