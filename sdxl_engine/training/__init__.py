"""LoRA training on SDXL: the engine's torch side for the training worker, by stage.

- caching: the images' latents and captions' embeddings, computed once (and the run as
  resolved from them)
- adapters: the LoRA layers added to the models, their float32 masters, the saved file
- loop: the optimisation steps
- watch: sample images (samples) and checkpoints (checkpoints) along the way
- run: train_lora, which runs the stages in order

Importing it imports torch, diffusers and peft: web code imports it only inside functions
that run in a worker (ruff's TID253 holds that).
"""

from sdxl_engine.training.run import TrainingResult, train_lora

__all__ = ["TrainingResult", "train_lora"]
