"""Aspect-ratio buckets: the size each training image trains at, and batches of one size.

SDXL was trained at about one megapixel in a set of aspect ratios (SDXL_BUCKETS, the
SDXL paper's list as kohya's sd-scripts and ai-toolkit use it). Each image trains at the
bucket nearest its aspect ratio, scaled to the run's resolution, so a portrait keeps its
head and feet: it is resized to cover the bucket and only the excess is cropped, centred.
An image too small to cover its bucket is enlarged at most MAX_UPSCALE times; it then
trains at a smaller size of the same aspect ratio instead of being blown up further.
Batches hold images of one size, as the UNet needs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:  # for annotations only: bucketed_batches imports torch when it runs
    import torch

# (width, height) of SDXL's ~1-megapixel training sizes, at its native 1024.
SDXL_BUCKETS = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)
SDXL_NATIVE_SIDE = 1024
# How many times larger than its own size an image may be trained: a small photo is not
# made to fill a 1024² bucket from a quarter of its pixels.
MAX_UPSCALE = 2.0


@dataclass(frozen=True)
class Placement:
    """How one image becomes a training sample: resized to `resized`, then the
    `size`-sized window at (`crop_top`, `crop_left`) kept. Sizes are (width, height)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    crop_top: int
    crop_left: int
    size: tuple[int, int]

    @property
    def time_ids(self) -> list[int]:
        """SDXL's micro-conditioning: original height and width, crop top and left,
        target height and width, as SDXL was trained with them."""
        (original_width, original_height), (width, height) = self.original, self.size
        return [original_height, original_width, self.crop_top, self.crop_left, height, width]

    def apply(self, image: Image.Image) -> Image.Image:
        resized = image.resize(self.resized, Image.Resampling.BICUBIC)
        width, height = self.size
        return resized.crop(
            (self.crop_left, self.crop_top, self.crop_left + width, self.crop_top + height)
        )


def bucket_sizes(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """SDXL_BUCKETS scaled from 1024 to `resolution`, each side rounded to `multiple`
    (what the model's latents divide by); sizes that coincide after rounding count once."""
    scale = resolution / SDXL_NATIVE_SIDE
    sizes = []
    for width, height in SDXL_BUCKETS:
        size = (_round_to(width * scale, multiple), _round_to(height * scale, multiple))
        if size not in sizes:
            sizes.append(size)
    return sizes


def place(
    original: tuple[int, int],
    buckets: Sequence[tuple[int, int]],
    multiple: int,
    max_upscale: float = MAX_UPSCALE,
) -> Placement:
    """The placement of an image of size `original` in the bucket nearest its aspect ratio,
    enlarged at most `max_upscale` times.

    With one square bucket and no limit on enlarging, this is the centred square crop of
    the shorter side: what the original service trained on.
    """
    width, height = original
    aspect = math.log(width / height)
    size = min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))
    scale = max(size[0] / width, size[1] / height)  # covers the bucket
    if scale > max_upscale:
        # Too small: the largest window of the bucket's shape that max_upscale covers.
        size = (
            max(multiple, _floor_to(size[0] * max_upscale / scale, multiple)),
            max(multiple, _floor_to(size[1] * max_upscale / scale, multiple)),
        )
        scale = max(size[0] / width, size[1] / height)
    resized = (max(size[0], round(width * scale)), max(size[1], round(height * scale)))
    return Placement(
        original=original,
        resized=resized,
        crop_top=(resized[1] - size[1]) // 2,
        crop_left=(resized[0] - size[0]) // 2,
        size=size,
    )


def bucket_summary(placements: Sequence[Placement]) -> str:
    """The sizes trained and how many images each, most used first: `832x1216:3,1024x1024:2`."""
    counts = Counter(placement.size for placement in placements)
    ordered = sorted(counts.items(), key=lambda item: (-item[1], -item[0][1], -item[0][0]))
    return ",".join(f"{width}x{height}:{count}" for (width, height), count in ordered)


def bucketed_batches(
    sizes: Sequence[tuple[int, int]],
    batch_size: int,
    total_steps: int,
    order_generator: torch.Generator,
    bucket_order_generator: torch.Generator,
) -> Iterator[list[int]]:
    """`total_steps` batches of image indices, each from one size: every epoch shuffles
    each size's images and splits them into batches (the last of a size possibly smaller),
    then shuffles the order of the batches. With one size the batches are a plain shuffle
    split into batches, whatever the second generator holds.

    The caller seeds the generators.
    """
    import torch

    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    groups = [torch.tensor(indices) for indices in by_size.values()]
    produced = 0
    while True:
        epoch = [
            group[order].tolist()
            for group in groups
            for order in torch.randperm(len(group), generator=order_generator).split(batch_size)
        ]
        if len(groups) > 1:
            shuffled = torch.randperm(len(epoch), generator=bucket_order_generator).tolist()
            epoch = [epoch[position] for position in shuffled]
        for batch in epoch:
            yield batch
            produced += 1
            if produced == total_steps:
                return


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def _floor_to(value: float, multiple: int) -> int:
    return math.floor(value / multiple) * multiple
