"""SDXL LoRA training and generation engine.

A plain library with two faces. Its top-level modules import without torch (request
parameters, model choice, dataset, LoRA file checks, image output...): the web process
uses them to check requests, files and folders (tests/engine/test_package.py imports each).
The torch side lives in two sub-packages, each split by stage: `training` (the training
worker) and `generation` (the generation worker). ruff's TID253 bans module-level imports
of torch, diffusers, transformers, peft and those two sub-packages everywhere else, so a
light module or a web module imports them only inside the function that needs them.
No Django anywhere.
"""

from sdxl_engine.errors import EngineError, TrainingCancelled

__all__ = ["EngineError", "TrainingCancelled"]
