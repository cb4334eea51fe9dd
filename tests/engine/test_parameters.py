from __future__ import annotations

import io
from dataclasses import asdict, fields, replace

import pytest
from PIL import Image

from sdxl_engine.parameters import (
    DEFAULT_STRENGTH,
    PER_REQUEST,
    RECIPE_MAX_VIEWS,
    SERVICE_RECIPE,
    TINY_RECIPE_MAX_STEPS,
    GenerationParams,
    LoraChoice,
    TrainingParams,
    checkpoint_steps,
    default_image_size,
    fewest_steps,
    problems_text,
    recipe_of,
    recipe_views,
    sample_steps,
    training_params,
)
from sdxl_engine.schedulers import SCHEDULER_NAMES


@pytest.mark.parametrize(
    ("images", "views"), [(1, 1500), (10, 1500), (20, 3000), (26, 3900), (30, 4000), (500, 4000)]
)
def test_the_service_recipe_trains_at_least_1000_image_views_growing_to_the_cap(
    images: int, views: int
) -> None:
    assert recipe_views(images) == views
    params = training_params({}, images)
    # Whole epochs: every image is seen equally often, at least views in all.
    assert params.steps is None
    assert max(views, 1000) <= params.epochs * images < views + images
    assert recipe_views(images) <= RECIPE_MAX_VIEWS


def test_a_body_with_only_a_session_gets_the_service_recipe() -> None:
    params = training_params({}, 10)

    assert params.recipe == "service"
    assert (params.rank, params.learning_rate, params.batch_size) == (32, 1e-4, 4)
    assert params.epochs == 150 and params.steps is None  # 1500 image-views
    assert params.lr_scheduler == "constant_with_warmup"
    # A tenth of the run (150 epochs of 3 batches), at most 100.
    assert params.lr_warmup_steps == 45
    assert params.min_snr_gamma == 5.0 and params.caption_dropout == 0.05
    assert params.enable_bucket is True
    assert training_params({}, 30).lr_warmup_steps == 100


def test_an_explicit_epochs_1_is_exactly_the_original_recipe() -> None:
    params = training_params({"epochs": 1}, 10)

    assert params == TrainingParams(epochs=1, recipe="original")
    assert (params.rank, params.batch_size, params.learning_rate) == (4, 4, 1e-4)
    assert params.lr_scheduler == "constant" and params.lr_warmup_steps == 0
    assert params.min_snr_gamma == 0.0 and params.caption_dropout == 0.0
    assert params.enable_bucket is False


def test_steps_alone_also_follow_the_original_recipe_and_leave_epochs_unset() -> None:
    params = training_params({"steps": 500}, 10)
    assert params.recipe == "original" and params.steps == 500 and params.epochs is None
    assert params.rank == 4


def test_a_named_recipe_wins_and_the_callers_fields_win_over_it() -> None:
    params = training_params({"recipe": "service", "steps": 200, "rank": 8}, 10)

    assert params.recipe == "service" and params.steps == 200 and params.rank == 8
    assert params.lr_warmup_steps == 20
    assert training_params({"recipe": "original"}, 10) == TrainingParams(recipe="original")


def test_the_service_recipe_with_a_constant_rate_has_no_warm_up() -> None:
    assert training_params({"lr_scheduler": "constant"}, 10).lr_warmup_steps == 0
    given = training_params({"lr_scheduler": "cosine", "lr_warmup_steps": 5}, 10)
    assert given.lr_warmup_steps == 5


def test_epochs_with_the_service_recipe_warm_up_for_a_tenth_of_them() -> None:
    params = training_params({"recipe": "service", "epochs": 40}, 10)
    assert params.epochs == 40 and params.steps is None
    assert params.lr_warmup_steps == 12  # a tenth of 40 epochs x 3 batches of 4


def test_recipe_of_reads_the_request() -> None:
    assert recipe_of({}) == "service"
    assert recipe_of({"epochs": 2}) == "original"
    assert recipe_of({"steps": 9, "recipe": "service"}) == "service"


def test_resolved_params_survive_a_round_trip_through_json_fields() -> None:
    # The run records asdict(params) in a JSON field; the worker rebuilds them from it.
    params = training_params({"trigger": "sks"}, 12)
    assert TrainingParams(**asdict(params)) == params
    assert SERVICE_RECIPE.recipe == "service"


def test_a_left_out_length_keeps_to_max_steps_in_steps() -> None:
    # The service recipe: 150 epochs of 10 images, 3 batches each (450 steps at the least,
    # 1500 at the most): with a limit of 100 steps, exactly 100 steps.
    capped = training_params({}, 10, max_steps=100)
    assert (capped.steps, capped.epochs) == (100, None)
    assert capped.lr_warmup_steps == 10  # a tenth of the capped run
    # Under a limit it cannot reach, the recipe stays in epochs.
    assert training_params({}, 10, max_steps=1500) == training_params({}, 10)
    # Above the fewest steps, below the most: the fewest, in steps.
    assert training_params({}, 10, max_steps=1000).steps == 450
    # The original recipe's one epoch of 100 images (25 batches of 4) under a limit of 20.
    assert training_params({"recipe": "original"}, 100, max_steps=20).steps == 20


def test_a_given_length_is_never_capped() -> None:
    assert training_params({"epochs": 50}, 10, max_steps=10).epochs == 50
    assert training_params({"steps": 500}, 10, max_steps=10).steps == 500


def test_fewest_steps_counts_full_batches() -> None:
    assert fewest_steps(3, 10, 4) == 9


IMAGE = b"the bytes of an image"


@pytest.mark.parametrize(
    ("fields", "problems"),
    [
        ({"scheduler": "heun"}, {"scheduler": "must be one of: " + ", ".join(SCHEDULER_NAMES)}),
        ({"refiner": "both"}, {"refiner": "must be one of: ensemble, none"}),
        ({"refiner_switch": 0.4}, {"refiner_switch": "must be from 0.5 to 0.99"}),
        ({"refiner_switch": 1.0}, {"refiner_switch": "must be from 0.5 to 0.99"}),
        (
            {"refiner": "none", "refiner_switch": 0.8},
            {"refiner_switch": 'applies only when refiner is "ensemble"'},
        ),
        ({"strength": 0.5}, {"strength": "applies only with init_image_base64 (img2img)"}),
        ({"init_image": IMAGE, "strength": 0.0}, {"strength": "must be greater than 0"}),
        ({"init_image": IMAGE, "strength": 1.5}, {"strength": "must be at most 1"}),
        (
            {"output_format": "png", "quality": 90},
            {"quality": "applies only to jpeg and webp, not png"},
        ),
        ({"quality": 90}, {"quality": "applies only to jpeg and webp, not png"}),
        ({"output_format": "jpeg", "quality": 0}, {"quality": "must be an integer from 1 to 100"}),
        ({"output_format": "gif"}, {"output_format": "must be one of: png, jpeg, webp"}),
        (
            {"num_images": 0, "steps": 0},
            {"num_images": "must be at least 1", "steps": "must be at least 1"},
        ),
        ({"loras": (LoraChoice(1),) * 5}, {"loras": "may name at most 4 LoRAs"}),
    ],
)
def test_problems_name_each_field_that_cannot_run(fields: dict, problems: dict) -> None:
    assert GenerationParams(prompt="x", **fields).problems() == problems


def test_problems_text_is_how_the_engine_and_logs_say_them() -> None:
    params = GenerationParams(refiner="none", refiner_switch=0.8, scheduler="heun")
    assert problems_text(params.problems()) == (
        'refiner_switch applies only when refiner is "ensemble"; scheduler must be one of: '
        + ", ".join(SCHEDULER_NAMES)
    )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"init_image": IMAGE},
        {"init_image": IMAGE, "strength": 1.0},
        {"refiner": "none", "scheduler": "euler_a"},
        {"refiner_switch": 0.5, "output_format": "webp", "quality": 100},
        {"loras": (LoraChoice(1),) * 4},
    ],
)
def test_the_defaults_and_valid_requests_have_no_problems(fields: dict) -> None:
    assert GenerationParams(prompt="x", **fields).problems() == {}


def test_filled_draws_a_seed_and_gives_img2img_its_default_strength() -> None:
    assert GenerationParams(seed=5).filled() == GenerationParams(seed=5)
    assert GenerationParams().filled().seed is not None
    assert GenerationParams(init_image=IMAGE, seed=1).filled().strength == DEFAULT_STRENGTH == 0.75
    assert GenerationParams(init_image=IMAGE, seed=1, strength=0.3).filled().strength == 0.3
    assert GenerationParams(seed=1).filled().strength is None


def test_a_record_keeps_the_fields_left_out_out() -> None:
    assert GenerationParams(prompt="x", seed=3).record() == {
        "num_images": 1,
        "guidance_scale": 7.0,
        "steps": 20,
    }
    # The service records a size left out as filled (sized).
    assert GenerationParams(prompt="x", seed=3).sized(1024).record() == {
        "num_images": 1,
        "height": 1024,
        "width": 1024,
        "guidance_scale": 7.0,
        "steps": 20,
    }
    given = GenerationParams(refiner="none", init_image=IMAGE, strength=0.5, quality=90)
    assert given.record() == {
        **GenerationParams().record(),
        "refiner": "none",
        "strength": 0.5,
        "quality": 90,
    }


def test_the_batch_key_compares_what_was_left_out_with_its_default() -> None:
    plain = GenerationParams(prompt="a", seed=1)
    explicit = GenerationParams(
        prompt="b", seed=2, num_images=3, refiner="ensemble", refiner_switch=0.8
    )
    assert plain.batch_key() == explicit.batch_key()
    assert (plain.refiner_policy, plain.refiner_switch_at, plain.file_format) == (
        "ensemble",
        0.8,
        "png",
    )
    for other in (
        {"refiner": "none"},
        {"refiner_switch": 0.5},
        {"scheduler": "ddim"},
        {"height": 512},
        {"guidance_scale": 5.0},
        {"steps": 30},
        {"init_image": IMAGE, "strength": 0.5},
    ):
        assert replace(plain, **other).batch_key() != plain.batch_key()
    assert replace(plain, output_format="jpeg", quality=90).batch_key() == plain.batch_key()
    assert GenerationParams(refiner="none").refiner_switch_at is None


def test_every_field_not_a_requests_own_keeps_requests_apart() -> None:
    # A field added to GenerationParams batches apart unless declared PER_REQUEST.
    plain = GenerationParams(prompt="a", seed=1)
    shared = {field.name for field in fields(GenerationParams)} - PER_REQUEST
    assert {name for name, _ in plain.batch_key()} == shared


# --- Issue 25: fast tiny defaults, samples at the last step -------------------------------


@pytest.mark.parametrize(
    ("every", "total", "samples", "checkpoints"),
    [
        # The 1125-step default run sampled at 282, 564 and 846 only.
        (None, 1125, [282, 564, 846, 1125], [282, 564, 846]),
        (None, 100, [25, 50, 75, 100], [25, 50, 75]),
        (None, 5, [2, 4, 5], [2, 4]),
        (3, 10, [3, 6, 9, 10], [3, 6, 9]),
        (2, 4, [2, 4], [2]),
        (20, 10, [10], []),
        (0, 10, [], []),
    ],
)
def test_sample_steps_end_at_the_last_step_and_checkpoints_before_it(
    every: int | None, total: int, samples: list[int], checkpoints: list[int]
) -> None:
    assert sample_steps(every, total) == samples
    assert checkpoint_steps(every, total) == checkpoints


@pytest.mark.parametrize("image_count", [1, 2, 3, 8, 40])
def test_the_tiny_models_default_recipe_is_the_service_one_capped_at_100_steps(
    image_count: int,
) -> None:
    real = training_params({}, image_count, max_steps=100000)
    tiny = training_params({}, image_count, max_steps=100000, tiny=True)
    # Real SDXL keeps the service recipe exactly: its length in epochs.
    assert real.steps is None and real.epochs == -(-recipe_views(image_count) // image_count)
    assert (tiny.steps, tiny.epochs) == (TINY_RECIPE_MAX_STEPS, None) == (100, None)
    assert tiny.lr_warmup_steps == 10  # a tenth of the steps, as the recipe warms up
    same = {"steps", "epochs", "lr_warmup_steps"}
    assert {k: v for k, v in asdict(tiny).items() if k not in same} == {
        k: v for k, v in asdict(real).items() if k not in same
    }
    assert (tiny.recipe, tiny.rank, tiny.enable_bucket, tiny.resolution) == (
        "service",
        32,
        True,
        None,
    )


@pytest.mark.parametrize(
    "given",
    [{"steps": 500}, {"epochs": 3}, {"recipe": "service", "steps": 300}, {"epochs": 1}],
)
def test_a_length_given_is_kept_on_the_tiny_model(given: dict) -> None:
    assert training_params(given, 3, 100000, tiny=True) == training_params(given, 3, 100000)


def test_the_original_recipe_on_the_tiny_model_stays_one_epoch() -> None:
    assert training_params({"recipe": "original"}, 3, 100000, tiny=True).epochs == 1


@pytest.mark.parametrize(
    ("native", "image", "max_side", "expected"),
    [
        (1024, None, None, (1024, 1024)),
        (1024, None, 768, (768, 768)),
        (64, None, 2048, (64, 64)),
        (1024, (1024, 1024), 2048, (1024, 1024)),
        (1024, (1600, 900), 2048, (1368, 768)),  # 16:9 at about 1024²
        (1024, (600, 800), 2048, (888, 1184)),  # 3:4
        (1024, (4000, 1000), 2048, (2048, 512)),
        (1024, (10000, 100), 2048, (2048, 64)),  # sides kept within 64..2048
        (64, (200, 100), 2048, (128, 64)),  # the tiny model: never under 64
        (64, (100, 150), 2048, (64, 96)),
        (64, (50, 50), 2048, (64, 64)),
    ],
)
def test_default_image_size_is_native_or_the_init_images_aspect(
    native: int, image: tuple[int, int] | None, max_side: int | None, expected: tuple[int, int]
) -> None:
    width, height = default_image_size(native, image, max_side)
    assert (width, height) == expected
    assert width % 8 == 0 and height % 8 == 0 and min(width, height) >= 64
    if image is not None and max(expected) < 2048 and min(expected) > 64:
        assert abs(width / height - image[0] / image[1]) < 0.02 * image[0] / image[1]
        assert abs(width * height / native**2 - 1) < 0.05


def test_sized_fills_only_what_was_left_out() -> None:
    assert GenerationParams().sized(64).size == (64, 64)
    assert GenerationParams(width=128).sized(64).size == (128, 64)
    assert GenerationParams(width=96, height=72).sized(1024).size == (96, 72)
    picture = io.BytesIO()
    Image.new("RGB", (300, 200)).save(picture, format="PNG")
    img2img = GenerationParams(init_image=picture.getvalue())
    assert img2img.sized(1024).size == default_image_size(1024, (300, 200)) == (1256, 840)
