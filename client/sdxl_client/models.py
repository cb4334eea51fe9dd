"""What the client knows of the API's requests and answers.

The field tuples are checked against the service's OpenAPI document by the project's
tests (tests/client/test_schema_agreement.py): a field added to /train_lora, /txt2img or
the multipart upload fails that test until it is named here.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

# POST /train_lora's body (session_id is the method's own argument).
TRAINING_FIELDS = (
    "background_weight",
    "batch_size",
    "caption_dropout",
    "checkpoint_every",
    "class_prompt",
    "enable_bucket",
    "epochs",
    "eval_holdout",
    "init_lora",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "masked_loss",
    "min_snr_gamma",
    "noise_offset",
    "prior_preservation_weight",
    "rank",
    "recipe",
    "resolution",
    "sample_every",
    "sample_prompts",
    "sample_seed",
    "seed",
    "session_id",
    "steps",
    "text_encoder_lr",
    "train_text_encoder",
    "trigger",
    "use_alpha_mask",
    "webhook_events",
    "webhook_url",
)


class TrainingOptions(TypedDict, total=False):
    """/train_lora's fields, typed, for `client.train(session_id, **options)`; their
    meanings, bounds and defaults are docs/api.md's (POST /train_lora)."""

    background_weight: float
    batch_size: int
    caption_dropout: float
    checkpoint_every: int
    class_prompt: str | None
    enable_bucket: bool
    epochs: int
    eval_holdout: int
    init_lora: dict[str, Any]
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    masked_loss: bool
    min_snr_gamma: float
    noise_offset: float
    prior_preservation_weight: float
    rank: int
    recipe: str
    resolution: int
    sample_every: int
    sample_prompts: list[str]
    sample_seed: int | None
    seed: int | None
    steps: int
    text_encoder_lr: float
    train_text_encoder: bool
    trigger: str | None
    use_alpha_mask: bool
    webhook_events: list[str]
    webhook_url: str | None


# POST /txt2img's body.
GENERATION_FIELDS = (
    "async",
    "face_detail",
    "guidance_scale",
    "height",
    "hires",
    "init_image_base64",
    "inpaint_area",
    "inpaint_fill",
    "inpaint_padding",
    "iteration",
    "lora_filename",
    "lora_scale",
    "loras",
    "mask_base64",
    "mask_blur",
    "negative_prompt",
    "num_images",
    "outpaint",
    "output_format",
    "prompt",
    "prompt_syntax",
    "quality",
    "refiner",
    "refiner_switch",
    "response_format",
    "scheduler",
    "seed",
    "session_id",
    "steps",
    "strength",
    "use_lora",
    "webhook_events",
    "webhook_url",
    "width",
)

# One entry of /txt2img's "loras".
LORA_FIELDS = ("iteration", "lora_filename", "scale", "session_id")

# POST /sessions/<id>/images, multipart/form-data.
UPLOAD_FIELDS = ("archive", "caption", "image", "mask")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Events after which a stream closes and a run or generation changes no more.
TERMINAL_EVENTS = ("completed", "failed", "cancelled")
# GET /generations/<id> statuses that end a generation.
GENERATION_ENDED = ("completed", "error", "abandoned", "cancelled")
# /train_status statuses that end a run.
RUN_ENDED = ("completed", "error", "cancelled")


def check_fields(fields: dict[str, Any], known: tuple[str, ...], endpoint: str) -> None:
    """ValueError before any request for a field the API does not take."""
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{endpoint} takes no field {', '.join(unknown)}")


@dataclass(frozen=True)
class LoraRef:
    """A LoRA to apply: the session's latest, or the one of `iteration`, at `scale`."""

    session_id: int | str
    iteration: int | None = None
    scale: float = 1.0
    lora_filename: str | None = None

    def as_api(self) -> dict[str, Any]:
        body: dict[str, Any] = {"session_id": self.session_id, "scale": self.scale}
        if self.iteration is not None:
            body["iteration"] = self.iteration
        if self.lora_filename is not None:
            body["lora_filename"] = self.lora_filename
        return body


@dataclass(frozen=True)
class Event:
    """One event of a run or generation: `data` is the webhook body for it
    ({"event", "type", "id", "created_at", "data": {...}})."""

    id: int
    name: str
    data: dict[str, Any]


@dataclass
class Generation:
    """A generation as GET /generations/<id> answers it, with its images once fetched."""

    id: int
    status: str
    images: list[bytes] = field(default_factory=list)
    image_urls: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> list[Path]:
        """Writes the images into `folder` (made if missing) as <id>_<i>.<ext>."""
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, (content, url) in enumerate(zip(self.images, self.image_urls, strict=False)):
            extension = url.rsplit(".", 1)[-1] if "." in url.rsplit("/", 1)[-1] else "png"
            path = target / f"{self.id}_{index}.{extension}"
            path.write_bytes(content)
            paths.append(path)
        return paths

    @classmethod
    def from_api(cls, body: dict[str, Any], images: list[bytes] | None = None) -> "Generation":
        return cls(
            id=int(body["generation_id"]),
            status=str(body.get("status", "")),
            images=images or [],
            image_urls=list(body.get("image_urls") or []),
            parameters=dict(body.get("parameters") or {}),
            message=body.get("message"),
            raw=body,
        )
