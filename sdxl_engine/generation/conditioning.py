"""Prompt embeddings of any length, with AUTOMATIC1111's attention weights.

AUTOMATIC1111's classic text processing (modules/sd_hijack_clip.py; Forge's
backend/text_processing/classic_engine.py), for both SDXL text encoders:

- the prompt is read into weighted pieces (sdxl_engine.prompt_syntax), each piece
  tokenized alone (no BOS/EOS) and its tokens laid in chunks of 75; a chunk that fills up
  while a comma lies within its last 20 tokens ends after that comma, the rest moving to
  the next chunk (A1111's "prompt word wrap length limit", 20); BREAK starts a new chunk;
- each chunk is BOS + its 75 tokens + EOS, padded with the tokenizer's own pad token (EOS
  for tokenizer, "!" for SDXL's tokenizer_2): a prompt of one chunk is token for token what
  diffusers' encode_prompt encodes;
- each encoder encodes each chunk (its penultimate hidden state, as diffusers does for
  SDXL), then "Original" emphasis: every token's features times its weight, then the
  chunk times (its mean before / its mean after), per encoder and per chunk as in A1111;
  the encoders' features are concatenated (768 + 1280) and the chunks follow each other
  along the sequence (77 x chunks);
- the pooled embedding is text_encoder_2's of the first chunk;
- the negative prompt and the prompt are padded with empty chunks (BOS, EOS, pad) to the
  same count (A1111's "pad prompt/negative prompt to be same length"); SDXL's zeros for an
  empty negative prompt (force_zeros_for_empty_prompt) stay, as long as the prompt.

A prompt and negative prompt of one chunk each with every weight 1 (any prompt of up to 75
tokens without brackets or BREAK) go through diffusers' encode_prompt itself, so such a
request renders bit for bit as before prompt syntax existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)

from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import GenerationParams
from sdxl_engine.prompt_syntax import BREAK, parse_prompt

# Tokens per chunk between its BOS and EOS: CLIP's 77 positions less those two.
CHUNK_TOKENS = 75
# A full chunk ends after its last comma when that comma is at most this many tokens back
# (A1111's comma_padding_backtrack, whose default is 20; 0 would turn it off).
COMMA_BACKTRACK = 20

Pieces = list[tuple[str, float]]


@dataclass(frozen=True)
class Chunks:
    """A text's chunks for one tokenizer: CHUNK_TOKENS + 2 ids and as many weights each."""

    ids: list[list[int]]
    weights: list[list[float]]

    def __len__(self) -> int:
        return len(self.ids)


def chunk_prompt(tokenizer: Any, pieces: Pieces) -> Chunks:
    """`pieces` (prompt_syntax.parse_prompt's) as `tokenizer`'s chunks, as A1111 lays them."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    # The comma as a word of its own (not get_vocab(), which copies the whole vocabulary).
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    comma = None if comma == tokenizer.unk_token_id else comma
    tokenized = tokenizer(
        [text for text, _ in pieces], add_special_tokens=False, truncation=False, verbose=False
    )["input_ids"]
    chunks = Chunks([], [])
    ids: list[int] = []
    weights: list[float] = []
    # Where the current chunk's last comma is (-1: none yet).
    last_comma = -1

    def close(taken: int) -> None:
        """Ends the current chunk after its first `taken` tokens; the rest start the next."""
        nonlocal ids, weights, last_comma
        kept, kept_weights = ids[:taken], weights[:taken]
        filler = CHUNK_TOKENS - len(kept)
        chunk = [bos, *kept, eos, *[eos] * filler]
        # Everything after the first EOS is padding (A1111 pads with EOS, then turns the
        # positions after the first EOS into the tokenizer's pad where that differs).
        end = chunk.index(eos)
        chunks.ids.append(chunk[: end + 1] + [pad] * (len(chunk) - end - 1))
        chunks.weights.append([1.0, *kept_weights, 1.0, *[1.0] * filler])
        ids, weights, last_comma = ids[taken:], weights[taken:], -1

    for (text, weight), piece_ids in zip(pieces, tokenized, strict=True):
        if (text, weight) == BREAK:
            close(len(ids))
            continue
        for token in piece_ids:
            if token == comma:
                last_comma = len(ids)
            elif (
                COMMA_BACKTRACK
                and len(ids) == CHUNK_TOKENS
                and last_comma != -1
                and len(ids) - last_comma <= COMMA_BACKTRACK
            ):
                close(last_comma + 1)
            if len(ids) == CHUNK_TOKENS:
                close(CHUNK_TOKENS)
            ids.append(token)
            weights.append(weight)
    if ids or not chunks.ids:
        close(len(ids))
    return chunks


def empty_chunk(tokenizer: Any) -> list[int]:
    """The ids of a chunk with no tokens: what a shorter prompt is padded with."""
    return chunk_prompt(tokenizer, [("", 1.0)]).ids[0]


def padded(chunks: Chunks, tokenizer: Any, count: int) -> Chunks:
    """`chunks` with empty chunks after them, `count` in all."""
    missing = count - len(chunks)
    return Chunks(
        chunks.ids + [empty_chunk(tokenizer)] * missing,
        chunks.weights + [[1.0] * (CHUNK_TOKENS + 2)] * missing,
    )


def encode_chunks(text_encoder: Any, chunks: Chunks) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(1, 77 x chunks, features) of `chunks` through `text_encoder` with A1111's "Original"
    emphasis, and the encoder's pooled output of the first chunk (None for an encoder
    without one, SDXL's text_encoder)."""
    ids = torch.tensor(chunks.ids, device=text_encoder.device)
    output = text_encoder(ids, output_hidden_states=True)
    hidden: torch.Tensor = output.hidden_states[-2]
    weights = torch.tensor(chunks.weights, device=hidden.device, dtype=hidden.dtype)
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    hidden = hidden * weights.unsqueeze(-1)
    hidden = hidden * (original_mean / hidden.mean(dim=(1, 2), keepdim=True))
    # CLIPTextModelWithProjection answers its projected pooled output first (2-D), as
    # diffusers' encode_prompt picks it.
    pooled = output[0][:1] if output[0].ndim == 2 else None
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


def _one_plain_chunk(tokenizers: Sequence[Any], pieces: Pieces) -> str | None:
    """The text of `pieces` when every tokenizer lays it in one chunk at weight 1 (what
    diffusers' encode_prompt encodes alike), else None."""
    if len(pieces) != 1 or pieces[0][1] != 1.0:
        return None
    text = pieces[0][0]
    for tokenizer in tokenizers:
        chunks = chunk_prompt(tokenizer, pieces)
        if len(chunks) != 1:
            return None
    return text


@dataclass(frozen=True)
class _Encoded:
    embeds: torch.Tensor
    pooled: torch.Tensor


def _encode(
    encoders: Sequence[tuple[Any, Any]], pieces: Pieces, count: int | None = None
) -> tuple[list[Chunks], int]:
    """Each (tokenizer, text encoder)'s chunks of `pieces`, all padded to the same count
    (at least `count`)."""
    per_tokenizer = [chunk_prompt(tokenizer, pieces) for tokenizer, _ in encoders]
    most = max([len(chunks) for chunks in per_tokenizer] + [count or 0])
    return [
        padded(chunks, tokenizer, most)
        for chunks, (tokenizer, _) in zip(per_tokenizer, encoders, strict=True)
    ], most


def _embed(encoders: Sequence[tuple[Any, Any]], chunked: Sequence[Chunks]) -> _Encoded:
    """The encoders' weighted features side by side, and the last encoder's pooled."""
    features = []
    pooled: torch.Tensor | None = None
    for (_, text_encoder), chunks in zip(encoders, chunked, strict=True):
        embeds, encoder_pooled = encode_chunks(text_encoder, chunks)
        features.append(embeds)
        pooled = encoder_pooled if encoder_pooled is not None else pooled
    assert pooled is not None, "SDXL's text_encoder_2 gives the pooled embedding"
    return _Encoded(torch.cat(features, dim=-1), pooled)


def _per_image(tensor: torch.Tensor, images: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """One copy per image, in encode_prompt's dtype and device."""
    tensor = tensor.to(dtype=dtype, device=device)
    return tensor.repeat_interleave(images, dim=0)


def base_encoding(
    pipelines: Pipelines, request: GenerationParams, guidance: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The Base's (prompt, negative, pooled, negative pooled) embeddings of `request`, one
    per image, as encode_prompt answers them (negatives None without `guidance`)."""
    base = pipelines.base
    device = torch.device(pipelines.device)
    encoders = [(base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)]
    tokenizers = [tokenizer for tokenizer, _ in encoders]
    pieces = parse_prompt(request.prompt, request.prompt_syntax)
    negative_pieces = parse_prompt(request.negative_prompt, request.prompt_syntax)
    # SDXL's Base is meant to see zeros for an empty negative prompt
    # (force_zeros_for_empty_prompt); diffusers applies that only to None.
    zeros = not request.negative_prompt and bool(base.config["force_zeros_for_empty_prompt"])
    text = _one_plain_chunk(tokenizers, pieces)
    negative_text = "" if zeros else _one_plain_chunk(tokenizers, negative_pieces)
    if text is not None and negative_text is not None:
        # None asks diffusers for the zeros; a negative prompt that reads as empty text
        # ("()") is encoded, as today's literal "()" was.
        return _diffusers_base_encoding(
            base, text, None if zeros else negative_text, request, guidance, device
        )
    negative_count = 0
    if guidance and not zeros:
        negative_count = max(len(chunk_prompt(t, negative_pieces)) for t in tokenizers)
    chunked, count = _encode(encoders, pieces, negative_count)
    encoded = _embed(encoders, chunked)
    dtype = base.text_encoder_2.dtype
    embeds = _per_image(encoded.embeds, request.num_images, dtype, device)
    pooled = _per_image(encoded.pooled, request.num_images, dtype, device)
    if not guidance:
        return embeds, None, pooled, None
    if zeros:
        return embeds, torch.zeros_like(embeds), pooled, torch.zeros_like(pooled)
    negative_chunked, _ = _encode(encoders, negative_pieces, count)
    negative = _embed(encoders, negative_chunked)
    return (
        embeds,
        _per_image(negative.embeds, request.num_images, dtype, device),
        pooled,
        _per_image(negative.pooled, request.num_images, dtype, device),
    )


def _diffusers_base_encoding(
    base: StableDiffusionXLPipeline,
    text: str,
    negative_text: str | None,
    request: GenerationParams,
    guidance: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    encoded: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None] = (
        base.encode_prompt(
            text,
            device=device,
            num_images_per_prompt=request.num_images,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_text,
        )
    )
    return encoded


def refiner_encoding(
    refiner: StableDiffusionXLImg2ImgPipeline, request: GenerationParams, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Refiner's (prompt, pooled) embeddings of `request`, one per image: its
    text_encoder_2 alone (1280 features), chunked and weighted as the Base's, without a
    negative prompt (the Refiner runs without classifier-free guidance)."""
    encoders = [(refiner.tokenizer_2, refiner.text_encoder_2)]
    pieces = parse_prompt(request.prompt, request.prompt_syntax)
    text = _one_plain_chunk([refiner.tokenizer_2], pieces)
    if text is not None:
        embeds, _, pooled, _ = refiner.encode_prompt(
            text,
            device=torch.device(device),
            num_images_per_prompt=request.num_images,
            do_classifier_free_guidance=False,
        )
        return embeds, pooled
    chunked, _ = _encode(encoders, pieces)
    encoded = _embed(encoders, chunked)
    dtype = refiner.text_encoder_2.dtype
    return (
        _per_image(encoded.embeds, request.num_images, dtype, torch.device(device)),
        _per_image(encoded.pooled, request.num_images, dtype, torch.device(device)),
    )
