"""Masks made automatically (sdxl_engine.masking): faces found by OpenCV's bundled cascade
in a real photo that ships with scikit-image, nothing in textures; the tiny random CLIPSeg
built in its real on-disk format and loaded back through from_pretrained."""

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from sdxl_engine import masking
from sdxl_engine.errors import EngineError

pytestmark = pytest.mark.one_pass

# The astronaut's face as the cascade boxes it (x, y, width, height), measured: (177, 67,
# 93, 93); its centre, in (row, column).
FACE_CENTRE = (113, 223)


def _textures() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "brick": data.brick(),
        "gravel": data.gravel(),
        "noise": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "gradient": np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1)),
    }


def test_the_face_detector_finds_the_astronauts_face_and_nothing_in_textures():
    found = masking.face_mask(Image.fromarray(data.astronaut()))

    assert found.faces == 1
    assert found.mask is not None and found.mask.mode == "L"
    mask = np.asarray(found.mask)
    assert mask.shape == (512, 512)
    assert mask[FACE_CENTRE] == 255
    assert [mask[0, 0], mask[0, -1], mask[-1, 0], mask[-1, -1]] == [0, 0, 0, 0]
    # The face and its hair, not the photo: 5.3% of the pixels are over half white.
    assert 0.03 < (mask > 127).mean() < 0.1
    for name, texture in _textures().items():
        assert masking.face_mask(Image.fromarray(texture)) == masking.FaceMask(0, None), name


def test_a_face_mask_lies_over_a_photo_stored_on_its_side_as_it_is_seen():
    upright = Image.fromarray(data.astronaut())
    on_its_side = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view", as a phone held upright writes
    stored = io.BytesIO()
    on_its_side.save(stored, format="PNG", exif=exif)

    found = masking.face_mask(Image.open(stored))

    assert found.faces == 1 and found.mask is not None
    expected = masking.face_mask(upright).mask
    assert expected is not None
    # Upright, as the photo is shown and trains (caching turns it upright by its EXIF).
    assert found.mask.size == upright.size
    assert found.mask.tobytes() == expected.tobytes()


def test_the_tiny_segmenter_is_built_once_reloads_and_masks_an_image_of_its_size(
    model_cache_dir,
):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    folder = masking.subject_mask_model("", "tiny", model_cache_dir)

    assert folder == str(model_cache_dir / masking.TINY_SEGMENTER_FOLDER)
    model = CLIPSegForImageSegmentation.from_pretrained(folder)
    processor = CLIPSegProcessor.from_pretrained(folder)
    assert model.config.vision_config.image_size == 64
    assert processor.tokenizer("a person")["input_ids"][0] == processor.tokenizer.bos_token_id
    built = (model_cache_dir / masking.TINY_SEGMENTER_FOLDER / "config.json").stat().st_mtime_ns
    assert masking.subject_mask_model("", "auto", model_cache_dir) == folder  # no CUDA here
    assert (
        model_cache_dir / masking.TINY_SEGMENTER_FOLDER / "config.json"
    ).stat().st_mtime_ns == built

    noise = np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    mask = masking.subject_mask(folder, Image.fromarray(noise), "a person")

    assert mask is not None  # random weights: noise, but some of it over the threshold
    assert (mask.mode, mask.size) == ("L", (80, 48))


def test_subject_masks_name_the_setting_without_a_model_and_take_the_one_configured(tmp_path):
    with pytest.raises(EngineError, match="SDXL_SUBJECT_MASK_MODEL"):
        masking.subject_mask_model("", "hub", tmp_path)
    with pytest.raises(EngineError, match="SDXL_SUBJECT_MASK_MODEL"):
        masking.subject_mask_model("", "sdxl-random", tmp_path)
    assert masking.subject_mask_model(" CIDAS/clipseg-rd64-refined ", "hub", tmp_path) == (
        "CIDAS/clipseg-rd64-refined"
    )
    assert list(tmp_path.iterdir()) == []  # nothing built for those
