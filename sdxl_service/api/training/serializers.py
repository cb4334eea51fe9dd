"""The bodies of the training endpoints: /train_lora's parameters, whose names and defaults
come from sdxl_engine.parameters (the definitions the workers run), and the five shapes
of a training status."""

from typing import Any

from django.conf import settings
from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema_field
from rest_framework import serializers

from sdxl_engine.parameters import (
    LR_SCHEDULERS,
    RECIPES,
    SERVICE_RECIPE,
    TINY_RECIPE_MAX_STEPS,
    TRAINING_RESOLUTION_MULTIPLE,
    lr_warmup_problem,
    recipe_defaults,
    recipe_of,
)
from sdxl_service.api import field_aliases
from sdxl_service.api.common import WebhookFields
from sdxl_service.api.fields import (
    SEED,
    ChoiceField,
    SessionIdField,
    StrictFloatField,
    StrictIntegerField,
    StringField,
    image_side,
)
from training_app.models import TrainingRun

# At most this many sample prompts: each is rendered at every sample step.
MAX_SAMPLE_PROMPTS = 8


class TrainLoraSerializer(WebhookFields):
    """`session_id` and the optional training parameters of /train_lora.

    A field left out comes from the run's recipe: the service's (SERVICE_RECIPE) unless
    the body sets `steps` or `epochs`, which keeps the original's defaults.
    """

    field_alias_context = field_aliases.TRAINING

    # One field for each of sdxl_engine's TrainingParams: a test holds them to the same names.
    session_id = SessionIdField()
    recipe = ChoiceField(
        choices=RECIPES,
        required=False,
        help_text="where the fields left out come from: service (default without steps or "
        "epochs: rank 32, lr 1e-4, batch 4, warm-up, Min-SNR 5, caption dropout 0.05, "
        "aspect buckets, 1500-4000 image-views by image count) or original (default with "
        "steps or epochs: rank 4, lr 1e-4, batch 4, one epoch, square crops)",
    )
    steps = StrictIntegerField(
        min_value=1, max_value=settings.SDXL_MAX_TRAINING_STEPS, required=False
    )
    epochs = StrictIntegerField(min_value=1, max_value=1000, required=False)
    batch_size = StrictIntegerField(min_value=1, max_value=64, required=False)
    learning_rate = StrictFloatField(min_value=1e-7, max_value=0.1, required=False)
    rank = StrictIntegerField(min_value=1, max_value=128, required=False)
    resolution = image_side(TRAINING_RESOLUTION_MULTIPLE, required=False)
    seed = StrictIntegerField(**SEED)
    lr_scheduler = ChoiceField(
        choices=LR_SCHEDULERS,
        required=False,
        help_text=f"learning-rate schedule (service recipe: {SERVICE_RECIPE.lr_scheduler}; "
        "original: constant)",
    )
    lr_warmup_steps = StrictIntegerField(
        min_value=0,
        max_value=settings.SDXL_MAX_TRAINING_STEPS,
        required=False,
        help_text="steps of linear warm-up from 0; needs constant_with_warmup or cosine",
    )
    min_snr_gamma = StrictFloatField(
        min_value=0.0,
        max_value=100.0,
        required=False,
        help_text="Min-SNR loss weighting: min(SNR, gamma) / SNR per step (the Min-SNR paper "
        "uses 5); 0: off",
    )
    noise_offset = StrictFloatField(
        min_value=0.0,
        max_value=1.0,
        required=False,
        help_text="noise offset: adds this times a per-image, per-channel draw to the noise, "
        "so the LoRA can learn overall brightness (e.g. 0.05); 0: off",
    )

    trigger = StringField(
        max_length=100,
        required=False,
        allow_null=True,
        help_text='identity token, e.g. "sks" or "ohwx woman": put before every caption '
        "that lacks it; an image uploaded with an empty caption trains with it alone",
    )
    caption_dropout = StrictFloatField(
        min_value=0.0,
        max_value=1.0,
        required=False,
        help_text="probability that a sample trains with an empty caption (e.g. 0.05); 0: off",
    )
    train_text_encoder = serializers.BooleanField(
        required=False,
        help_text="also train a LoRA on both text encoders' attention (default false); "
        "stock diffusers' load_lora_weights, the kohya export and /txt2img all apply it",
    )
    text_encoder_lr = StrictFloatField(
        min_value=1e-7,
        max_value=0.1,
        required=False,
        help_text="the text encoders' learning rate with train_text_encoder (default: "
        "learning_rate, as kohya's --text_encoder_lr; their guides use about 1e-5 to 5e-5)",
    )
    sample_every = StrictIntegerField(
        min_value=0,
        max_value=settings.SDXL_MAX_TRAINING_STEPS,
        required=False,
        help_text="render sample images every this many steps, listed by /train_status "
        "(service recipe: four times a run; original: 0, never)",
    )
    sample_prompts = serializers.ListField(
        child=StringField(max_length=settings.SDXL_MAX_PROMPT_CHARS),
        min_length=1,
        max_length=MAX_SAMPLE_PROMPTS,
        required=False,
        help_text="the samples' prompts (default: the trigger alone, then the first captions)",
    )
    sample_seed = StrictIntegerField(
        **SEED, help_text="the samples' seed, the same at every sample step (default: the run's)"
    )
    checkpoint_every = StrictIntegerField(
        min_value=0,
        max_value=settings.SDXL_MAX_TRAINING_STEPS,
        required=False,
        help_text="save a checkpoint every this many steps: a LoRA file of the session, and "
        "what a run whose worker was lost resumes from (service recipe: four times a run; "
        "original: 0, never)",
    )
    eval_holdout = StrictIntegerField(
        min_value=0,
        required=False,
        help_text="withhold this many photos (evenly spaced) from training and compute each "
        "checkpoint's eval_loss over them; at most the image count - 1. 0 (default): the "
        "eval loss is over the training photos, where it keeps falling as the LoRA memorises "
        "them",
    )
    enable_bucket = serializers.BooleanField(
        required=False,
        help_text="aspect-ratio buckets: each image trains at the SDXL size nearest its aspect "
        "ratio (service recipe: true); false: a centred square crop (original)",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "steps" in attrs and "epochs" in attrs:
            raise serializers.ValidationError("give steps or epochs, not both")
        if "text_encoder_lr" in attrs and not attrs.get("train_text_encoder"):
            raise serializers.ValidationError(
                {
                    "text_encoder_lr": "needs train_text_encoder true (the text encoders train "
                    "only then)"
                }
            )
        # Only a warm-up the caller gave can clash: the recipes fit theirs to the schedule.
        defaults = recipe_defaults(recipe_of(attrs))
        warmup_problem = lr_warmup_problem(
            attrs.get("lr_scheduler", defaults.lr_scheduler), attrs.get("lr_warmup_steps", 0)
        )
        if warmup_problem:
            raise serializers.ValidationError({"lr_warmup_steps": warmup_problem})
        return attrs

    @staticmethod
    def training_parameters(validated: dict[str, Any]) -> dict[str, Any]:
        """The parameters the caller gave; the run fills the rest from its recipe."""
        return {
            k: v
            for k, v in validated.items()
            if k not in ("session_id", "webhook_url", "webhook_events") and v is not None
        }


class TrainingRecipe(serializers.Serializer[Any]):
    """The recipe a run trains, resolved: what the request gave, the rest from its recipe."""

    name = serializers.CharField(
        help_text=f"one of {', '.join(RECIPES)}: where the fields the request left out came "
        "from: service (the service's recipe, with only session_id) or original (the "
        "original's, when steps or epochs is given)",
    )
    model = serializers.CharField(
        help_text="the model the run was planned for: tiny (its left-out length capped at "
        f"{TINY_RECIPE_MAX_STEPS} steps), hub or sdxl-random",
    )
    steps = serializers.IntegerField(
        allow_null=True,
        help_text="the run's length in steps; null for a length in epochs until the worker "
        "has sorted the images into buckets",
    )
    epochs = serializers.IntegerField(allow_null=True, help_text="null when steps are given")
    batch_size = serializers.IntegerField()
    rank = serializers.IntegerField()
    learning_rate = serializers.FloatField()
    lr_scheduler = serializers.CharField()
    lr_warmup_steps = serializers.IntegerField()
    resolution = serializers.IntegerField(help_text="the side of the (bucket) area trained at")
    enable_bucket = serializers.BooleanField(help_text="aspect-ratio buckets")
    train_text_encoder = serializers.BooleanField()
    sample_steps = serializers.ListField(
        child=serializers.IntegerField(),
        allow_null=True,
        help_text="the steps sample images are rendered at (the last step included); null "
        "while steps is",
    )
    checkpoint_steps = serializers.ListField(
        child=serializers.IntegerField(),
        allow_null=True,
        help_text="the steps a checkpoint is kept at; null while steps is",
    )


class TrainLoraResponse(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["started"])
    run_id = serializers.IntegerField()
    recipe = TrainingRecipe(help_text="what the run will train")


class TrainingSampleItem(serializers.Serializer[Any]):
    step = serializers.IntegerField()
    prompt = serializers.CharField()
    url = serializers.CharField(help_text="the PNG, with the API's access rules")


class TrainingCheckpointItem(serializers.Serializer[Any]):
    step = serializers.IntegerField()
    lora_filename = serializers.CharField(help_text="for /get_lora and /txt2img's lora_filename")
    eval_loss = serializers.FloatField(
        allow_null=True,
        help_text="the denoising loss on fixed timesteps and noise over the held-out photos "
        "(eval_holdout), else the training photos: lower is better; null when unknown",
    )
    similarity = serializers.FloatField(
        allow_null=True,
        help_text="mean cosine similarity (-1 to 1) of the step's samples to the photos by "
        "SDXL_SIMILARITY_MODEL; null without one or without samples at the step",
    )


class LossPoint(serializers.Serializer[Any]):
    step = serializers.IntegerField()
    loss = serializers.FloatField(help_text="the mean training loss of the steps up to this one")


class KeptAlongTheWay(serializers.Serializer[Any]):
    """What in-progress and completed runs list (sample_every, checkpoint_every)."""

    samples = TrainingSampleItem(many=True)
    checkpoints = TrainingCheckpointItem(
        many=True,
        help_text="each checkpoint saved so far and, once the run completed, its final LoRA last",
    )
    # A dict, as waiting_for: OpenAPI 3.0 cannot make a referenced object nullable.
    best_checkpoint = serializers.DictField(
        allow_null=True,
        help_text='{"step", "lora_filename", "eval_loss"} of the entry of checkpoints with the '
        "lowest eval_loss (the earlier step on a tie); null until one is scored",
    )
    loss_history = LossPoint(
        many=True,
        help_text="the training loss so far, at most 256 points: each the mean over a stretch "
        "of steps, the stretches doubling as the run grows",
    )
    resumed_from_step = serializers.IntegerField(
        allow_null=True,
        help_text="the checkpoint's step this run continued from after its worker was lost",
    )


class TrainingQueuePlace(serializers.Serializer[Any]):
    """A queued run's place in the training queue; null once a worker took it."""

    queue_position = serializers.IntegerField(
        allow_null=True,
        min_value=1,
        help_text="1: the next run a training worker takes; null unless queued",
    )
    waiting_for = serializers.DictField(
        allow_null=True,
        help_text='what it waits for: {"run_id": N}, the run just ahead of it (queued, or '
        'training); {"worker": "training"} when nothing is ahead but no training worker '
        "runs; null when not queued or a worker takes it now",
    )
    queue_eta_seconds = serializers.IntegerField(
        allow_null=True,
        help_text="estimated seconds until a worker takes it: the runs ahead (steps left x "
        "their time per step, the last finished run's pace for queued ones), each on the "
        "live training worker free first; null when unknown (no worker, no pace yet, or "
        "not queued)",
    )


class TrainStatusInProgress(KeptAlongTheWay, TrainingQueuePlace):
    status = serializers.ChoiceField(choices=["in-progress"])
    progress = serializers.IntegerField(min_value=0, max_value=99)
    queued = serializers.BooleanField(help_text="no worker has started the run yet")
    stage = serializers.ChoiceField(choices=TrainingRun.Stage.values)
    step = serializers.IntegerField()
    total_steps = serializers.IntegerField(allow_null=True)
    loss = serializers.FloatField(allow_null=True, help_text="of the last step")
    eta_seconds = serializers.IntegerField(
        allow_null=True, help_text="from the time per step so far; null before the first step"
    )


class TrainStatusCompleted(KeptAlongTheWay):
    status = serializers.ChoiceField(choices=["completed"])
    progress = serializers.ChoiceField(choices=[100])
    lora = serializers.CharField(allow_null=True, help_text="null once the file was pruned")


class TrainStatusError(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["error"])
    message = serializers.CharField(help_text="why the run failed (or its worker was lost)")


class TrainStatusCancelled(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["cancelled"])
    message = serializers.CharField(help_text='"training was cancelled" after /cancel_training')


class TrainStatusNone(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["none"])
    progress = serializers.ChoiceField(choices=[0])


# /train_status answers exactly one of the five shapes, chosen by its "status".
_TRAIN_STATUS_SHAPES = {
    "in-progress": TrainStatusInProgress,
    "completed": TrainStatusCompleted,
    "error": TrainStatusError,
    "cancelled": TrainStatusCancelled,
    "none": TrainStatusNone,
}
TRAIN_STATUS_SCHEMA = PolymorphicProxySerializer(
    component_name="TrainStatus",
    serializers=list(_TRAIN_STATUS_SHAPES.values()),
    resource_type_field_name=None,
)


@extend_schema_field(TRAIN_STATUS_SCHEMA)
class TrainStatusField(serializers.Field[Any, Any, dict[str, Any], Any]):
    """A training status body, rendered through the serializer of its shape."""

    def to_representation(self, body: dict[str, Any]) -> dict[str, Any]:
        return _TRAIN_STATUS_SHAPES[body["status"]](body).data


class TrainStatusResponse(serializers.BaseSerializer[Any]):
    """/train_status's body: TrainStatusField's rendering, at the top level."""

    def to_representation(self, body: dict[str, Any]) -> dict[str, Any]:
        return TrainStatusField().to_representation(body)


class CancelTrainingResponse(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["cancelled"])
    session_id = serializers.CharField()
    run_id = serializers.IntegerField()
