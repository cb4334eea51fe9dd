"""The face detail pass (ADetailer's flow): each face found in a finished image is cropped
with its padding, redone by img2img at the model's native size (the fast path: 1024² for
SDXL, the size the compiled UNets and their CUDA graphs were made for) with the request's
LoRAs, scheduler and Refiner policy, and pasted back through a feathered mask. The image
work is sdxl_engine.faces (no torch); this module runs the img2img between."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import PIL.Image

from sdxl_engine.faces import face_crop, face_region, find_faces, paste_face
from sdxl_engine.generation.batch import generate_batch, native_side
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import GenerationParams, img2img_steps


class Progress(Protocol):
    """render.Progress, as this pass uses it (render imports this module, not back)."""

    def add(self, steps: int) -> None: ...

    def pass_reporter(self) -> Callable[[int, int], None]: ...


def redo_faces(
    pipelines: Pipelines,
    requests: Sequence[GenerationParams],
    images: Sequence[list[PIL.Image.Image]],
    *,
    loras: Sequence[AppliedLora] = (),
    progress: Progress,
) -> tuple[list[list[PIL.Image.Image]], list[list[int] | None]]:
    """Each request's images with their faces redone, and per image how many were (None
    for a request without face_detail, whose images are returned as they are). An image
    without a face is returned unchanged, the same object.

    The faces are found first, in every image, so that `progress` grows by all their
    steps at once; then each face runs as one img2img request of its own (one image at
    the native size: the compiled path), from the image as the faces before it left it.
    Its seed is its image's own, its prompt the face_detail's or else the request's."""
    side = native_side(pipelines)
    found = [
        [
            find_faces(image, request.face_detail.max_faces)
            if request.face_detail is not None
            else []
            for image in request_images
        ]
        for request, request_images in zip(requests, images, strict=True)
    ]
    for request, faces_per_image in zip(requests, found, strict=True):
        if request.face_detail is not None:
            face_count = sum(len(faces) for faces in faces_per_image)
            progress.add(face_count * img2img_steps(request.steps, request.face_detail.strength))
    redone_images: list[list[PIL.Image.Image]] = []
    counts: list[list[int] | None] = []
    for request, request_images, faces_per_image in zip(requests, images, found, strict=True):
        detail = request.face_detail
        if detail is None:
            redone_images.append(list(request_images))
            counts.append(None)
            continue
        # A plain img2img of each face's crop: no mask, hires or face pass of its own.
        face_params = dataclasses.replace(
            request.for_later_pass(),
            prompt=detail.prompt or request.prompt,
            num_images=1,
            width=side,
            height=side,
            strength=detail.strength,
        )
        done = []
        for image, seed, faces in zip(request_images, request.seeds, faces_per_image, strict=True):
            for face in faces:
                region = face_region(image.size, face, detail.padding)
                face_request = dataclasses.replace(
                    face_params, seed=seed, init_image=face_crop(image, region, side)
                )
                [[redone]] = generate_batch(
                    pipelines, [face_request], loras=loras, on_step=progress.pass_reporter()
                )
                image = paste_face(image, region, redone)
            done.append(image)
        redone_images.append(done)
        counts.append([len(faces) for faces in faces_per_image])
    return redone_images, counts
