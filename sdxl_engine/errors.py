"""The one exception type the engine raises for failures a user can act on."""


class EngineError(Exception):
    """A failure a user can fix; the message says what went wrong and what to do."""


class TrainingCancelled(EngineError):
    """Training stopped because the caller asked it to; no LoRA file was written."""


class GenerationCancelled(EngineError):
    """Generation stopped between denoising steps because the caller asked it to (its
    on_step callback raised this); no image was made, and the pipelines are as before."""
