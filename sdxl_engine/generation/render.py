"""A request's whole rendering, pass by pass: the first pass (text-to-image, image-to-image
or inpainting, batch.generate_batch), then the passes that rework its images. Each later
pass calls generate_batch again, so the request's LoRAs, scheduler and Refiner policy apply
in every pass, and the on_step callback (progress, cancellation) sees every pass's steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import PIL.Image

from sdxl_engine.generation.batch import generate_batch
from sdxl_engine.generation.faces import redo_faces
from sdxl_engine.generation.hires import hires_fix, hires_steps
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import GenerationParams

StepCallback = Callable[[int, int], None]


@dataclass
class Rendered:
    """One request's result: its images, and per image how many faces the face detail pass
    redid (None when the request asked for no face pass)."""

    images: list[PIL.Image.Image]
    faces_redone: list[int] | None = None


class Progress:
    """Steps counted across passes for one on_step callback: `done` goes on from pass to
    pass, `total` is every planned pass's steps, grown by `add` when a pass learns its
    size late (the face pass, once it has found the faces)."""

    def __init__(self, on_step: StepCallback | None, total: int) -> None:
        self._on_step = on_step
        self.total = total
        self.done = 0

    def add(self, steps: int) -> None:
        self.total += steps

    def pass_reporter(self) -> StepCallback:
        """The on_step of the next pass: its own (done, steps) counted on from the passes
        before it. The pass's steps are its planned share of `total`."""
        start = self.done

        def report(done: int, _steps: int) -> None:
            self.done = start + done
            if self._on_step is not None:
                self._on_step(self.done, max(self.total, self.done))

        return report


def render_batch(
    pipelines: Pipelines,
    requests: Sequence[GenerationParams],
    *,
    loras: Sequence[AppliedLora] = (),
    on_step: StepCallback | None = None,
) -> list[Rendered]:
    """Each request's images with every pass it asks for, the requests rendered together
    (they share their batch_key, as generate_batch needs). Without a later pass the images
    are generate_batch's, unchanged."""
    progress = Progress(on_step, total=max(request.steps for request in requests))
    if requests[0].hires is None:  # shared by the batch (batch_key)
        images = generate_batch(pipelines, requests, loras=loras, on_step=progress.pass_reporter())
    else:
        # Hires fix: the first pass's latents, then the pass at the larger size, whose steps
        # count in the total from the start.
        progress.add(hires_steps(requests[0]))
        first = generate_batch(
            pipelines, requests, loras=loras, on_step=progress.pass_reporter(), output_type="latent"
        )
        images = hires_fix(
            pipelines, requests, first, loras=loras, on_step=progress.pass_reporter()
        )
    images, faces_redone = redo_faces(pipelines, requests, images, loras=loras, progress=progress)
    return [
        Rendered(images=request_images, faces_redone=counts)
        for request_images, counts in zip(images, faces_redone, strict=True)
    ]
