"""What a run trains on, computed once before its first step: each image's latents and
its caption's (and class prompt's) embeddings from the frozen VAE and text encoders
(encode_images), and the
run as resolved from them (Run); and the low-memory mode that sets the frozen encoders
aside once they are cached."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sdxl_engine.buckets import Placement, bucket_summary, place
from sdxl_engine.continuation import ParentLora
from sdxl_engine.dataset import TrainingPair, alpha_mask, training_rgb
from sdxl_engine.errors import EngineError, TrainingCancelled
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.lora_files import METADATA_PREFIX
from sdxl_engine.parameters import TrainingParams

# Below this much free GPU memory (with the Base loaded), training recomputes activations
# instead of keeping them: at 1024², batch 4, keeping them takes 19.1 GiB beyond the Base
# (H100, bench/results/2026-11-27-h100-fp16/train-compiled.json), plus room to spare.
LOW_MEMORY_BELOW_FREE_GIB = 22
# Where a masked run's masks come from: each image's mask file, or its own alpha channel.
MaskSource = Literal["file", "alpha"]


@dataclass
class EncodedImages:
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
    # One (1, h/8, w/8) float32 tensor in [0, 1] per image, beside its latents: its mask
    # placed as the image was, then area-averaged to latent resolution. None unless the
    # loss is masked.
    masks: list[torch.Tensor] | None = None
    # Prior preservation's class prompt of each image (dataset.class_prompts) and its
    # embeddings through the encoders without any LoRA: the base model's conditioning,
    # which its target is predicted with. None without prior preservation.
    class_prompts: list[str] | None = None
    class_prompt_embeds: torch.Tensor | None = None  # (n, 77, ...) as prompt_embeds
    class_pooled_prompt_embeds: torch.Tensor | None = None


@dataclass(frozen=True)
class Sizing:
    """The sizes images may train at, what their sides divide by, and how far a small
    image may be enlarged (sdxl_engine.buckets.place)."""

    buckets: list[tuple[int, int]]
    multiple: int
    max_upscale: float


@dataclass(frozen=True)
class Run:
    """A run's settings as they were resolved, and its images as encoded."""

    pipelines: Pipelines
    params: TrainingParams
    encoded: EncodedImages
    total_steps: int
    seed: int
    resolution: int
    image_count: int
    fingerprint: str
    parent: ParentLora | None = None  # the LoRA the run continues (sdxl_engine.continuation)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        base = self.pipelines.base
        return [base.text_encoder, base.text_encoder_2] if self.params.train_text_encoder else []

    def metadata(
        self,
        loss: float,
        checkpoint_step: int | None = None,
        scores: Mapping[str, object] | None = None,
    ) -> dict[str, str]:
        """The sdxl_service.* header entries of a LoRA file of this run: its final one, or
        its checkpoint at `checkpoint_step`, with its `scores` (training.evaluation)."""
        params = self.params
        steps_made = checkpoint_step if checkpoint_step is not None else self.total_steps
        parent = self.parent
        metadata = {
            "base_model": self.pipelines.source.base_name,
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
            **(
                {
                    "masked_loss": True,
                    "background_weight": params.background_weight,
                    "use_alpha_mask": params.use_alpha_mask,
                }
                if params.loss_masked
                else {}
            ),
            **self._prior_preservation(),
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
            **({"checkpoint_step": checkpoint_step} if checkpoint_step is not None else {}),
            # The steps of the whole chain of continued LoRAs: a continued file's parent's
            # own count goes on.
            "total_steps_cumulative": (parent.cumulative_steps if parent else 0) + steps_made,
            **(
                {"parent": parent.path.name, "parent_sha256": parent.sha256}
                if parent is not None
                else {}
            ),
            **(scores or {}),
        }
        return {METADATA_PREFIX + key: str(value) for key, value in metadata.items()}

    def _prior_preservation(self) -> dict[str, object]:
        """The weight and the class prompts it kept (each distinct one once, as a JSON
        list: the given class_prompt, or those taken from the captions)."""
        prompts = self.encoded.class_prompts
        if not self.params.prior_preservation_weight or prompts is None:
            return {}
        return {
            "prior_preservation_weight": self.params.prior_preservation_weight,
            "class_prompts": json.dumps(list(dict.fromkeys(prompts))),
        }


def encode_images(
    pipelines: Pipelines,
    pairs: list[TrainingPair],
    captions: list[str],
    sizing: Sizing,
    batch_size: int,
    generator: torch.Generator,
    stop: Callable[[], bool],
    with_empty_caption: bool,
    mask_source: MaskSource | None = None,
    class_prompts: list[str] | None = None,
) -> EncodedImages:
    """Each image's latents at its bucket's size, and its caption's embeddings (and,
    `with_empty_caption`, the empty caption's, encoded through the text encoders like any
    caption, as diffusers' SDXL training script does for its empty prompts; and each
    image's class prompt's, given `class_prompts`); with a `mask_source`, each image's
    mask at its latents' size."""
    base, device = pipelines.base, pipelines.device
    latents, placements, time_ids = [], [], []
    masks: list[torch.Tensor] = []
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
                latent = distribution.sample(generator)[0] * base.vae.config.scaling_factor
                latents.append(latent)
                placements.append(placement)
                time_ids.append(placement.time_ids)
                if mask_source is not None:
                    # Each latent pixel weighs as the share of its 8x8 pixels on the
                    # subject (kohya reduces its masks by area too).
                    mask = _load_mask(pair, placement, mask_source)
                    reduced = F.interpolate(mask[None], size=latent.shape[-2:], mode="area")[0]
                    masks.append(reduced.clamp(0, 1).to(device))
    prompt_embeds, pooled = _encoded_prompts(pipelines, captions, batch_size)
    encoded = EncodedImages(
        latents=latents,
        placements=placements,
        captions=captions,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        time_ids=torch.tensor(time_ids, device=device, dtype=prompt_embeds.dtype),
        masks=masks if mask_source is not None else None,
    )
    if class_prompts is not None:
        encoded.class_prompts = class_prompts
        encoded.class_prompt_embeds, encoded.class_pooled_prompt_embeds = _encoded_prompts(
            pipelines, class_prompts, batch_size
        )
    if with_empty_caption:
        encoded.empty_prompt_embeds, encoded.empty_pooled_prompt_embeds = _encoded_prompts(
            pipelines, [""], 1
        )
    return encoded


def _encoded_prompts(
    pipelines: Pipelines, prompts: list[str], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompts`' embeddings and pooled embeddings through the frozen text encoders,
    `batch_size` at a time: the captions', the empty caption's, the class prompts'."""
    embeds, pooled = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            prompt_embeds, _, pooled_embeds, _ = pipelines.base.encode_prompt(
                # diffusers annotates prompt as str; it takes a list too (its docstring).
                prompt=prompts[start : start + batch_size],  # type: ignore[arg-type]
                device=torch.device(pipelines.device),
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            embeds.append(prompt_embeds)
            pooled.append(pooled_embeds)
    return torch.cat(embeds), torch.cat(pooled)


def _load_image(path: Path, sizing: Sizing) -> tuple[torch.Tensor, Placement]:
    """The image as a (3, height, width) tensor in [-1, 1] at the size of its bucket, and
    how it was placed there (sdxl_engine.buckets: resized to cover the bucket, the excess
    cropped, centred; the time ids tell the UNet the original size and the crop, as in
    SDXL's own training)."""
    # Transparent pixels train as white, not as the black they usually store.
    image = training_rgb(_read_image(path, f"training image {path.name}"))
    placement = place(image.size, sizing.buckets, sizing.multiple, sizing.max_upscale)
    image = placement.apply(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, placement


def _load_mask(pair: TrainingPair, placement: Placement, source: MaskSource) -> torch.Tensor:
    """The pair's mask, placed as its image was (`placement`), as a (1, height, width)
    tensor in [0, 1]: its image's alpha channel (`source` "alpha"), or its mask file
    (`source` "file"), taken as drawn on the image as shown (its EXIF orientation applied)
    and resized to it when its size differs, as cog-sdxl does. An image without alpha, or
    without a mask file, counts whole: all ones."""
    if source == "alpha":
        mask = alpha_mask(_read_image(pair.image_path, f"training image {pair.image_path.name}"))
    elif pair.mask_path is None:
        mask = Image.new("L", placement.original, 255)
    else:
        described = f"the mask {pair.mask_path.name} of training image {pair.image_path.name}"
        mask = _read_image(pair.mask_path, described).convert("L")
        if mask.size != placement.original:
            mask = mask.resize(placement.original, Image.Resampling.BILINEAR)
    placed = np.asarray(placement.apply(mask), dtype=np.float32) / 255.0
    return torch.from_numpy(placed)[None]


def _read_image(path: Path, described: str) -> Image.Image:
    """The image at `path` as shown (its EXIF orientation applied); an EngineError naming
    it as `described` when it cannot be read."""
    try:
        with Image.open(path) as opened:
            return ImageOps.exif_transpose(opened)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise EngineError(
            f"{described} could not be read ({error}); replace or delete it and train again"
        ) from error


def batches_per_epoch(placements: list[Placement], batch_size: int) -> int:
    counts = Counter(placement.size for placement in placements)
    return sum(math.ceil(count / batch_size) for count in counts.values())


@contextmanager
def low_memory_mode(
    pipelines: Pipelines, enabled: bool, keep_text_encoders: bool
) -> Iterator[Encoders]:
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
    encoders = Encoders(models, pipelines.device, offload=enabled and pipelines.device != "cpu")
    if not enabled:
        yield encoders
        return
    base.unet.enable_gradient_checkpointing()
    try:
        yield encoders
    finally:
        base.unet.disable_gradient_checkpointing()
        encoders.restore()


class Encoders:
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
