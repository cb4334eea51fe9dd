"""sdxl_engine.image_output: AUTOMATIC1111's infotext, and the files that carry it.

Fast: small PIL images, no models. The EXIF is read back the way A1111's
modules/images.py `read_info_from_image` reads it: piexif.load, then
piexif.helper.UserComment.load of the Exif IFD's UserComment.
"""

from __future__ import annotations

import hashlib
import io
import json
import re

import piexif
import piexif.helper
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdxl_engine.image_output import (
    FILE_EXTENSIONS,
    MEDIA_TYPES,
    encode_image,
    infotext,
    lora_short_hash,
    read_infotext,
    read_record,
)
from sdxl_engine.parameters import DEFAULT_QUALITY, OUTPUT_FORMATS, output_problems, problems_text
from tests.helpers import hostile_lora

BASE = "stabilityai/stable-diffusion-xl-base-1.0"
REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"


def make_record(**changes) -> dict:
    record = {
        "prompt": "a red fox in the snow",
        "negative_prompt": "",
        "seed": 123,
        "steps": 30,
        "guidance_scale": 7.5,
        "width": 1024,
        "height": 1024,
        "scheduler": None,
        "model": BASE,
        "refiner": None,
        "refiner_switch_at": None,
        "strength": None,
        "loras": [],
        "num_images": 1,
    }
    return record | changes


TWO_LORAS = [
    {
        "name": "lora_3",
        "filename": "lora_3.safetensors",
        "sha256": "f" * 64,
        "short_hash": "abcdef012345",
        "scale": 0.8,
    },
    {
        "name": "mine",
        "filename": "mine.safetensors",
        "sha256": "e" * 64,
        "short_hash": "0123456789ab",
        "scale": -0.5,
    },
]


def test_infotext_without_lora_or_scheduler():
    assert infotext(make_record()) == (
        "a red fox in the snow\n"
        f"Steps: 30, CFG scale: 7.5, Seed: 123, Size: 1024x1024, Model: {BASE}"
    )


def test_infotext_with_two_loras_refiner_and_sampler():
    record = make_record(
        negative_prompt="blurry",
        scheduler="dpmpp_2m_karras",
        guidance_scale=7.0,
        refiner=REFINER,
        refiner_switch_at=0.8,
        loras=TWO_LORAS,
    )
    assert infotext(record) == (
        "a red fox in the snow <lora:lora_3:0.8> <lora:mine:-0.5>\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 1024x1024, "
        f'Model: {BASE}, Lora hashes: "lora_3: abcdef012345, mine: 0123456789ab", '
        f"Refiner: {REFINER}, Refiner switch at: 0.8"
    )


def test_infotext_lora_name_is_the_file_name_and_unhashed_loras_stay_out_of_hashes():
    loras = [
        {"filename": "style v2.safetensors", "short_hash": "", "scale": 1.0},
        {"filename": "a:b,c.safetensors", "short_hash": "00aa11bb22cc", "scale": 1},
    ]
    text = infotext(make_record(prompt="", loras=loras))
    assert text == (
        "<lora:style v2:1> <lora:a:b,c:1>\n"
        f"Steps: 30, CFG scale: 7.5, Seed: 123, Size: 1024x1024, Model: {BASE}, "
        'Lora hashes: "abc: 00aa11bb22cc"'
    )


def test_infotext_writes_prompts_as_they_are_and_quotes_values_with_separators():
    record = make_record(
        prompt='a "fox", 8k: sharp\nsecond line',
        negative_prompt='blurry, low: "quality"\nwatermark',
        model='C:\\models\\my "xl", v2',
        scheduler="euler_a",
    )
    assert infotext(record) == (
        'a "fox", 8k: sharp\nsecond line\n'
        'Negative prompt: blurry, low: "quality"\nwatermark\n'
        "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 1024x1024, "
        'Model: "C:\\\\models\\\\my \\"xl\\", v2"'
    )


def test_infotext_img2img_writes_denoising_strength_after_the_model():
    record = make_record(strength=0.6, refiner=REFINER, refiner_switch_at=0.75)
    assert infotext(record) == (
        "a red fox in the snow\n"
        f"Steps: 30, CFG scale: 7.5, Seed: 123, Size: 1024x1024, Model: {BASE}, "
        f"Denoising strength: 0.6, Refiner: {REFINER}, Refiner switch at: 0.75"
    )


def test_infotext_hires_fix_as_a1111_writes_it():
    hires = {"scale": 1.5, "upscaler": "latent", "steps": 12, "denoising_strength": 0.7}
    record = make_record(hires=hires, loras=TWO_LORAS[:1], refiner=REFINER, refiner_switch_at=0.8)
    assert infotext(record) == (
        "a red fox in the snow <lora:lora_3:0.8>\n"
        f"Steps: 30, CFG scale: 7.5, Seed: 123, Size: 1024x1024, Model: {BASE}, "
        "Denoising strength: 0.7, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent, "
        f'Lora hashes: "lora_3: abcdef012345", Refiner: {REFINER}, Refiner switch at: 0.8'
    )
    # The second pass's steps left to the request's: no "Hires steps", as A1111's 0.
    lanczos = {**hires, "scale": 2.0, "upscaler": "lanczos", "steps": None}
    assert infotext(make_record(hires=lanczos)).endswith(
        f"Model: {BASE}, Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Lanczos"
    )


def test_infotext_without_refiner_has_no_refiner_keys():
    text = infotext(make_record(refiner=None, refiner_switch_at=None, strength=1.0))
    assert "Refiner" not in text
    assert text.endswith(f"Model: {BASE}, Denoising strength: 1")


def test_infotext_numbers_as_a1111_writes_them():
    text = infotext(make_record(guidance_scale=5.0, seed=4294967295, strength=0.35))
    assert "CFG scale: 5, Seed: 4294967295," in text
    assert text.endswith("Denoising strength: 0.35")


def test_infotext_strips_surrounding_whitespace_like_a1111():
    assert infotext(make_record(prompt="  fox  ")).startswith("fox  \nSteps: 30,")


def _a1111_prompts(text: str) -> tuple[str, str, str]:
    """(prompt, negative prompt, parameters line) of an infotext, split as A1111's
    parse_generation_parameters (modules/infotext_utils.py) splits them: the last line is
    the parameters when it has 3 key: value pairs, the lines before "Negative prompt:"
    the prompt, those from it the negative prompt."""
    *lines, last = text.strip().split("\n")
    if len(re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), last


@pytest.mark.parametrize("syntax", [None, "a1111", "plain"])
def test_a_weighted_prompt_reads_back_in_a1111_as_it_was_given(syntax):
    prompt = "((sks person:1.2)), [blurry] BREAK \\(literal\\), 8k: sharp"
    negative = "(worst quality:1.4), [[lowres]]\nwatermark"
    record = make_record(prompt=prompt, negative_prompt=negative, prompt_syntax=syntax)
    text = read_infotext(encode_image(image(), record))
    assert text is not None
    read_prompt, read_negative, parameters = _a1111_prompts(text)
    assert (read_prompt, read_negative) == (prompt, negative)
    # A1111 reads weighted prompts under its default emphasis unless told "None".
    assert ("Emphasis: None" in parameters) == (syntax == "plain")
    plain_words = make_record(prompt="a fox", prompt_syntax="plain")
    assert "Emphasis" not in infotext(plain_words)


def image() -> Image.Image:
    # Noise, so the compressed size depends on the quality.
    return Image.frombytes("RGB", (64, 48), bytes(range(256)) * 36)


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_round_trip(output_format):
    record = make_record(
        prompt="café, «renard»: 狐\nline two",
        negative_prompt="blurry",
        scheduler="euler",
        refiner=REFINER,
        refiner_switch_at=0.8,
        loras=TWO_LORAS,
    )
    data = encode_image(image(), record, output_format)
    assert read_infotext(data) == infotext(record)
    assert read_record(data) == record
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format]
        assert opened.size == (64, 48)


def test_png_text_chunks():
    record = make_record(loras=TWO_LORAS)
    with Image.open(io.BytesIO(encode_image(image(), record))) as opened:
        assert opened.info["parameters"] == infotext(record)
        assert opened.info["sdxl_service"] == json.dumps(record, sort_keys=True)


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_exif_user_comment_as_a1111_reads_it(output_format):
    record = make_record(prompt="zürich, 夜: neon", loras=TWO_LORAS, strength=0.5)
    data = encode_image(image(), record, output_format)
    with Image.open(io.BytesIO(data)) as opened:
        exif = piexif.load(opened.info["exif"])
    comment = exif["Exif"][piexif.ExifIFD.UserComment]
    assert isinstance(comment, bytes)  # UNDEFINED; a BYTE tag would load as a tuple
    assert comment.startswith(b"UNICODE\x00")
    assert comment == piexif.helper.UserComment.dump(infotext(record), encoding="unicode")
    assert piexif.helper.UserComment.load(comment) == infotext(record)
    description = exif["0th"][piexif.ImageIFD.ImageDescription]
    assert json.loads(description) == record


def test_rgba_loses_alpha_for_jpeg_and_webp_keeps_it_for_png():
    rgba = Image.new("RGBA", (16, 16), (10, 20, 30, 128))
    for output_format, mode in [("png", "RGBA"), ("jpeg", "RGB"), ("webp", "RGB")]:
        with Image.open(io.BytesIO(encode_image(rgba, make_record(), output_format))) as opened:
            assert opened.mode == mode


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_quality_changes_the_size(output_format):
    sizes = [
        len(encode_image(image(), make_record(), output_format, quality)) for quality in (10, 95)
    ]
    assert sizes[0] < sizes[1]
    default = encode_image(image(), make_record(), output_format)
    assert default == encode_image(image(), make_record(), output_format, DEFAULT_QUALITY)


def quality_problem(output_format: str, quality: object) -> str | None:
    return problems_text(output_problems(output_format, quality)) or None


def test_quality_problem():
    assert DEFAULT_QUALITY == 80
    assert quality_problem("png", None) is None
    assert quality_problem("jpeg", None) is None
    assert quality_problem("jpeg", 1) is None
    assert quality_problem("webp", 100) is None
    assert quality_problem("png", 90) == "quality applies only to jpeg and webp, not png"
    for bad in (0, 101, 50.0, True, "80"):
        assert quality_problem("jpeg", bad) == "quality must be an integer from 1 to 100"
    assert quality_problem("gif", None) == "output_format must be one of: png, jpeg, webp"


def test_encode_image_refuses_what_quality_problem_refuses():
    with pytest.raises(ValueError, match="quality applies only"):
        encode_image(image(), make_record(), "png", 90)
    with pytest.raises(ValueError, match="output_format"):
        encode_image(image(), make_record(), "bmp")


def test_format_maps():
    assert OUTPUT_FORMATS == ("png", "jpeg", "webp")
    assert MEDIA_TYPES == {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
    assert FILE_EXTENSIONS == {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def test_read_infotext_of_an_image_without_parameters():
    buffer = io.BytesIO()
    image().save(buffer, format="PNG")
    assert read_infotext(buffer.getvalue()) is None
    assert read_record(buffer.getvalue()) is None


def addnet_hash(path) -> str:
    """kohya-ss' addnet hash, computed here independently: sha256 of what follows the
    8-byte little-endian header length and the header."""
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length :]).hexdigest()


def test_lora_short_hash_is_the_addnet_hash(tmp_path):
    path = tmp_path / "lora_3.safetensors"
    tensors = {"lora_unet_down.lora_down.weight": torch.arange(12.0).reshape(3, 4)}
    save_file(tensors, str(path), metadata={"ss_network_dim": "4"})
    short = lora_short_hash(path)
    assert short == addnet_hash(path)[:12]
    assert short != hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    # Other metadata, same tensors: the same hash.
    other = tmp_path / "renamed.safetensors"
    save_file(tensors, str(other), metadata={"ss_network_dim": "4", "note": "x"})
    assert lora_short_hash(other) == short


def test_lora_short_hash_takes_sshs_model_hash_first_as_a1111_does(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"sshs_model_hash": "9" * 64})
    assert lora_short_hash(path) == "9" * 12


def test_lora_short_hash_of_a_header_nested_too_deeply_is_the_addnet_hash(tmp_path):
    path = tmp_path / "nested.safetensors"
    path.write_bytes(hostile_lora("a header of 200,000 nested ["))
    assert lora_short_hash(path) == addnet_hash(path)[:12]


def test_infotext_lora_name_given_by_the_record_wins_over_the_file_name():
    loras = [{"name": "lora_1_s4", "filename": "lora_1.safetensors", "short_hash": "00aa11bb22cc"}]
    text = infotext(make_record(prompt="a", loras=[{**loras[0], "scale": 0.5}]))
    assert text.startswith("a <lora:lora_1_s4:0.5>\n")
    assert text.endswith('Lora hashes: "lora_1_s4: 00aa11bb22cc"')
