"""Image generation with SDXL Base + Refiner: the engine's torch side for the generation
worker, by stage.

- builder: random-weight pipelines, and which weights a worker loads (resolve_model_source)
- pipelines: loading the Base and Refiner a worker keeps between jobs
- graphs: CUDA graphs of the eager UNets, per input shape
- merge: a request's LoRAs merged into the weights in place, and taken out again
- batch: text-to-image and image-to-image for one request or several batched together
- inpaint: inpainting and outpainting, batch's first pass for requests with a mask
- render: a request's whole rendering, the first pass then the passes that rework it
- faces: the face detail pass (ADetailer's), each face redone at the native size
- hires: A1111's hires fix, the pass that reworks the first pass's images at a larger size

Importing it imports torch and diffusers: web code imports it only inside functions that
run in a worker (ruff's TID253 holds that).
"""

from sdxl_engine.generation.batch import generate, generate_batch, warm_up
from sdxl_engine.generation.builder import resolve_model_source
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import load_pipelines

__all__ = [
    "AppliedLora",
    "generate",
    "generate_batch",
    "load_pipelines",
    "resolve_model_source",
    "warm_up",
]
