"""SDXL LoRA training and generation engine.

A plain library: no Django, and importing this package does not import torch. The heavy
modules (builder, pipelines, training, generation) import torch and diffusers themselves.
"""

from sdxl_engine.errors import EngineError, TrainingCancelled

__all__ = ["EngineError", "TrainingCancelled"]
