"""Prompt conditioning (sdxl_engine.generation.conditioning): AUTOMATIC1111's 75-token
chunks and attention weights, on the tiny model (whose tokenizer makes one token of each
character; a one-letter word is one token)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdxl_engine.generation import batch, conditioning
from sdxl_engine.generation.batch import generate, generate_batch
from sdxl_engine.generation.conditioning import (
    CHUNK_TOKENS,
    base_encoding,
    chunk_prompt,
    refiner_encoding,
)
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import GenerationParams

SMALL = {"height": 64, "width": 64, "steps": 4, "guidance_scale": 7.0}


def _words(count: int, offset: int = 0) -> str:
    """`count` one-letter words: `count` tokens of the tiny tokenizer."""
    letters = string.ascii_lowercase
    return " ".join(letters[(offset + index) % 26] for index in range(count))


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image).astype(int) for image in images])


def _encode(pipelines: Pipelines, prompt: str, negative: str = "", **params: Any) -> tuple:
    request = GenerationParams(prompt, negative, **params)
    with torch.no_grad():
        return base_encoding(pipelines, request, guidance=True)


def _raw(text_encoder: Any, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's penultimate hidden state (77, features) and first output for `ids`."""
    with torch.no_grad():
        output = text_encoder(torch.tensor([ids]), output_hidden_states=True)
    return output.hidden_states[-2][0], output[0]


def _encoded_before(pipelines: Pipelines, request: GenerationParams, guidance: bool) -> Any:
    """The Base's prompt encoding before prompt syntax (batch._base_embeddings' call)."""
    return pipelines.base.encode_prompt(
        request.prompt,
        device=torch.device(pipelines.device),
        num_images_per_prompt=request.num_images,
        do_classifier_free_guidance=guidance,
        negative_prompt=request.negative_prompt or None,
    )


def _refiner_encoded_before(refiner: Any, request: GenerationParams, device: str) -> Any:
    """The Refiner's prompt encoding before prompt syntax."""
    return refiner.encode_prompt(
        request.prompt,
        device=torch.device(device),
        num_images_per_prompt=request.num_images,
        do_classifier_free_guidance=False,
    )[::2]


def test_the_weighted_embedding_is_a1111s_formula(pipelines: Pipelines) -> None:
    """(b:1.5) [c]: each encoder's features of the chunk BOS a b c d EOS pad..., each token's
    times its weight, then times (mean before / mean after), side by side."""
    base = pipelines.base
    embeds, _, pooled, _ = _encode(pipelines, "a (b:1.5) [c] d", "")
    weights = torch.tensor([1.0, 1.0, 1.5, 1 / 1.1, 1.0] + [1.0] * 72)
    expected = []
    for tokenizer, text_encoder in (
        (base.tokenizer, base.text_encoder),
        (base.tokenizer_2, base.text_encoder_2),
    ):
        # The same ids as the text without brackets, as diffusers tokenizes it.
        ids = tokenizer("a b c d", padding="max_length", max_length=77).input_ids
        hidden, first = _raw(text_encoder, ids)
        weighted = hidden * weights[:, None]
        expected.append(weighted * (hidden.mean() / weighted.mean()))
    torch.testing.assert_close(embeds[0], torch.cat(expected, dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled[0], first[0])  # text_encoder_2's, unweighted
    # The weights did something: the plain text's embedding is another.
    plain, _, _, _ = _encode(pipelines, "a b c d", "")
    assert (plain - embeds).abs().max() > 1e-3


def test_one_chunk_through_the_chunks_is_encode_prompts_exactly(pipelines: Pipelines) -> None:
    """The chunked path (taken for weights, or more than 75 tokens) builds for a plain
    prompt of one chunk the very tokens and embeddings diffusers' encode_prompt does."""
    base = pipelines.base
    prompt = "a red, apple"
    with torch.no_grad():
        stock, _, stock_pooled, _ = base.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        encoders = [(base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)]
        chunked, count = conditioning._encode(encoders, [(prompt, 1.0)])
        ours = conditioning._embed(encoders, chunked)
    assert count == 1
    assert chunked[0].ids[0] == base.tokenizer(prompt, padding="max_length").input_ids
    assert torch.equal(ours.embeds, stock)
    assert torch.equal(ours.pooled, stock_pooled)


def test_a_short_plain_prompt_renders_as_before(
    pipelines: Pipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt without brackets or BREAK, within 75 tokens: the image of the engine before
    prompt syntax (encode_prompt of the prompt as given, Base and Refiner), bit for bit."""
    request = {"prompt": "a red apple, on a table", "negative_prompt": "blurry", "seed": 3}
    ours = generate(pipelines, num_images=2, **request, **SMALL)

    monkeypatch.setattr(batch, "base_encoding", _encoded_before)
    monkeypatch.setattr(batch, "refiner_encoding", _refiner_encoded_before)
    before = generate(pipelines, num_images=2, **request, **SMALL)
    assert np.array_equal(_pixels(ours), _pixels(before))
    # "plain" reads the same prompt the same way.
    monkeypatch.undo()
    plain = generate(pipelines, num_images=2, prompt_syntax="plain", **request, **SMALL)
    assert np.array_equal(_pixels(plain), _pixels(before))


def test_a_long_prompts_tail_changes_the_image(
    pipelines: Pipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """150 tokens: two chunks, and the second counts. Encoded as before prompt syntax
    (encode_prompt, cut at 77 tokens) the two prompts below give the same image; here
    they differ (mean 0.6 of 255 on the tiny random model, whose prompts matter little:
    two short prompts differ by about 4)."""
    head = _words(75)
    one, other = head + " " + _words(75), head + " " + _words(75, offset=13)
    embeds, negative, _, _ = _encode(pipelines, one, "")
    assert embeds.shape[1] == negative.shape[1] == 2 * 77
    assert torch.equal(negative, torch.zeros_like(negative))  # SDXL's zeros, as long

    ours = [_pixels(generate(pipelines, prompt=text, seed=5, **SMALL)) for text in (one, other)]
    monkeypatch.setattr(batch, "base_encoding", _encoded_before)
    monkeypatch.setattr(batch, "refiner_encoding", _refiner_encoded_before)
    before = [_pixels(generate(pipelines, prompt=text, seed=5, **SMALL)) for text in (one, other)]
    assert np.array_equal(*before)
    assert np.abs(ours[0] - ours[1]).mean() > 0.3


def test_break_and_a_full_chunk_start_new_chunks(pipelines: Pipelines) -> None:
    tokenizer = pipelines.base.tokenizer
    two = chunk_prompt(tokenizer, [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
    assert len(two) == 2
    assert two.ids[0][:3] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("a</w>"), 513]
    assert two.ids[1][1] == tokenizer.convert_tokens_to_ids("b</w>")
    # A BREAK in brackets is a word again (A1111's weight -1.1): one chunk.
    assert len(chunk_prompt(tokenizer, [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)])) == 1
    embeds, _, _, _ = _encode(pipelines, "a BREAK b", "")
    assert embeds.shape[1] == 2 * 77
    assert [len(chunk_prompt(tokenizer, [(_words(n), 1.0)])) for n in (75, 76, 150, 151)] == [
        1,
        2,
        2,
        3,
    ]


def test_a_full_chunk_ends_after_a_comma_within_its_last_20_tokens(pipelines: Pipelines) -> None:
    tokenizer = pipelines.base.tokenizer
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    # 60 words, a comma, 20 words: the comma is 15 tokens before the chunk's end.
    near = chunk_prompt(tokenizer, [(_words(60) + ", " + _words(20), 1.0)])
    assert len(near) == 2
    assert near.ids[0][61] == comma and near.ids[0][62] == tokenizer.eos_token_id
    assert near.ids[1][1:21] == tokenizer(_words(20), add_special_tokens=False).input_ids
    # 50 words and a comma: 25 tokens back, too far; the chunk is cut at 75.
    far = chunk_prompt(tokenizer, [(_words(50) + ", " + _words(30), 1.0)])
    assert far.ids[0][76] == tokenizer.eos_token_id and far.ids[0][75] != comma
    assert len(far.ids[1]) == CHUNK_TOKENS + 2


def test_the_shorter_of_prompt_and_negative_is_padded_with_empty_chunks(
    pipelines: Pipelines,
) -> None:
    base = pipelines.base
    embeds, negative, pooled, negative_pooled = _encode(pipelines, _words(100), "(blurry:1.2)")
    assert embeds.shape[1] == negative.shape[1] == 2 * 77
    # The negative's second chunk is an empty one's encoding: BOS, EOS, padding.
    empty = [
        _raw(encoder, tokenizer("", padding="max_length", max_length=77).input_ids)[0]
        for tokenizer, encoder in (
            (base.tokenizer, base.text_encoder),
            (base.tokenizer_2, base.text_encoder_2),
        )
    ]
    torch.testing.assert_close(negative[0, 77:], torch.cat(empty, dim=-1), rtol=1e-6, atol=1e-6)
    # ...and its pooled embedding is its first chunk's (the words, not the padding).
    assert (negative_pooled - pooled).abs().max() > 1e-4
    # The other way round: the prompt is padded to the negative's count.
    short, long_negative, _, _ = _encode(pipelines, "(a cat:1.1)", _words(160))
    assert short.shape[1] == long_negative.shape[1] == 3 * 77


def test_the_refiners_encoding_is_chunked_and_weighted_alike(pipelines: Pipelines) -> None:
    refiner = pipelines.refiner
    assert refiner is not None
    with torch.no_grad():
        long, pooled = refiner_encoding(refiner, GenerationParams(_words(100), num_images=2), "cpu")
        stock, _, stock_pooled, _ = refiner.encode_prompt(
            "a b", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        short, short_pooled = refiner_encoding(refiner, GenerationParams("a b"), "cpu")
        weighted, _ = refiner_encoding(refiner, GenerationParams("a (b:1.4)"), "cpu")
    assert long.shape == (2, 2 * 77, 1280 if stock.shape[-1] == 1280 else stock.shape[-1])
    assert pooled.shape[0] == 2
    assert torch.equal(short, stock) and torch.equal(short_pooled, stock_pooled)
    assert weighted.shape == stock.shape and (weighted - stock).abs().max() > 1e-3


def test_a_batch_of_one_and_two_chunk_prompts_gives_each_its_images_alone(
    pipelines: Pipelines,
) -> None:
    short = GenerationParams("a red apple", "blurry", num_images=1, seed=3, **SMALL)
    long = GenerationParams(_words(120), "", num_images=2, seed=4, **SMALL)
    steps: list[tuple[int, int]] = []

    batched = generate_batch(pipelines, [short, long], on_step=lambda *s: steps.append(s))

    alone = [generate_batch(pipelines, [job])[0] for job in (short, long)]
    assert [len(images) for images in batched] == [1, 2]
    for together, by_itself in zip(batched, alone, strict=True):
        assert np.abs(_pixels(together) - _pixels(by_itself)).max() <= 2
    # One denoising run per length: the progress counts both runs' steps.
    assert steps[-1] == (2 * SMALL["steps"], 2 * SMALL["steps"])


def test_a_trigger_word_in_a_weighted_group_still_meets_the_lora(
    pipelines: Pipelines, text_encoder_lora: Path, tmp_path: Path
) -> None:
    """The text encoders carry the request's LoRA while the weighted prompt is encoded."""
    prompt = "(a red square:1.2), [blurry]"
    lora = AppliedLora(text_encoder_lora)
    request = GenerationParams(prompt)
    with torch.no_grad():
        without = base_encoding(pipelines, request, guidance=False)[0]
        pipelines.loras.merge([lora])
        try:
            merged = base_encoding(pipelines, request, guidance=False)[0]
        finally:
            pipelines.loras.restore()
        again = base_encoding(pipelines, request, guidance=False)[0]
    assert (merged - without).abs().max() > 1e-3
    assert torch.equal(again, without)
    # Through generate: the whole LoRA differs from its UNet part alone.
    unet_part = tmp_path / "unet-part.safetensors"
    save_file(
        {k: v for k, v in load_file(text_encoder_lora).items() if k.startswith("unet.")},
        str(unet_part),
    )
    whole, unet_only = (
        _pixels(generate(pipelines, prompt=prompt, seed=9, loras=[AppliedLora(path)], **SMALL))
        for path in (text_encoder_lora, unet_part)
    )
    assert np.abs(whole - unet_only).mean() > 0.5


def test_compiled_pipelines_run_longer_prompts_without_compiling(
    pipelines: Pipelines, compiled_pipelines: Pipelines
) -> None:
    """A prompt of two chunks (154 positions of cross-attention) at the compiled native
    size: no new compiled graph inside the request (on a GPU it replays a CUDA graph of
    the eager UNet, graphs.UNetGraphs), and the image of the eager pipelines."""
    native = pipelines.base.unet.config.sample_size * pipelines.base.vae_scale_factor
    request = {"prompt": "(a red:1.2) square BREAK on a table", "seed": 5, "steps": 5}
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    compiled = generate(compiled_pipelines, height=native, width=native, **request)

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
    eager = generate(pipelines, height=native, width=native, **request)
    assert np.abs(_pixels(compiled) - _pixels(eager)).max() <= 2
