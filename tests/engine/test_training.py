from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import Attention
from PIL import Image
from safetensors import safe_open

from sdxl_engine.dataset import TrainingPair
from sdxl_engine.errors import EngineError, TrainingCancelled
from sdxl_engine.generation import generate
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import TrainingParams
from sdxl_engine.source import ModelSource
from sdxl_engine.training import train_lora
from sdxl_engine.training.adapters import MasterWeights
from sdxl_engine.training.caching import EncodedImages, Sizing, _load_image, needs_low_memory
from sdxl_engine.training.loop import (
    _noise,
    caption_conditioning,
    learning_rate_schedule,
    min_snr_loss_weights,
)

from .conftest import STRONG_LORA_PARAMS, encoded_prompt

LORA_KEY = re.compile(r"^unet\..+\.(to_q|to_k|to_v|to_out\.0)\.lora\.(down|up)\.weight$")


def _base_latents(pipeline: StableDiffusionXLPipeline) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(3)
    return pipeline(
        prompt="a red square",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=generator,
        output_type="latent",
    ).images


def _has_lora_layers(module: torch.nn.Module) -> bool:
    return any("lora" in name for name, _ in module.named_modules())


def test_lora_file_has_diffusers_unet_keys_and_metadata(
    trained_lora: Path, pipelines: Pipelines
) -> None:
    with safe_open(trained_lora, framework="pt") as lora:
        keys = list(lora.keys())
        metadata = lora.metadata()
        ranks = {
            lora.get_slice(key).get_shape()[0] for key in keys if key.endswith("lora.down.weight")
        }

    assert keys and all(LORA_KEY.match(key) for key in keys), keys[:3]
    assert {LORA_KEY.match(key).group(1) for key in keys} == {"to_q", "to_k", "to_v", "to_out.0"}
    attention_layers = sum(isinstance(m, Attention) for m in pipelines.base.unet.modules())
    assert len(keys) == attention_layers * 4 * 2  # four projections, down + up each
    assert ranks == {STRONG_LORA_PARAMS.rank}

    assert metadata["format"] == "pt"  # written by diffusers itself
    assert '"unet.r": 4' in metadata["lora_adapter_metadata"]
    assert metadata["sdxl_service.base_model"] == pipelines.source.base_name
    assert metadata["sdxl_service.rank"] == "4"
    assert metadata["sdxl_service.alpha"] == "4"
    assert metadata["sdxl_service.steps"] == "4"
    assert metadata["sdxl_service.resolution"] == "64"
    assert metadata["sdxl_service.learning_rate"] == "0.05"
    assert metadata["sdxl_service.batch_size"] == "2"
    assert metadata["sdxl_service.seed"] == "7"
    assert not trained_lora.with_name(trained_lora.name + ".tmp").exists()


def test_stock_pipeline_loads_the_lora_and_it_changes_the_output(
    trained_lora: Path, tiny_source: ModelSource
) -> None:
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_source.base)
    stock.set_progress_bar_config(disable=True)
    without = _base_latents(stock)

    stock.load_lora_weights(trained_lora)
    with_lora = _base_latents(stock)

    assert (with_lora - without).abs().mean() > 1e-2 * without.abs().mean()


def test_training_leaves_the_base_pipeline_as_it_was(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    before = _base_latents(pipelines.base)
    train_lora(pipelines, training_pairs, STRONG_LORA_PARAMS, tmp_path / "lora.safetensors")

    assert not _has_lora_layers(pipelines.base.unet)
    assert torch.equal(_base_latents(pipelines.base), before)


def test_progress_counts_every_step_up_to_the_total(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    reports: list[tuple[int, int, float]] = []
    params = TrainingParams(batch_size=2, epochs=2, seed=1)  # 3 images: 2 batches per epoch

    result = train_lora(
        pipelines,
        training_pairs,
        params,
        tmp_path / "lora.safetensors",
        on_progress=lambda *r: reports.append(r),
    )

    assert [step for step, _, _ in reports] == [1, 2, 3, 4]
    assert {total for _, total, _ in reports} == {4}
    assert result.steps == 4 and result.final_loss == reports[-1][2]
    assert result.metadata["sdxl_service.steps"] == "4"


def test_stages_are_reported_in_order_around_the_steps(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    events: list[str | int] = []

    train_lora(
        pipelines,
        training_pairs,
        TrainingParams(batch_size=2, steps=2, seed=1),
        tmp_path / "lora.safetensors",
        on_progress=lambda step, total, loss: events.append(step),
        on_stage=events.append,
    )

    assert events == ["caching", "training", 1, 2, "saving"]


def test_same_seed_gives_the_same_lora(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    params = TrainingParams(batch_size=2, steps=2, seed=11)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train_lora(pipelines, training_pairs, params, first)
    train_lora(pipelines, training_pairs, params, second)

    # Compared by content: safetensors may order the header differently from run to run.
    with safe_open(first, framework="pt") as a, safe_open(second, framework="pt") as b:
        assert a.metadata() == b.metadata()
        assert a.keys() == b.keys()
        assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())


def test_low_memory_mode_trains_the_same_lora_and_is_switched_off_after(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    params = TrainingParams(batch_size=2, steps=2, seed=5)
    kept, recomputed = tmp_path / "kept.safetensors", tmp_path / "recomputed.safetensors"
    checkpointing_seen = []
    train_lora(pipelines, training_pairs, params, kept, low_memory=False)
    train_lora(
        pipelines,
        training_pairs,
        params,
        recomputed,
        low_memory=True,
        on_progress=lambda *_: checkpointing_seen.append(
            pipelines.base.unet.is_gradient_checkpointing
        ),
    )

    assert checkpointing_seen == [True, True]
    assert not pipelines.base.unet.is_gradient_checkpointing
    # Recomputing activations changes memory, not arithmetic.
    with safe_open(kept, framework="pt") as a, safe_open(recomputed, framework="pt") as b:
        assert all(torch.allclose(a.get_tensor(k), b.get_tensor(k), atol=1e-6) for k in a.keys())


def test_low_memory_is_never_needed_on_the_cpu() -> None:
    assert not needs_low_memory(torch.device("cpu"))


def test_should_stop_cancels_without_writing(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    output = tmp_path / "lora.safetensors"
    reports: list[int] = []

    with pytest.raises(TrainingCancelled):
        train_lora(
            pipelines,
            training_pairs,
            TrainingParams(batch_size=1, steps=10, seed=1),
            output,
            on_progress=lambda step, total, loss: reports.append(step),
            should_stop=lambda: len(reports) >= 2,
        )

    assert reports == [1, 2]
    assert list(tmp_path.iterdir()) == []
    assert not _has_lora_layers(pipelines.base.unet)


def test_float16_generation_pipelines_refuse_to_train(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    generation_on_cuda = replace(pipelines, dtype=torch.float16)

    with pytest.raises(EngineError, match="purpose='training'"):
        train_lora(generation_on_cuda, training_pairs, TrainingParams(steps=1), tmp_path / "x")

    assert list(tmp_path.iterdir()) == []
    assert not _has_lora_layers(pipelines.base.unet)


def test_no_images_is_an_engine_error(pipelines: Pipelines, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no training images"):
        train_lora(pipelines, [], TrainingParams(), tmp_path / "lora.safetensors")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (TrainingParams(batch_size=0), "batch_size"),
        (TrainingParams(learning_rate=0.0), "learning_rate"),
        (TrainingParams(rank=0), "rank"),
        (TrainingParams(resolution=40), "multiple of 16"),
        (TrainingParams(lr_scheduler="linear"), "lr_scheduler must be one of"),
        (TrainingParams(lr_warmup_steps=-1), "lr_warmup_steps"),
        (TrainingParams(lr_warmup_steps=5), "needs lr_scheduler constant_with_warmup or"),
        (TrainingParams(min_snr_gamma=-1.0), "min_snr_gamma"),
        (TrainingParams(noise_offset=math.nan), "noise_offset"),
        (TrainingParams(caption_dropout=1.5), "caption_dropout"),
        (TrainingParams(background_weight=-0.5), "background_weight"),
        (TrainingParams(trigger="  "), "trigger must not be blank"),
        (
            TrainingParams(prior_preservation_weight=-1.0, trigger="sks"),
            "prior_preservation_weight",
        ),
        (TrainingParams(prior_preservation_weight=math.inf, trigger="sks"), "0 \\(off\\) to 10"),
        (TrainingParams(prior_preservation_weight=math.nan, trigger="sks"), "0 \\(off\\) to 10"),
        (TrainingParams(prior_preservation_weight=1.0, class_prompt=" "), "class_prompt must not"),
        (TrainingParams(prior_preservation_weight=1.0), "needs a class_prompt, or a trigger"),
    ],
)
def test_invalid_parameters_are_engine_errors(
    pipelines: Pipelines,
    training_pairs: list[TrainingPair],
    tmp_path: Path,
    params: TrainingParams,
    message: str,
) -> None:
    with pytest.raises(EngineError, match=message):
        train_lora(pipelines, training_pairs, params, tmp_path / "lora.safetensors")


def test_unreadable_image_is_an_engine_error(pipelines: Pipelines, tmp_path: Path) -> None:
    broken = tmp_path / "0.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(EngineError, match="0.png could not be read"):
        train_lora(
            pipelines,
            [TrainingPair(broken, "x")],
            TrainingParams(seed=1),
            tmp_path / "lora.safetensors",
        )
    assert not _has_lora_layers(pipelines.base.unet)


def test_time_ids_record_original_size_and_centre_crop(tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.new("RGB", (200, 100)).save(wide)  # width 200, height 100

    pixels, placement = _load_image(wide, Sizing([(64, 64)], 16, math.inf))

    assert pixels.shape == (3, 64, 64)
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    # Resized to 128x64, so 32 columns are cropped from each side.
    assert placement.time_ids == [100, 200, 0, 32, 64, 64]


def test_result_carries_the_sha256_of_the_bytes_written(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    output = tmp_path / "lora.safetensors"
    result = train_lora(
        pipelines, training_pairs, TrainingParams(steps=1, resolution=64, seed=1), output
    )
    assert result.sha256 == hashlib.sha256(output.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


@pytest.mark.slow  # compiles both UNets: minutes on a CPU
def test_training_compiled_pipelines_keeps_their_generation_graphs(
    compiled_pipelines: Pipelines,
    training_pairs: list[TrainingPair],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unet = compiled_pipelines.base.unet
    generation_graphs = unet._compiled_call_impl
    path = tmp_path / "lora.safetensors"

    train_lora(compiled_pipelines, training_pairs, STRONG_LORA_PARAMS, path)

    assert path.is_file() and not _has_lora_layers(unet)
    assert unet._compiled_call_impl is generation_graphs
    assert all(module._compiled_call_impl is None for module in list(unet.modules())[1:])
    # The graphs' guards still hold: a native-size request compiles nothing new, even
    # when allowed to (warmed_up=False lifts generation's eager-on-recompile stance).
    native = unet.config.sample_size * compiled_pipelines.base.vae_scale_factor
    monkeypatch.setattr(compiled_pipelines, "warmed_up", False)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    generate(compiled_pipelines, prompt="x", seed=1, height=native, width=native, steps=5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before


@pytest.mark.parametrize(
    "params",
    [
        TrainingParams(batch_size=2, steps=2, seed=5),
        TrainingParams(batch_size=2, steps=2, seed=5, trigger="sks", prior_preservation_weight=1.0),
    ],
    ids=["plain", "prior"],
)
def test_low_memory_mode_trains_with_compiled_blocks(
    compiled_pipelines: Pipelines,
    training_pairs: list[TrainingPair],
    tmp_path: Path,
    params: TrainingParams,
) -> None:
    # A 16 GB card with SDXL_COMPILE: checkpointing recomputes the compiled blocks (with
    # prior preservation, also with the LoRA switched off).
    path = tmp_path / "lora.safetensors"

    result = train_lora(compiled_pipelines, training_pairs, params, path, low_memory=True)

    assert path.is_file() and math.isfinite(result.final_loss)
    assert not compiled_pipelines.base.unet.is_gradient_checkpointing


def test_half_precision_lora_weights_are_updated_through_float32_masters() -> None:
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    masters = MasterWeights([weight])
    optimizer = torch.optim.SGD(masters.parameters, lr=1e-4)

    for _ in range(10):
        weight.grad = torch.ones(4, dtype=torch.bfloat16)
        masters.take_gradients()
        optimizer.step()
        masters.copy_to_model()

    master = masters.parameters[0]
    assert master.dtype == torch.float32 and weight.grad is None
    assert torch.allclose(master, torch.full((4,), 0.999), atol=1e-6)
    # 1e-3 in total is below bfloat16's resolution at 1.0: updating it directly loses it.
    assert torch.equal(weight, torch.ones(4, dtype=torch.bfloat16))


def test_float32_lora_weights_are_their_own_masters() -> None:
    weight = torch.nn.Parameter(torch.ones(4))
    masters = MasterWeights([weight])

    assert masters.parameters[0] is weight


def _learning_rates(params: TrainingParams, total_steps: int) -> list[float]:
    """The rate each optimisation step runs at, stepping the schedule as training does."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=params.learning_rate)
    schedule = learning_rate_schedule(optimizer, params, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_learning_rate_schedules_at_chosen_steps() -> None:
    rate = 1e-3
    assert _learning_rates(TrainingParams(learning_rate=rate), 10) == [rate] * 10
    warm = _learning_rates(
        TrainingParams(learning_rate=rate, lr_scheduler="constant_with_warmup", lr_warmup_steps=4),
        10,
    )
    assert warm[:5] == pytest.approx([0.0, rate / 4, rate / 2, 3 * rate / 4, rate])
    assert warm[5:] == [rate] * 5
    cosine = _learning_rates(
        TrainingParams(learning_rate=rate, lr_scheduler="cosine", lr_warmup_steps=2), 12
    )
    assert cosine[:3] == pytest.approx([0.0, rate / 2, rate])
    # Half-way through the decay the rate is half; it approaches 0 at the end.
    assert cosine[7] == pytest.approx(rate / 2)
    assert all(earlier > later for earlier, later in zip(cosine[2:], cosine[3:], strict=False))
    assert cosine[-1] < rate * 0.03


def test_min_snr_weights_match_the_formula(pipelines: Pipelines) -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipelines.base.scheduler.config)
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps].double()
    snr = alphas / (1 - alphas)
    gamma = 5.0

    weights = min_snr_loss_weights(scheduler, timesteps, gamma)

    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    assert torch.allclose(weights.double(), expected, rtol=1e-5)
    assert weights[0] < 0.01 and weights[-1] == pytest.approx(1.0)  # easy steps count less
    v_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    v_expected = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    v_weights = min_snr_loss_weights(v_scheduler, timesteps, gamma)
    assert torch.allclose(v_weights.double(), v_expected, rtol=1e-5)


def test_noise_offset_shifts_each_image_and_channel_and_zero_keeps_plain_noise() -> None:
    latents = torch.zeros(64, 4, 16, 16)

    plain = _noise(latents, 0.0, torch.Generator().manual_seed(1))
    offset = _noise(latents, 0.5, torch.Generator().manual_seed(1))

    same_draws = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, same_draws)
    shift = (offset - plain).flatten(2)
    assert torch.allclose(shift, shift[..., :1].expand_as(shift))  # constant over each plane
    assert shift[..., 0].std().item() == pytest.approx(0.5, rel=0.2)


def test_the_recipe_options_train_and_are_recorded_in_the_header(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    base = TrainingParams(batch_size=2, steps=3, learning_rate=5e-2, seed=11)
    recipe = replace(
        base, lr_scheduler="cosine", lr_warmup_steps=1, min_snr_gamma=5.0, noise_offset=0.05
    )
    plain = train_lora(pipelines, training_pairs, base, tmp_path / "plain.safetensors")
    tuned = train_lora(pipelines, training_pairs, recipe, tmp_path / "tuned.safetensors")

    assert math.isfinite(tuned.final_loss) and tuned.final_loss != plain.final_loss
    assert tuned.metadata["sdxl_service.lr_scheduler"] == "cosine"
    assert tuned.metadata["sdxl_service.lr_warmup_steps"] == "1"
    assert tuned.metadata["sdxl_service.min_snr_gamma"] == "5.0"
    assert tuned.metadata["sdxl_service.noise_offset"] == "0.05"
    assert plain.metadata["sdxl_service.lr_scheduler"] == "constant"
    assert plain.metadata["sdxl_service.min_snr_gamma"] == "0.0"


def test_the_trigger_is_in_every_encoded_caption_and_recorded(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path, monkeypatch
) -> None:
    encoded_prompts = []
    encode_prompt = pipelines.base.encode_prompt

    def recording_encode_prompt(*args, prompt, **kwargs):
        encoded_prompts.extend(prompt)
        return encode_prompt(*args, prompt=prompt, **kwargs)

    monkeypatch.setattr(pipelines.base, "encode_prompt", recording_encode_prompt)
    params = TrainingParams(batch_size=2, steps=1, seed=3, trigger="ohwx", caption_dropout=0.1)
    result = train_lora(pipelines, training_pairs, params, tmp_path / "lora.safetensors")

    captions, empty = encoded_prompts[:-1], encoded_prompts[-1]
    assert len(captions) == len(training_pairs)
    assert all(caption.startswith("ohwx, ") for caption in captions), captions
    assert empty == ""  # encoded once, for the dropped captions
    assert result.metadata["sdxl_service.trigger"] == "ohwx"
    assert result.metadata["sdxl_service.caption_dropout"] == "0.1"


def _encoded_with_empty_caption(count: int) -> EncodedImages:
    return EncodedImages(
        latents=[torch.zeros(4, 8, 8)] * count,
        placements=[],
        captions=["a caption"] * count,
        prompt_embeds=torch.ones(count, 77, 8),
        pooled_prompt_embeds=torch.ones(count, 6),
        time_ids=torch.zeros(count, 6),
        empty_prompt_embeds=torch.zeros(1, 77, 8),
        empty_pooled_prompt_embeds=torch.zeros(1, 6),
    )


def test_caption_dropout_swaps_in_the_empty_caption_at_its_rate() -> None:
    encoded = _encoded_with_empty_caption(4000)
    indices = torch.arange(4000)

    def dropped(rate: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        prompt, pooled = caption_conditioning(encoded, indices, rate, generator)
        by_prompt, by_pooled = prompt.flatten(1).sum(1) == 0, pooled.sum(1) == 0
        assert torch.equal(by_prompt, by_pooled)  # a sample drops both, or neither
        return by_prompt

    assert not dropped(0.0).any()
    assert dropped(1.0).all()
    assert dropped(0.25).float().mean().item() == pytest.approx(0.25, abs=0.03)


@contextmanager
def _recorded_unet_inputs(pipelines: Pipelines) -> Iterator[list[tuple]]:
    """(latent shape, time ids) of every Base UNet call inside the block."""
    seen: list[tuple] = []

    def record(module, args, kwargs):
        time_ids = kwargs["added_cond_kwargs"]["time_ids"]
        seen.append((tuple(args[0].shape), [row.int().tolist() for row in time_ids]))

    hook = pipelines.base.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def test_bucketed_batches_have_their_buckets_shape_and_time_ids(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    # The session's images: 80x64 (landscape), 64x96 (portrait), 72x72 (square).
    with _recorded_unet_inputs(pipelines) as seen:
        result = train_lora(
            pipelines,
            training_pairs,
            TrainingParams(batch_size=2, epochs=2, seed=5, enable_bucket=True),
            tmp_path / "lora.safetensors",
        )

    # Three buckets of one image each: three single-image batches per epoch.
    assert result.steps == 6 and len(seen) == 6
    expected = {
        (1, 4, 8, 10): [64, 80, 0, 0, 64, 80],  # 80x64 fills 80x64 exactly
        (1, 4, 10, 6): [96, 64, 0, 2, 80, 48],  # 64x96 resized to 53x80, cropped to 48x80
        (1, 4, 8, 8): [72, 72, 0, 0, 64, 64],  # 72x72 resized to 64x64
    }
    assert {shape: ids[0] for shape, ids in seen} == expected
    assert result.metadata["sdxl_service.buckets"] == "48x80:1,80x64:1,64x64:1"
    assert result.metadata["sdxl_service.enable_bucket"] == "True"


def test_without_buckets_every_image_trains_as_a_centred_square(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    with _recorded_unet_inputs(pipelines) as seen:
        result = train_lora(
            pipelines, training_pairs, TrainingParams(seed=5), tmp_path / "lora.safetensors"
        )

    # The original's recipe: one epoch of 3 images at batch 4 is one step, all 64x64.
    assert result.steps == 1 and [shape for shape, _ in seen] == [(3, 4, 8, 8)]
    assert result.metadata["sdxl_service.buckets"] == "64x64:3"
    assert result.metadata["sdxl_service.recipe"] == "original"


def _prompt_embeds(pipeline: StableDiffusionXLPipeline, prompt: str) -> torch.Tensor:
    embeds, pooled = encoded_prompt(pipeline, prompt)
    return torch.cat([embeds.flatten(), pooled.flatten()])


def test_a_text_encoder_lora_is_saved_loaded_by_stock_diffusers_and_removed_after(
    pipelines: Pipelines,
    training_pairs: list[TrainingPair],
    tiny_source: ModelSource,
    tmp_path: Path,
) -> None:
    path = tmp_path / "lora.safetensors"
    before = _prompt_embeds(pipelines.base, "a red square")
    params = replace(STRONG_LORA_PARAMS, train_text_encoder=True, text_encoder_lr=1e-2)

    result = train_lora(pipelines, training_pairs, params, path)

    with safe_open(path, framework="pt") as lora:
        components = {key.split(".")[0] for key in lora.keys()}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    assert result.metadata["sdxl_service.train_text_encoder"] == "True"
    assert result.metadata["sdxl_service.text_encoder_lr"] == "0.01"
    # The training pipeline's encoders are plain again and encode as before.
    assert not _has_lora_layers(pipelines.base.text_encoder)
    assert not _has_lora_layers(pipelines.base.text_encoder_2)
    assert torch.equal(_prompt_embeds(pipelines.base, "a red square"), before)
    # Stock diffusers applies the text encoders' part: the prompt encodes differently.
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_source.base)
    plain = _prompt_embeds(stock, "a red square")
    stock.load_lora_weights(str(path))
    assert not torch.allclose(_prompt_embeds(stock, "a red square"), plain, atol=1e-4)


def test_the_text_encoders_learn_at_their_own_rate(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    def text_encoder_up_weights(text_encoder_lr: float) -> torch.Tensor:
        path = tmp_path / f"lora-{text_encoder_lr}.safetensors"
        params = replace(
            STRONG_LORA_PARAMS, train_text_encoder=True, text_encoder_lr=text_encoder_lr
        )
        train_lora(pipelines, training_pairs, params, path)
        with safe_open(path, framework="pt") as lora:
            return torch.cat(
                [
                    lora.get_tensor(key).flatten()
                    for key in sorted(lora.keys())
                    if key.startswith("text_encoder") and ".up." in key
                ]
            )

    # Up-weights start at zero: how far they move follows the rate.
    slow, fast = text_encoder_up_weights(1e-5), text_encoder_up_weights(1e-2)
    assert 0 < slow.abs().max() < fast.abs().max() / 10
