"""render_batch: the first pass is generate_batch's, the later passes follow it in order,
progress counts on across passes, and no pass compiles inside a request."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

import sdxl_engine.generation.faces
from sdxl_engine.generation import generate
from sdxl_engine.generation.batch import native_side
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.generation.render import Progress, render_batch
from sdxl_engine.parameters import FaceDetail, GenerationParams, HiresFix


def test_a_request_without_later_passes_is_generate_batchs(pipelines: Pipelines) -> None:
    params = {"prompt": "a red cube", "steps": 5, "seed": 11, "height": 64, "width": 64}
    steps_seen: list[tuple[int, int]] = []
    [rendered] = render_batch(
        pipelines,
        [GenerationParams(**params)],
        on_step=lambda done, total: steps_seen.append((done, total)),
    )
    [expected] = generate(pipelines, **params)
    assert np.array_equal(np.asarray(rendered.images[0]), np.asarray(expected))
    assert rendered.faces_redone is None
    # Base and Refiner together, as generate_batch reports them.
    assert steps_seen == [(done, 5) for done in range(1, 6)]


def test_progress_counts_on_across_passes_and_grows_its_total() -> None:
    seen: list[tuple[int, int]] = []
    progress = Progress(lambda done, total: seen.append((done, total)), total=4)
    first = progress.pass_reporter()
    for done in range(1, 5):
        first(done, 4)
    progress.add(3)
    second = progress.pass_reporter()
    for done in range(1, 4):
        second(done, 3)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4), (5, 7), (6, 7), (7, 7)]


def test_progress_never_reports_more_done_than_total() -> None:
    seen: list[tuple[int, int]] = []
    progress = Progress(lambda done, total: seen.append((done, total)), total=2)
    reporter = progress.pass_reporter()
    for done in range(1, 4):
        reporter(done, 2)
    assert seen == [(1, 2), (2, 2), (3, 3)]


def _face_in_the_middle(image, max_faces):
    """A stand-in detector: the tiny model draws noise, where a real one finds no face."""
    side = min(image.size)
    return [(side // 4, side // 4, side // 2, side // 2)][:max_faces]


def test_every_pass_in_order_hires_then_faces(pipelines: Pipelines, monkeypatch) -> None:
    monkeypatch.setattr(sdxl_engine.generation.faces, "find_faces", _face_in_the_middle)
    plain = {"prompt": "a red cube", "steps": 6, "seed": 4, "height": 64, "width": 64}
    hires = HiresFix(scale=2.0, upscaler="latent", denoising_strength=0.5)
    face_detail = FaceDetail(strength=0.5, padding=8)
    steps_seen: list[tuple[int, int]] = []

    [hires_only] = render_batch(pipelines, [GenerationParams(**plain, hires=hires)])
    [both] = render_batch(
        pipelines,
        [GenerationParams(**plain, hires=hires, face_detail=face_detail)],
        on_step=lambda done, total: steps_seen.append((done, total)),
    )

    assert both.images[0].size == hires_only.images[0].size == (128, 128)
    assert both.faces_redone == [1] and hires_only.faces_redone is None
    changed = np.abs(_pixels(both.images[0]) - _pixels(hires_only.images[0])).max(axis=2) > 0
    assert changed[40:64, 40:64].mean() > 0.9  # the face's middle, redone
    # Away from the face (and its feathered edge): as the hires pass left it.
    assert not changed[:12].any() and not changed[88:].any() and not changed[:, 88:].any()
    # First pass 6, hires 3 (6 x 0.5), the face 3 (6 x 0.5): the total grows once found.
    assert steps_seen[-1] == (12, 12)
    assert [done for done, _ in steps_seen] == list(range(1, 13))


def test_compiled_pipelines_run_every_pass_without_compiling(
    pipelines: Pipelines, compiled_pipelines: Pipelines, monkeypatch
) -> None:
    """Hires (a larger shape), only-masked inpainting and the face pass (both at the native
    size) on the worker's compiled pipelines: no compile inside a request (on a GPU the new
    shapes replay CUDA graphs of the eager UNets, graphs.UNetGraphs), the eager images."""
    monkeypatch.setattr(sdxl_engine.generation.faces, "find_faces", _face_in_the_middle)
    native = native_side(pipelines)
    mask = np.zeros((native, native), np.uint8)
    mask[8:24, 8:24] = 255
    requests = [
        GenerationParams(prompt="a cube", steps=5, seed=1, hires=HiresFix(scale=1.5)),
        GenerationParams(
            prompt="a cube",
            steps=5,
            seed=2,
            init_image=_png(np.full((native, native, 3), 120, np.uint8)),
            mask=_png(mask),
            inpaint_area="masked",
        ).filled(),
        GenerationParams(prompt="a cube", steps=5, seed=3, face_detail=FaceDetail()),
    ]
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    compiled = [render_batch(compiled_pipelines, [request])[0] for request in requests]

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
    for request, result in zip(requests, compiled, strict=True):
        [eager] = render_batch(pipelines, [request])
        assert np.abs(_pixels(result.images[0]) - _pixels(eager.images[0])).max() <= 2


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
