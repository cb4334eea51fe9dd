from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdxl_engine.errors import EngineError, GenerationCancelled
from sdxl_engine.generation.batch import decode_latents, generate, generate_batch
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import GenerationParams
from tests.helpers import images_close

SMALL = {"height": 48, "width": 64, "steps": 5}
# The requests of the batching tests: 64x64, 4 steps (3 of the Base, 1 of the Refiner).
BATCHED = {"height": 64, "width": 64, "steps": 4, "guidance_scale": 7.0}


def _pixels(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def _same(first: list[Image.Image], second: list[Image.Image]) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(_pixels(first), _pixels(second), strict=True))


def _max_difference(first: list[Image.Image], second: list[Image.Image]) -> int:
    """The largest difference of one 8-bit value between two lists of images."""
    return max(
        int(np.abs(a.astype(int) - b.astype(int)).max())
        for a, b in zip(_pixels(first), _pixels(second), strict=True)
    )


def _compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_base_and_refiner_return_the_asked_images(pipelines: Pipelines) -> None:
    images = generate(
        pipelines, prompt="a red apple", negative_prompt="blurry", num_images=2, seed=1, **SMALL
    )

    assert len(images) == 2
    assert all(image.size == (64, 48) and image.mode == "RGB" for image in images)


def test_same_seed_same_images_other_seed_other_images(pipelines: Pipelines) -> None:
    first = generate(pipelines, prompt="a red apple", seed=5, **SMALL)
    again = generate(pipelines, prompt="a red apple", seed=5, **SMALL)
    other = generate(pipelines, prompt="a red apple", seed=6, **SMALL)

    assert _same(first, again)
    assert not _same(first, other)


def test_on_step_counts_base_and_refiner_steps(pipelines: Pipelines) -> None:
    reports: list[tuple[int, int]] = []
    generate(
        pipelines,
        prompt="x",
        seed=1,
        height=64,
        width=64,
        steps=10,
        on_step=lambda *r: reports.append(r),
    )

    assert reports == [(step, 10) for step in range(1, 11)]


def test_lora_applies_to_this_call_and_the_base_only(
    pipelines: Pipelines, trained_lora: Path
) -> None:
    before = generate(pipelines, prompt="a red square", seed=9, **SMALL)
    weights = {
        name: pipeline.unet.state_dict()
        for name, pipeline in (("base", pipelines.base), ("refiner", pipelines.refiner))
    }
    originals = {name: {k: v.clone() for k, v in w.items()} for name, w in weights.items()}
    lora_layers_seen = {"base": False, "refiner": False}

    def watch(step: int, total: int) -> None:
        # The LoRA is merged into the Base UNet's weights while the call runs.
        for name in lora_layers_seen:
            lora_layers_seen[name] |= any(
                not torch.equal(weights[name][k], originals[name][k]) for k in weights[name]
            )

    with_lora = generate(
        pipelines,
        prompt="a red square",
        seed=9,
        loras=[AppliedLora(trained_lora)],
        on_step=watch,
        **SMALL,
    )
    after = generate(pipelines, prompt="a red square", seed=9, **SMALL)

    assert lora_layers_seen == {"base": True, "refiner": False}
    assert not _same(before, with_lora)
    assert _same(before, after)
    assert all(torch.equal(weights["base"][k], originals["base"][k]) for k in weights["base"])


def test_on_step_raising_cancelled_stops_between_steps_and_leaves_the_pipelines_as_before(
    pipelines: Pipelines, trained_lora: Path
) -> None:
    before = generate(pipelines, prompt="a red square", seed=9, **SMALL)
    weights = pipelines.base.unet.state_dict()
    originals = {k: v.clone() for k, v in weights.items()}
    own_schedulers = pipelines.base.scheduler, pipelines.refiner.scheduler
    steps_seen = []

    def cancel_at_step_two(done: int, total: int) -> None:
        steps_seen.append(done)
        if done == 2:
            raise GenerationCancelled("cancelled")

    with pytest.raises(GenerationCancelled):
        generate(
            pipelines,
            prompt="a red square",
            seed=9,
            loras=[AppliedLora(trained_lora)],
            scheduler="euler_a",
            on_step=cancel_at_step_two,
            **SMALL,
        )

    assert steps_seen == [1, 2]  # no step ran after the cancel
    assert all(torch.equal(weights[k], originals[k]) for k in weights)  # the LoRA is unmerged
    assert (pipelines.base.scheduler, pipelines.refiner.scheduler) == own_schedulers
    assert _same(before, generate(pipelines, prompt="a red square", seed=9, **SMALL))


def test_lora_scale_zero_matches_no_lora(pipelines: Pipelines, trained_lora: Path) -> None:
    plain = generate(pipelines, prompt="a red square", seed=4, **SMALL)
    scaled_off = generate(
        pipelines, prompt="a red square", seed=4, loras=[AppliedLora(trained_lora, 0.0)], **SMALL
    )

    assert _same(plain, scaled_off)


def test_unusable_lora_is_an_engine_error_and_leaves_no_trace(
    pipelines: Pipelines, tmp_path: Path
) -> None:
    before = generate(pipelines, prompt="x", seed=2, **SMALL)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")

    with pytest.raises(EngineError, match="broken.safetensors could not be read"):
        generate(pipelines, prompt="x", seed=2, loras=[AppliedLora(broken)], **SMALL)

    assert _same(before, generate(pipelines, prompt="x", seed=2, **SMALL))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"height": 50}, "multiples of 8"),
        ({"num_images": 0}, "num_images"),
        ({"steps": 0}, "steps"),
    ],
)
def test_invalid_requests_are_engine_errors(
    pipelines: Pipelines, overrides: dict, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        generate(pipelines, prompt="x", seed=1, **{**SMALL, **overrides})


@pytest.mark.slow  # compiles both UNets: minutes on a CPU
def test_compiled_pipelines_compute_what_eager_ones_do_lora_merged_included(
    pipelines: Pipelines, compiled_pipelines: Pipelines, trained_lora: Path
) -> None:
    assert compiled_pipelines.compiled and compiled_pipelines.warmed_up
    native = pipelines.base.unet.config.sample_size * pipelines.base.vae_scale_factor
    request = {"prompt": "a red square", "seed": 3, "height": native, "width": native, "steps": 5}
    graphs_before = _compiled_graphs()

    compiled_plain = generate(compiled_pipelines, **request)
    compiled_lora = generate(compiled_pipelines, loras=[AppliedLora(trained_lora)], **request)

    assert images_close(compiled_plain, generate(pipelines, **request))
    # The LoRA is merged into the weights the compiled graphs read, in place.
    assert images_close(
        compiled_lora, generate(pipelines, loras=[AppliedLora(trained_lora)], **request)
    )
    assert not _same(compiled_plain, compiled_lora)
    assert _compiled_graphs() == graphs_before  # warm_up compiled everything needed


def test_compiled_pipelines_run_other_sizes_eagerly_instead_of_compiling(
    pipelines: Pipelines, compiled_pipelines: Pipelines
) -> None:
    native = pipelines.base.unet.config.sample_size * pipelines.base.vae_scale_factor
    native_size = {"height": native, "width": native, "steps": 5}
    graphs_before = _compiled_graphs()

    other_size = generate(compiled_pipelines, prompt="a red square", seed=5, **SMALL)
    # The compiled size, but an image count warm_up did not capture.
    two_images = generate(
        compiled_pipelines, prompt="a red square", seed=5, num_images=2, **native_size
    )

    assert _compiled_graphs() == graphs_before
    assert images_close(other_size, generate(pipelines, prompt="a red square", seed=5, **SMALL))
    assert len(two_images) == 2


def test_img2img_at_the_native_size_replays_the_warmed_up_graphs(
    compiled_pipelines: Pipelines,
) -> None:
    """The face pass (issue 28) redoes each face as an img2img at the native size: it must
    run the code warm_up compiled, not compile again (nor fall back to eager)."""
    native = compiled_pipelines.base.unet.config.sample_size * (
        compiled_pipelines.base.vae_scale_factor
    )
    rng = np.random.default_rng(0)
    start = Image.fromarray(rng.integers(0, 256, (native, native, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    start.save(buffer, format="PNG")
    graphs_before = _compiled_graphs()
    # Not warmed up: a shape or layout it has not compiled would compile now, and count.
    compiled_pipelines.warmed_up = False
    try:
        for refiner in ("ensemble", "none"):
            generate(
                compiled_pipelines,
                prompt="a face",
                seed=2,
                steps=5,
                height=native,
                width=native,
                init_image=buffer.getvalue(),
                strength=0.4,
                refiner=refiner,
            )
    finally:
        compiled_pipelines.warmed_up = True
    assert _compiled_graphs() == graphs_before


def test_a_text_encoder_lora_applies_to_this_call_only(
    pipelines: Pipelines, text_encoder_lora: Path, tmp_path: Path
) -> None:
    unet_part = tmp_path / "unet-part.safetensors"
    save_file(
        {k: v for k, v in load_file(text_encoder_lora).items() if k.startswith("unet.")},
        str(unet_part),
    )
    before = generate(pipelines, prompt="a red square", seed=9, **SMALL)

    whole = generate(
        pipelines, prompt="a red square", seed=9, loras=[AppliedLora(text_encoder_lora)], **SMALL
    )
    unet_only = generate(
        pipelines, prompt="a red square", seed=9, loras=[AppliedLora(unet_part)], **SMALL
    )
    after = generate(pipelines, prompt="a red square", seed=9, **SMALL)

    assert not _same(whole, unet_only)  # the text encoders' part is applied too
    assert _same(before, after)


def test_a_one_job_batch_is_stock_diffusers_request_exactly(pipelines: Pipelines) -> None:
    """generate() (a one-job generate_batch: its own prompt encoding and starting noise)
    gives the pixels of stock diffusers' Base + Refiner call for the same seed, bit for bit:
    what the engine did before batching, through the pipelines' own `prompt=`."""
    seed, prompt = 5, "a red apple"
    shared = {
        "height": BATCHED["height"],
        "width": BATCHED["width"],
        "num_inference_steps": BATCHED["steps"],
        "num_images_per_prompt": 2,
        "output_type": "latent",
    }
    with torch.no_grad():
        latents = pipelines.base(
            prompt=prompt,
            negative_prompt=None,
            guidance_scale=BATCHED["guidance_scale"],
            denoising_end=0.8,
            generator=[torch.Generator("cpu").manual_seed(s) for s in (seed, seed + 1)],
            **shared,
        ).images
        refined = pipelines.refiner(
            prompt=prompt,
            image=latents,
            denoising_start=0.8,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            **shared,
        ).images
        stock = decode_latents(pipelines, refined)

    ours = generate(pipelines, prompt=prompt, num_images=2, seed=seed, **BATCHED)

    assert len(ours) == len(stock) == 2
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(ours), _pixels(stock), strict=True))


def test_a_batch_gives_each_job_the_images_it_gets_alone(pipelines: Pipelines) -> None:
    """Two requests with their own prompts, negative prompts, image counts and seeds run as
    one batch: each gets its own images, as when run alone (up to the last bit of float
    arithmetic in a larger batch: at most 1 of 255 measured on the CPU; a prompt or seed of
    the other job changes them by 30 to 255)."""
    apple = GenerationParams("a red apple", "blurry", num_images=1, seed=3, **BATCHED)
    car = GenerationParams("a blue car", "", num_images=2, seed=4, **BATCHED)

    batched = generate_batch(pipelines, [apple, car])

    alone = [
        generate(
            pipelines,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            num_images=job.num_images,
            seed=job.seed,
            **BATCHED,
        )
        for job in (apple, car)
    ]
    assert [len(images) for images in batched] == [1, 2]
    assert all(image.size == (64, 64) for images in batched for image in images)
    assert _max_difference(batched[0], alone[0]) <= 2
    assert _max_difference(batched[1], alone[1]) <= 2
    # The jobs' images are far apart, so a swap or a prompt left out could not pass above.
    apple_pixels = _pixels(batched[0])[0].astype(int)
    for car_pixels in _pixels(batched[1]):
        assert np.abs(apple_pixels - car_pixels.astype(int)).mean() > 10
    assert not np.array_equal(*_pixels(batched[1]))


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([], "at least one job"),
        (
            [
                GenerationParams("x", num_images=1, seed=1, **BATCHED),
                GenerationParams("y", num_images=0, seed=2, **BATCHED),
            ],
            "num_images must be at least 1",
        ),
    ],
    ids=["no job", "a job of no image"],
)
def test_a_batch_without_jobs_or_with_an_empty_job_is_an_engine_error(
    pipelines: Pipelines, jobs: list[GenerationParams], message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        generate_batch(pipelines, jobs)


def test_each_image_is_reproduced_alone_by_its_own_seed(pipelines: Pipelines) -> None:
    job = GenerationParams("a red apple", "blurry", num_images=3, seed=2**63 - 2, **BATCHED)
    assert job.seeds == [2**63 - 2, 2**63 - 1, 0]  # A1111's seed + i, wrapped

    together = generate_batch(pipelines, [job])[0]
    alone = [
        generate(pipelines, prompt="a red apple", negative_prompt="blurry", seed=seed, **BATCHED)[0]
        for seed in job.seeds
    ]

    # Equal up to the last bits a batch of 3 sums in another order than a batch of 1.
    assert images_close(together, alone)
    assert _max_difference(together[:1], together[1:2]) > 8


def test_two_loras_give_stock_diffusers_image_with_both_adapters(
    pipelines: Pipelines, trained_lora: Path, text_encoder_lora: Path
) -> None:
    """Two LoRAs at scales 0.8 and -0.5, one with text-encoder pairs, merged for the call:
    the pixels of stock diffusers with both adapters loaded at those weights."""
    seed, prompt = 6, "a red apple"
    loras = [AppliedLora(trained_lora, 0.8), AppliedLora(text_encoder_lora, -0.5)]
    ours = generate(pipelines, prompt=prompt, seed=seed, loras=loras, **BATCHED)
    one = generate(pipelines, prompt=prompt, seed=seed, loras=loras[:1], **BATCHED)
    plain = generate(pipelines, prompt=prompt, seed=seed, **BATCHED)

    base = pipelines.base
    base.load_lora_weights(str(trained_lora), adapter_name="first")
    base.load_lora_weights(str(text_encoder_lora), adapter_name="second")
    try:
        base.set_adapters(["first", "second"], adapter_weights=[0.8, -0.5])
        shared = {"num_inference_steps": BATCHED["steps"], "output_type": "latent"}
        with torch.no_grad():
            latents = base(
                prompt=prompt,
                height=BATCHED["height"],
                width=BATCHED["width"],
                guidance_scale=BATCHED["guidance_scale"],
                denoising_end=0.8,
                generator=torch.Generator("cpu").manual_seed(seed),
                **shared,
            ).images
            base.disable_lora()  # text_encoder_2 is the Refiner's too: it must not see them
            refined = pipelines.refiner(
                prompt=prompt, image=latents, denoising_start=0.8, guidance_scale=1.0, **shared
            ).images
            stock = decode_latents(pipelines, refined)
    finally:
        base.unload_lora_weights()

    assert images_close(ours, stock)
    assert _max_difference(ours, one) > 8 and _max_difference(one, plain) > 8
    assert _same(plain, generate(pipelines, prompt=prompt, seed=seed, **BATCHED))
