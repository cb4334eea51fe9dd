"""Python client of the SDXL LoRA service: SDXLClient (sync), AsyncSDXLClient."""

from .client import AsyncSDXLClient, SDXLClient
from .errors import SDXLError
from .models import (
    GENERATION_FIELDS,
    TRAINING_FIELDS,
    UPLOAD_FIELDS,
    Event,
    Generation,
    LoraRef,
    TrainingOptions,
)
from .webhooks import verify_webhook

__all__ = [
    "GENERATION_FIELDS",
    "TRAINING_FIELDS",
    "UPLOAD_FIELDS",
    "AsyncSDXLClient",
    "Event",
    "Generation",
    "LoraRef",
    "SDXLClient",
    "SDXLError",
    "TrainingOptions",
    "verify_webhook",
]
