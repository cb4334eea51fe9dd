"""Generated images as files, their parameters written where AUTOMATIC1111 writes them.

The text is A1111's "infotext" (stable-diffusion-webui 1.10), which its PNG Info tab,
ComfyUI, InvokeAI and image sites read back:

    a cat <lora:lora_3:0.8> <lora:mine:-0.5>
    Negative prompt: blurry
    Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 1024x1024, Model: ...,
    Lora hashes: "lora_3: abcdef012345, mine: 0123456789ab", Refiner: ..., Refiner switch at: 0.8

(the last line is one line). Layout, as A1111 builds it (modules/processing.py,
`create_infotext`):

- the prompt, then "Negative prompt: ..." only when there is one, then the "Key: value"
  pairs joined by ", "; the whole text stripped of surrounding whitespace. Prompts are
  written as they are, newlines included: the reader (modules/infotext_utils.py,
  `parse_generation_parameters`) takes every line before "Negative prompt:" as the prompt
  and only the last line as the pairs.
- A value holding ",", ":" or a newline is written as a JSON string (infotext_utils.py,
  `quote`, with non-ASCII kept); any other value as it is.
- Key order: A1111's fixed keys first (Steps, Sampler, CFG scale, Seed, Size, Model,
  Denoising strength), then its `extra_generation_params` in the order they were set
  during the run: the hires fix's "Hires upscale", "Hires steps" and "Hires upscaler"
  as its txt2img starts (modules/processing.py, StableDiffusionProcessingTxt2Img.init),
  "Lora hashes" when the networks activate, before sampling
  (extensions-builtin/Lora/extra_networks_lora.py), "Refiner" and "Refiner switch at"
  when the Refiner takes over during sampling (modules/sd_samplers_common.py,
  `apply_refiner`). So "Lora hashes" comes before the Refiner keys.
- LoRAs live in the prompt as `<lora:NAME:MULTIPLIER>` (A1111's extra-network syntax).
  "Lora hashes" maps each NAME (":" and "," removed) to its short hash, the first 12
  hex digits of the file's hash (network.py, `set_hash`); for a safetensors file that is
  the "addnet" hash, sha256 of the bytes after the header (modules/hashes.py,
  `addnet_hash_safetensors`), unless the file's metadata carries `sshs_model_hash`,
  which A1111 takes first (network.py, `NetworkOnDisk.__init__`). On paste A1111's Lora
  script (`infotext_pasted`) looks each hash up among its own LoRAs and rewrites the
  prompt's `<lora:NAME:` to the name of the file it found: our LoRAs apply by hash even
  when A1111 keeps them under other names.
- Numbers are written as A1111's UI writes the JSON numbers it receives: 7.0 as "7",
  7.5 as "7.5" (the shortest text that reads back as the same float).

JPEG and WebP carry the same text in the EXIF UserComment (tag 0x9286 of the Exif IFD
0x8769), "UNICODE\\0" then UTF-16 big-endian, as A1111 writes it with piexif
(modules/images.py, `save_image_with_geninfo`: `piexif.helper.UserComment.dump(geninfo,
encoding="unicode")`) and reads it back (`read_info_from_image`:
`piexif.helper.UserComment.load`, which always decodes the body as utf_16_be). The
EXIF is written here with `struct`, big-endian ("MM") as piexif writes it, the comment
typed UNDEFINED as piexif types it (Pillow's Image.Exif would type it BYTE, see
`_exif_bytes`), so no EXIF library is needed at runtime; Pillow puts it into the file.
The JSON record for programs goes into the EXIF ImageDescription (0x010E, IFD0),
ASCII-only JSON; PNG keeps it in its `sdxl_service` text chunk.

Quality (JPEG and WebP): A1111's `jpeg_quality` option, default 80, is used for both
formats; its WebP stays lossy unless the separate `webp_lossless` option (default off)
is set. So here: quality 1-100, default 80, WebP always lossy (quality 100 is the best
lossy WebP, not lossless).

Imports only the standard library, Pillow, sdxl_engine.parameters and sdxl_engine.schedulers.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdxl_engine.parameters import (
    DEFAULT_QUALITY,
    FACE_DETAIL_MODEL,
    FACE_DILATE,
    FACE_MASK_BLUR,
    HIRES_UPSCALERS,
    output_problems,
    problems_text,
)
from sdxl_engine.schedulers import SCHEDULERS

# A generation's record as JSON: GenerationParams.record() and what the service adds.
Record = dict[str, Any]
# A TIFF IFD entry: (tag, type, count, value bytes).
_IfdEntry = tuple[int, int, int, bytes]

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FILE_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}

PNG_PARAMETERS_KEY = "parameters"  # A1111's text chunk
PNG_RECORD_KEY = "sdxl_service"  # every field of the record, as JSON

EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
EXIF_IMAGE_DESCRIPTION = 0x010E
# The 8-byte character-code prefixes of a UserComment (EXIF 2.3, Table 9), and the codec
# piexif's UserComment helper decodes each body with.
_USER_COMMENT_CODECS = {
    b"UNICODE\x00": "utf_16_be",
    b"ASCII\x00\x00\x00": "ascii",
    b"JIS\x00\x00\x00\x00\x00": "shift_jis",
}
UNICODE_PREFIX = b"UNICODE\x00"
# A JPEG APP1 segment holds at most 65533 bytes of EXIF (Pillow refuses more).
_JPEG_EXIF_LIMIT = 65533
_SAFETENSORS = ".safetensors"


def lora_short_hash(path: str | Path) -> str:
    """The hash A1111 writes for this LoRA file in "Lora hashes" and looks it up by.

    For a .safetensors file: its metadata's `sshs_model_hash` when it has one (A1111 takes
    that first), else the "addnet" hash (kohya-ss sd-scripts'), sha256 of everything after
    the 8-byte header length and the JSON header, i.e. of the tensor bytes, so that
    rewriting metadata does not change it. Any other file: sha256 of the whole file, as
    A1111 hashes non-safetensors networks. First 12 hex digits either way.
    """
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as file:
        if path.suffix.lower() == _SAFETENSORS:
            header_length = int.from_bytes(file.read(8), "little")
            header = file.read(header_length)
            metadata = _safetensors_metadata(header)
            if metadata.get("sshs_model_hash"):
                return str(metadata["sshs_model_hash"])[:12]
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _safetensors_metadata(header: bytes) -> dict[str, object]:
    try:
        metadata = json.loads(header).get("__metadata__")
    except (ValueError, AttributeError, RecursionError):  # no JSON object it can read
        return {}
    return metadata if isinstance(metadata, dict) else {}


def lora_prompt_name(lora: Record) -> str:
    """The name a LoRA goes by in `<lora:NAME:...>`: its "name" when the record gives one
    (two files of one name in a request), else its file name without .safetensors."""
    name: str = lora.get("name") or lora["filename"].removesuffix(_SAFETENSORS)
    return name


def infotext(record: Record) -> str:
    """The record's parameters as AUTOMATIC1111 1.10 writes them (see the module's doc)."""
    loras = record.get("loras") or []
    prompt = " ".join(
        part
        for part in [
            record["prompt"],
            *(f"<lora:{lora_prompt_name(lora)}:{_number(lora['scale'])}>" for lora in loras),
        ]
        if part
    )
    pairs: dict[str, object] = {"Steps": record["steps"]}
    # Without a scheduler the pipeline's own (Euler) runs; no Sampler is written then,
    # as before, and A1111 keeps whatever sampler its UI holds.
    if record.get("scheduler"):
        pairs["Sampler"] = SCHEDULERS[record["scheduler"]].a1111_name
    pairs["CFG scale"] = record["guidance_scale"]
    pairs["Seed"] = record["seed"]
    outpaint = record.get("outpaint")
    # The image's size: outpainting's grown canvas.
    width = record["width"] + (outpaint["left"] + outpaint["right"] if outpaint else 0)
    height = record["height"] + (outpaint["top"] + outpaint["bottom"] if outpaint else 0)
    pairs["Size"] = f"{width}x{height}"
    pairs["Model"] = record["model"]
    hires = record.get("hires")
    if record.get("strength") is not None:
        pairs["Denoising strength"] = record["strength"]
    elif hires:
        # A1111's txt2img writes the hires pass's strength here (and nothing without one).
        pairs["Denoising strength"] = hires["denoising_strength"]
    # --- hires: A1111 sets these as its txt2img starts (StableDiffusionProcessingTxt2Img
    # .init), before the LoRAs activate: so before "Lora hashes". "Size" stays the first
    # pass's, as A1111 writes p.width x p.height; "Hires steps" only when given.
    if hires:
        pairs["Hires upscale"] = hires["scale"]
        if hires.get("steps"):
            pairs["Hires steps"] = hires["steps"]
        pairs["Hires upscaler"] = HIRES_UPSCALERS.get(hires["upscaler"], hires["upscaler"])
    pairs.update(_inpaint_pairs(record))
    # --- face detail: ADetailer sets its keys before sampling (its before_process), so
    # ahead of "Lora hashes"; only for a request that asked for the pass.
    if record.get("face_detail"):
        pairs.update(_face_detail_pairs(record["face_detail"]))
    hashes = [
        f"{_hash_key(lora_prompt_name(lora))}: {lora['short_hash']}"
        for lora in loras
        if lora.get("short_hash")
    ]
    if hashes:
        pairs["Lora hashes"] = ", ".join(hashes)
    # Without the Refiner A1111 writes no Refiner keys either.
    if record.get("refiner"):
        pairs["Refiner"] = record["refiner"]
        if record.get("refiner_switch_at") is not None:
            pairs["Refiner switch at"] = record["refiner_switch_at"]
    # --- prompts (issue 28)
    # A1111 names its emphasis only when it is not the default "Original" and a prompt has
    # a bracket; "plain" reads prompts as its emphasis "None" does (reading the key back,
    # A1111 switches to it; without it, a prompt with weights reads as "Original").
    prompts = f"{record['prompt']}{record.get('negative_prompt') or ''}"
    if record.get("prompt_syntax") == "plain" and ("(" in prompts or "[" in prompts):
        pairs["Emphasis"] = "None"
    text = ", ".join(
        key if key == value else f"{key}: {_quote(_number(value))}" for key, value in pairs.items()
    )
    negative = record.get("negative_prompt") or ""
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{text}".strip()


# --- Inpainting and outpainting
# A1111's "Masked content" names of inpaint_fill (its img2img radio's labels).
_MASKED_CONTENT = {
    "fill": "fill",
    "original": "original",
    "latent_noise": "latent noise",
    "latent_nothing": "latent nothing",
}


def _inpaint_pairs(record: Record) -> dict[str, object]:
    """A1111's img2img inpaint keys, set in its init before sampling, so before the Lora
    hashes: "Mask blur", "Inpaint area: Only masked" with "Masked area padding" (A1111
    writes no area for the whole picture), "Masked content". Outpainting (no A1111 key:
    its scripts write none) adds "Outpaint": the margins, e.g. "left 0, right 256, top 0,
    bottom 0"."""
    if record.get("mask_blur") is None:
        return {}
    pairs: dict[str, object] = {"Mask blur": record["mask_blur"]}
    if record.get("inpaint_area") == "masked":
        pairs["Inpaint area"] = "Only masked"
        pairs["Masked area padding"] = record.get("inpaint_padding")
    if record.get("inpaint_fill"):
        pairs["Masked content"] = _MASKED_CONTENT[record["inpaint_fill"]]
    outpaint = record.get("outpaint")
    if outpaint:
        pairs["Outpaint"] = ", ".join(
            f"{side} {outpaint[side]}" for side in ("left", "right", "top", "bottom")
        )
    return pairs


# --- face detail
def _face_detail_pairs(face_detail: Record) -> dict[str, object]:
    """The face detail pass as ADetailer writes its first tab's options (adetailer/args.py,
    `ADetailerArgs.extra_params`: its names, in its order, each left out where ADetailer
    leaves it out: the prompt when empty). The model is the OpenCV cascade that found the
    faces; the confidence a Haar cascade does not have is not written. "mask only top k"
    is max_faces, by area as here."""
    pairs: dict[str, object] = {"ADetailer model": FACE_DETAIL_MODEL}
    if face_detail.get("prompt"):
        pairs["ADetailer prompt"] = face_detail["prompt"]
    pairs["ADetailer method to decide top k masks"] = "Area"
    pairs["ADetailer mask only top k"] = face_detail["max_faces"]
    pairs["ADetailer dilate erode"] = FACE_DILATE
    pairs["ADetailer mask blur"] = FACE_MASK_BLUR
    pairs["ADetailer denoising strength"] = face_detail["strength"]
    pairs["ADetailer inpaint only masked"] = True
    pairs["ADetailer inpaint padding"] = face_detail["padding"]
    return pairs


def _hash_key(name: str) -> str:
    # A1111 removes ":" and "," from the names in "Lora hashes", its separators.
    return name.replace(":", "").replace(",", "")


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return repr(value)


def _quote(text: str) -> str:
    if any(separator in text for separator in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def encode_image(
    image: Image.Image,
    record: Record,
    output_format: str = "png",
    quality: int | None = None,
) -> bytes:
    """The image as a PNG, JPEG or WebP file carrying the record's parameters.

    PNG: text chunks `parameters` (the infotext) and `sdxl_service` (the record as JSON).
    JPEG/WebP at `quality` (None: DEFAULT_QUALITY): the infotext in the EXIF UserComment
    as A1111 writes it, the record as ASCII JSON in the EXIF ImageDescription. An RGBA
    image loses its alpha for JPEG/WebP, as in A1111. ValueError for a bad format or
    quality (parameters.output_problems).
    """
    problems = output_problems(output_format, quality)
    if problems:
        raise ValueError(problems_text(problems))
    text = infotext(record)
    record_json = json.dumps(record, sort_keys=True)
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngInfo()
        info.add_text(PNG_PARAMETERS_KEY, text)
        info.add_text(PNG_RECORD_KEY, record_json)
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()

    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    exif = _exif_bytes(text, record_json)
    if output_format == "jpeg" and len(exif) > _JPEG_EXIF_LIMIT:
        # The parameters matter more than the JSON copy of them.
        exif = _exif_bytes(text, None)
        if len(exif) > _JPEG_EXIF_LIMIT:
            raise ValueError("the parameters are too long for a JPEG's EXIF; ask for png")
    quality = DEFAULT_QUALITY if quality is None else quality
    if output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, exif=exif)
    else:
        image.save(buffer, format="WEBP", quality=quality, lossless=False, exif=exif)
    return buffer.getvalue()


def _exif_bytes(text: str, record_json: str | None) -> bytes:
    """An APP1/EXIF-chunk payload: "Exif\\0\\0", then a big-endian TIFF structure (as
    piexif.dump writes it) holding IFD0 [ImageDescription (ASCII), ExifIFD pointer] and
    the Exif IFD [UserComment (UNDEFINED)].

    Written by hand because Pillow's Image.Exif gives a bytes value it has no type for
    (UserComment is one) the type BYTE, not UNDEFINED: piexif then loads it as a tuple
    of ints and A1111's read_info_from_image fails on it.
    """
    comment = UNICODE_PREFIX + text.encode("utf_16_be")
    # The Exif IFD pointer's value is None until the offset is known.
    pending: list[tuple[int, int, int, bytes | None]] = []
    if record_json is not None:
        description = record_json.encode("ascii") + b"\x00"  # json.dumps escapes non-ASCII
        pending.append((EXIF_IMAGE_DESCRIPTION, _TIFF_ASCII, len(description), description))
    pending.append((EXIF_IFD, _TIFF_LONG, 1, None))  # the Exif IFD's offset, known below
    exif_ifd: list[_IfdEntry] = [(EXIF_USER_COMMENT, _TIFF_UNDEFINED, len(comment), comment)]

    ifd0_offset = 8
    ifd0_data_offset = ifd0_offset + _ifd_size(pending)
    exif_ifd_offset = ifd0_data_offset + _data_size(pending)
    exif_data_offset = exif_ifd_offset + _ifd_size(exif_ifd)
    ifd0 = [
        (tag, kind, count, struct.pack(">I", exif_ifd_offset) if value is None else value)
        for tag, kind, count, value in pending
    ]
    tiff = b"MM\x00\x2a" + struct.pack(">I", ifd0_offset)
    tiff += _ifd_bytes(ifd0, ifd0_data_offset)
    tiff += _ifd_bytes(exif_ifd, exif_data_offset)
    return b"Exif\x00\x00" + tiff


_TIFF_ASCII, _TIFF_LONG, _TIFF_UNDEFINED = 2, 4, 7


def _ifd_size(entries: Sequence[object]) -> int:
    return 2 + 12 * len(entries) + 4


def _padded(value: bytes) -> bytes:
    return value + b"\x00" * (len(value) % 2)  # TIFF keeps offsets on word boundaries


def _data_size(entries: Sequence[tuple[int, int, int, bytes | None]]) -> int:
    return sum(len(_padded(value)) for *_, value in entries if value is not None and len(value) > 4)


def _ifd_bytes(entries: Sequence[_IfdEntry], data_offset: int) -> bytes:
    """The IFD (entries in ascending tag order, no next IFD), then the values that do not
    fit in an entry's 4 bytes, starting at data_offset."""
    table = struct.pack(">H", len(entries))
    data = b""
    for tag, kind, count, value in entries:
        if len(value) <= 4:
            field = value.ljust(4, b"\x00")
        else:
            field = struct.pack(">I", data_offset + len(data))
            data += _padded(value)
        table += struct.pack(">HHI", tag, kind, count) + field
    return table + struct.pack(">I", 0) + data


def decode_user_comment(value: bytes) -> str:
    """An EXIF UserComment as A1111 reads it: by its character-code prefix as piexif's
    UserComment.load does, and as UTF-8 (errors ignored) when the prefix is unknown."""
    codec = _USER_COMMENT_CODECS.get(value[:8])
    if codec is None:
        return value.decode("utf8", errors="ignore")
    return value[8:].decode(codec, errors="replace")


def read_infotext(data: bytes) -> str | None:
    """The infotext of an image file's bytes: the PNG `parameters` chunk, else the EXIF
    UserComment (JPEG, WebP); None when it has neither."""
    with Image.open(io.BytesIO(data)) as image:
        text = image.info.get(PNG_PARAMETERS_KEY)
        comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if comment:
        decoded = decode_user_comment(comment) if isinstance(comment, bytes) else str(comment)
        if decoded:
            return decoded
    return text


def read_record(data: bytes) -> Record | None:
    """The JSON record of an image file's bytes (PNG `sdxl_service` chunk, or the EXIF
    ImageDescription of a JPEG/WebP); None when there is none."""
    with Image.open(io.BytesIO(data)) as image:
        raw = image.info.get(PNG_RECORD_KEY) or image.getexif().get(EXIF_IMAGE_DESCRIPTION)
    if not raw:
        return None
    try:
        record: object = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
