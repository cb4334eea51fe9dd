"""The face detail pass: faces found by OpenCV's bundled cascade in a real photo that ships
with scikit-image (and none in noise, what the tiny model makes), redone on the tiny model
only near the face, everything else exactly as it was."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cv2.data import haarcascades
from PIL import Image
from skimage import data

from sdxl_engine import faces
from sdxl_engine.errors import GenerationCancelled
from sdxl_engine.generation.faces import redo_faces
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.generation.render import Progress, render_batch
from sdxl_engine.image_output import infotext
from sdxl_engine.parameters import (
    DEFAULT_FACE_PADDING,
    DEFAULT_FACE_STRENGTH,
    FACE_DETAIL_MODEL,
    FaceDetail,
    GenerationParams,
    img2img_steps,
)
from tests.engine.test_image_output import TWO_LORAS, make_record

SIDE = 256
# The astronaut's face in the 512-pixel photo, by eye: eyebrows to chin, ear to ear.
FACE_AREA_512 = (170, 60, 240, 140)


def astronaut(side: int = SIDE) -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.LANCZOS)


def noise(side: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def overlap(first: faces.Box, second: faces.Box) -> int:
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    return max(0, width) * max(0, height)


def area(box: faces.Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def test_the_astronauts_face_is_found_and_noise_has_none():
    [face] = faces.find_faces(Image.fromarray(data.astronaut()), max_faces=4)
    # The whole face (forehead to chin) holds the area seen by eye, and is not much more.
    assert overlap(face, FACE_AREA_512) == area(FACE_AREA_512)
    assert area(face) < 4 * area(FACE_AREA_512)
    [small] = faces.find_faces(astronaut(), max_faces=4)
    assert overlap(small, tuple(side // 2 for side in FACE_AREA_512)) > 0
    for side in (64, 256, 1024):
        assert faces.find_faces(noise(side), max_faces=4) == [], side


def test_a_face_region_is_a_square_inside_the_image_holding_the_feathered_mask():
    [face] = faces.find_faces(astronaut(), max_faces=1)
    region = faces.face_region((SIDE, SIDE), face, padding=8)
    left, top, right, bottom = region.crop
    assert right - left == bottom - top and 0 <= left and 0 <= top
    assert right <= SIDE and bottom <= SIDE
    mask = np.asarray(region.mask)
    rows, columns = np.nonzero(mask)
    # The mask lies within the crop, 8 pixels of padding inside it where the image allows.
    assert left <= columns.min() - 8 and columns.max() + 8 < right
    assert rows.max() + 8 < bottom and top <= rows.min()
    centre = ((face[1] + face[3]) // 2, (face[0] + face[2]) // 2)
    assert mask[centre] == 255
    # Feathered: values between 0 and 255 at the edge.
    assert ((mask > 0) & (mask < 255)).sum() > 100
    # Near the image's edge the square moves inside it.
    edge = faces.face_region((SIDE, SIDE), (0, 0, 40, 30), padding=32)
    assert edge.crop[:2] == (0, 0) and edge.crop[2] == edge.crop[3]


def _request(**face: object) -> GenerationParams:
    return GenerationParams(
        prompt="a portrait",
        steps=5,
        seed=3,
        width=SIDE,
        height=SIDE,
        face_detail=FaceDetail(**face),  # type: ignore[arg-type]
    )


def test_the_pass_changes_the_astronauts_face_and_nothing_away_from_it(pipelines: Pipelines):
    photo = astronaut()
    request = _request(strength=0.6)
    seen: list[tuple[int, int]] = []
    progress = Progress(lambda done, total: seen.append((done, total)), total=0)

    [[redone]], counts = redo_faces(pipelines, [request], [[photo]], progress=progress)

    assert counts == [[1]]
    [face] = faces.find_faces(photo, max_faces=1)
    region = faces.face_region(photo.size, face, DEFAULT_FACE_PADDING)
    before, after = np.asarray(photo).astype(int), np.asarray(redone).astype(int)
    outside = np.ones((SIDE, SIDE), dtype=bool)
    left, top, right, bottom = region.crop
    outside[top:bottom, left:right] = False
    assert outside.sum() > SIDE * SIDE // 4
    assert np.array_equal(before[outside], after[outside])
    # Where the mask is 0 inside the crop too (the padding), and on the face a clear change
    # (the tiny model redoes it as noise).
    unmasked = np.asarray(region.mask) == 0
    assert np.array_equal(before[unmasked], after[unmasked])
    face_box = np.s_[face[1] : face[3], face[0] : face[2]]
    assert np.abs(before[face_box] - after[face_box]).mean() > 20
    # The face's img2img steps (5 x 0.6 = 3) counted on the grown total.
    assert img2img_steps(5, 0.6) == 3
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_no_face_leaves_the_image_as_it_was(pipelines: Pipelines):
    image = noise(SIDE)
    progress = Progress(None, total=5)
    [[same]], counts = redo_faces(pipelines, [_request()], [[image]], progress=progress)
    assert counts == [[0]] and same is image
    assert same.tobytes() == noise(SIDE).tobytes()
    assert progress.total == 5


def test_without_face_detail_nothing_runs(pipelines: Pipelines):
    photo = astronaut()
    request = GenerationParams(prompt="a portrait", steps=5, seed=3, width=SIDE, height=SIDE)
    images, counts = redo_faces(pipelines, [request], [[photo]], progress=Progress(None, 5))
    assert counts == [None] and images[0][0] is photo


def two_astronauts() -> Image.Image:
    canvas = Image.new("RGB", (SIDE + 160, SIDE), "gray")
    canvas.paste(astronaut(), (0, 0))
    canvas.paste(astronaut(160), (SIDE, 0))
    return canvas


def test_max_faces_keeps_the_largest_faces(pipelines: Pipelines):
    # Two astronauts side by side, the second smaller.
    canvas = two_astronauts()
    both = faces.find_faces(canvas, max_faces=4)
    assert len(both) == 2 and area(both[0]) > 2 * area(both[1])
    assert both[0][2] <= SIDE < both[1][0]
    [largest] = faces.find_faces(canvas, max_faces=1)
    assert largest == both[0]

    request = GenerationParams(
        prompt="a portrait", steps=5, seed=3, face_detail=FaceDetail(max_faces=1)
    )
    [[redone]], counts = redo_faces(pipelines, [request], [[canvas]], progress=Progress(None, 0))
    assert counts == [[1]]
    before, after = np.asarray(canvas).astype(int), np.asarray(redone).astype(int)
    small = np.s_[both[1][1] : both[1][3], both[1][0] : both[1][2]]
    assert np.array_equal(before[small], after[small])
    large = np.s_[both[0][1] : both[0][3], both[0][0] : both[0][2]]
    assert np.abs(before[large] - after[large]).mean() > 20


def test_a_cancel_stops_the_pass_between_faces(pipelines: Pipelines):
    seen: list[tuple[int, int]] = []

    def cancel_on_the_second_face(done: int, total: int) -> None:
        seen.append((done, total))
        if done > img2img_steps(5, DEFAULT_FACE_STRENGTH):
            raise GenerationCancelled("nobody wants it")

    with pytest.raises(GenerationCancelled):
        redo_faces(
            pipelines,
            [_request()],
            [[two_astronauts()]],
            progress=Progress(cancel_on_the_second_face, total=0),
        )
    # Two faces of 2 steps each planned; the second face's first step cancelled it.
    assert seen == [(1, 4), (2, 4), (3, 4)]


def test_render_batch_reports_the_faces_redone_and_noise_is_left_alone(pipelines: Pipelines):
    params = {"prompt": "a red cube", "steps": 5, "seed": 11, "height": 64, "width": 64}
    plain = GenerationParams(**params, num_images=2)
    [with_faces] = render_batch(pipelines, [replace(plain, face_detail=FaceDetail())])
    [without] = render_batch(pipelines, [plain])
    assert with_faces.faces_redone == [0, 0] and without.faces_redone is None
    for image, expected in zip(with_faces.images, without.images, strict=True):
        assert image.tobytes() == expected.tobytes()


def test_face_detail_defaults_and_problems_are_adetailers():
    assert FaceDetail() == FaceDetail(strength=0.4, prompt="", padding=32, max_faces=4)
    assert DEFAULT_FACE_STRENGTH == 0.4
    recorded = _request(strength=0.5).record()["face_detail"]
    assert recorded == {"strength": 0.5, "prompt": "", "padding": 32, "max_faces": 4}
    assert GenerationParams(face_detail=recorded).face_detail == FaceDetail(strength=0.5)  # type: ignore[arg-type]
    for bad in ({"strength": 0.0}, {"strength": 1.5}, {"padding": -1}, {"max_faces": 0}):
        assert set(_request(**bad).problems()) == {"face_detail"}, bad
    assert _request().problems() == {}


def test_infotext_writes_adetailers_keys_only_with_face_detail():
    assert "ADetailer" not in infotext(make_record())
    face_detail = {"strength": 0.35, "prompt": "", "padding": 24, "max_faces": 2}
    text = infotext(make_record(loras=TWO_LORAS[:1], face_detail=face_detail))
    assert text.endswith(
        "ADetailer model: haarcascade_frontalface_default.xml, "
        "ADetailer method to decide top k masks: Area, ADetailer mask only top k: 2, "
        "ADetailer dilate erode: 4, ADetailer mask blur: 4, "
        "ADetailer denoising strength: 0.35, ADetailer inpaint only masked: True, "
        'ADetailer inpaint padding: 24, Lora hashes: "lora_3: abcdef012345"'
    )
    own_prompt = infotext(make_record(face_detail={**face_detail, "prompt": "a smiling face, 8k"}))
    assert ', ADetailer prompt: "a smiling face, 8k", ADetailer method' in own_prompt
    # The model named is the file the detector loads.
    assert FACE_DETAIL_MODEL == faces.FACE_CASCADE
    assert (Path(haarcascades) / FACE_DETAIL_MODEL).is_file()
