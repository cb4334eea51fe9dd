"""What can be done to training runs (runs), LoRA files (loras) and generations."""
