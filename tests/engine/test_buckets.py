from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from sdxl_engine.buckets import (
    MAX_UPSCALE,
    SDXL_BUCKETS,
    bucket_sizes,
    bucket_summary,
    bucketed_batches,
    place,
)

SDXL_MULTIPLE = 32  # what SDXL's latents divide by: VAE 8 x three UNet levels


def test_at_sdxls_native_size_the_buckets_are_sdxls_own() -> None:
    assert bucket_sizes(1024, SDXL_MULTIPLE) == list(SDXL_BUCKETS)


def test_buckets_scale_to_other_sizes_keeping_their_area_and_the_multiple() -> None:
    for resolution, multiple in ((512, 32), (64, 16)):
        sizes = bucket_sizes(resolution, multiple)
        assert (resolution, resolution) in sizes
        assert len(sizes) == len(set(sizes))
        for width, height in sizes:
            assert width % multiple == 0 and height % multiple == 0
            assert width * height == pytest.approx(resolution**2, rel=0.25)
    # The tiny model's 64: portrait and landscape survive the rounding to 16.
    assert {(48, 80), (80, 48), (64, 64)} <= set(bucket_sizes(64, 16))


def test_a_portrait_photo_trains_whole_at_the_nearest_portrait_bucket() -> None:
    placement = place((3000, 4000), SDXL_BUCKETS, SDXL_MULTIPLE)  # 3:4, a phone portrait

    assert placement.size == (896, 1152)  # 0.78, the bucket nearest 0.75
    # Covers the bucket: the whole width is kept, 43 rows of the height are the excess.
    assert placement.resized == (896, 1195)
    assert (placement.crop_top, placement.crop_left) == (21, 0)
    assert placement.time_ids == [4000, 3000, 21, 0, 1152, 896]


@pytest.mark.parametrize(
    ("original", "bucket"),
    [
        ((4000, 3000), (1152, 896)),
        ((1920, 1080), (1344, 768)),
        ((1080, 1920), (768, 1344)),
        ((2400, 1000), (1536, 640)),
        ((1024, 1024), (1024, 1024)),
    ],
)
def test_each_aspect_ratio_goes_to_the_bucket_nearest_it(original, bucket) -> None:
    placement = place(original, SDXL_BUCKETS, SDXL_MULTIPLE)
    assert placement.size == bucket
    width, height = placement.resized
    # Only the excess over the bucket is cropped: the image was scaled to just cover it.
    assert width == bucket[0] or height == bucket[1]


def test_a_small_image_is_enlarged_at_most_max_upscale_times() -> None:
    placement = place((200, 200), SDXL_BUCKETS, SDXL_MULTIPLE)

    assert placement.size == (384, 384)  # 200 x 2 = 400, down to a multiple of 32
    assert max(placement.resized) <= 200 * MAX_UPSCALE
    assert placement.time_ids == [200, 200, 0, 0, 384, 384]


def test_one_square_bucket_without_a_limit_is_the_original_centre_crop() -> None:
    placement = place((200, 100), [(64, 64)], 16, max_upscale=math.inf)

    assert placement.resized == (128, 64)
    assert placement.time_ids == [100, 200, 0, 32, 64, 64]


def test_apply_gives_an_image_of_the_bucket_size_cut_from_the_centre() -> None:
    image = Image.new("RGB", (300, 100), "black")
    image.paste("white", (100, 0, 200, 100))  # a white middle third
    placement = place(image.size, [(64, 64)], 16, max_upscale=math.inf)

    cropped = placement.apply(image)

    assert cropped.size == (64, 64)
    assert cropped.getpixel((32, 32)) == (255, 255, 255)


def test_the_summary_counts_images_per_size_most_used_first() -> None:
    placements = [
        place(size, SDXL_BUCKETS, SDXL_MULTIPLE)
        for size in [(3000, 4000), (1024, 1024), (2000, 3000), (1000, 1500), (800, 800)]
    ]
    assert bucket_summary(placements) == "832x1216:2,1024x1024:2,896x1152:1"


def test_batches_hold_one_size_and_each_epoch_shows_every_image_once() -> None:
    sizes = [(64, 64)] * 5 + [(48, 80)] * 3 + [(80, 48)] * 2
    batches = list(
        bucketed_batches(
            sizes,
            2,
            total_steps=12,
            order_generator=torch.Generator().manual_seed(0),
            bucket_order_generator=torch.Generator().manual_seed(1),
        )
    )

    assert len(batches) == 12
    for batch in batches:
        assert len({sizes[index] for index in batch}) == 1
    first_epoch = batches[:6]  # ceil(5/2) + ceil(3/2) + ceil(2/2) batches
    assert sorted(index for batch in first_epoch for index in batch) == list(range(10))
    # The sizes take turns: not all of one size first.
    assert [sizes[batch[0]] for batch in first_epoch] != sorted(
        (sizes[batch[0]] for batch in first_epoch), key=sizes.index
    )


def test_with_one_size_batches_are_a_plain_shuffle() -> None:
    batches = list(
        bucketed_batches(
            [(64, 64)] * 5,
            2,
            total_steps=3,
            order_generator=torch.Generator().manual_seed(7),
            bucket_order_generator=torch.Generator().manual_seed(8),
        )
    )
    expected = torch.randperm(5, generator=torch.Generator().manual_seed(7)).split(2)
    assert batches == [part.tolist() for part in expected]
