"""The bodies of the training endpoints: /train_lora's parameters, whose names and defaults
come from sdxl_engine.parameters (the definitions the workers run), and the five shapes
of a training status."""

from typing import Any

from django.conf import settings
from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema_field
from rest_framework import serializers

from sdxl_engine.dataset import DEFAULT_CLASS_PROMPT
from sdxl_engine.parameters import (
    LR_SCHEDULERS,
    MAX_CHECKPOINTS_PER_RUN,
    MAX_PRIOR_PRESERVATION_WEIGHT,
    MAX_SAMPLE_IMAGES_PER_RUN,
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
from sdxl_service.api.loras.serializers import (
    ITERATION,
    lora_filename_field,
    one_way_to_name_a_lora,
)
from training_app.models import TrainingRun

# At most this many sample prompts: each is rendered at every sample step.
MAX_SAMPLE_PROMPTS = 8


class InitLoraSerializer(serializers.Serializer[Any]):
    """/train_lora's init_lora: the LoRA file of the session the run continues."""

    field_alias_context = field_aliases.LORA_FILE

    iteration = StrictIntegerField(**ITERATION)
    lora_filename = lora_filename_field()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("iteration") is None and attrs.get("lora_filename") is None:
            raise serializers.ValidationError("give iteration or lora_filename")
        return one_way_to_name_a_lora(attrs)


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
        "(service recipe: four times a run; original: 0, never); a run renders at most "
        f"{MAX_SAMPLE_IMAGES_PER_RUN} sample images (steps x prompts): 400 otherwise",
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
        f"original: 0, never); a run keeps at most {MAX_CHECKPOINTS_PER_RUN}: 400 otherwise",
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
    masked_loss = serializers.BooleanField(
        required=False,
        help_text="weight each pixel's loss by its image's mask (white: the subject), so the "
        "LoRA learns the subject, not its background (default false; kohya's masked_loss, "
        "cog-sdxl's masks). An image without a mask counts whole; at least one image needs "
        "one, unless use_alpha_mask",
    )
    background_weight = StrictFloatField(
        min_value=0.0,
        max_value=1.0,
        required=False,
        help_text="with masked_loss, the loss weight where the mask is black: 0 (default, as "
        "cog-sdxl) ignores the background, 1 trains it as without a mask; grey masks weigh "
        "in between",
    )
    use_alpha_mask = serializers.BooleanField(
        required=False,
        help_text="take each image's mask from its own alpha channel (opaque: the subject; "
        "kohya's alpha_mask) instead of its mask file; implies masked_loss. The image still "
        "trains composited on white",
    )

    # Not a TrainingParams field: it names a file of the session, which the run records
    # beside its parameters (TrainingRun.init_lora) with the file's sha256.
    init_lora = InitLoraSerializer(
        required=False,
        help_text='continue a LoRA of the session instead of starting afresh: {"iteration": n} '
        'or {"lora_filename": "..."} (a trained or uploaded LoRA, or a run\'s checkpoint). The '
        "run starts from its weights, at its rank (rank left out takes it; another is a 400), "
        "with the text encoders trained when it has text-encoder modules; the result is the "
        "session's next LoRA, its header naming the parent and the steps of the whole chain",
    )

    prior_preservation_weight = StrictFloatField(
        min_value=0.0,
        max_value=MAX_PRIOR_PRESERVATION_WEIGHT,
        required=False,
        help_text="keep the class intact (OneTrainer's prior-model preservation, no "
        "regularisation photos): every step also pulls the LoRA's prediction for "
        "class_prompt to the base model's own, with this weight (diffusers' prior_loss_weight "
        "is 1); about 2.3 times the UNet work per step; 0: off (default)",
    )
    class_prompt = StringField(
        max_length=settings.SDXL_MAX_PROMPT_CHARS,
        required=False,
        allow_null=True,
        help_text='the prompt prior preservation keeps as it was, e.g. "a photo of a person" '
        "(default: each image's caption without the trigger, or "
        f'"{DEFAULT_CLASS_PROMPT}" where that leaves nothing); needs prior_preservation_weight',
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
        if attrs.get("use_alpha_mask") and attrs.get("masked_loss") is False:
            raise serializers.ValidationError(
                {"masked_loss": "use_alpha_mask implies masked_loss: leave it out or true"}
            )
        if "background_weight" in attrs and not (
            attrs.get("masked_loss") or attrs.get("use_alpha_mask")
        ):
            raise serializers.ValidationError(
                {
                    "background_weight": "needs masked_loss or use_alpha_mask true (without a "
                    "mask every pixel weighs 1)"
                }
            )
        if attrs.get("class_prompt") is not None and not attrs.get("prior_preservation_weight"):
            raise serializers.ValidationError(
                {
                    "class_prompt": "needs prior_preservation_weight above 0 (the class is "
                    "kept only then)"
                }
            )
        if (
            attrs.get("prior_preservation_weight")
            and attrs.get("class_prompt") is None
            and attrs.get("trigger") is None
        ):
            raise serializers.ValidationError(
                {
                    "class_prompt": "needed with prior_preservation_weight when there is no "
                    "trigger (the default is the captions without the trigger)"
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
            if k not in ("session_id", "webhook_url", "webhook_events", "init_lora")
            and v is not None
        }


def init_lora_field() -> serializers.DictField:
    """The LoRA a run continues, as recorded when the run was asked for (a dict, not a
    nested serializer: OpenAPI 3.0 cannot make a referenced object nullable)."""
    return serializers.DictField(
        allow_null=True,
        help_text="the LoRA the run continues (init_lora), as it was when the run was asked "
        'for: {"lora_filename", "iteration" (null for a checkpoint), "sha256"}; null: fresh '
        "weights",
    )


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
    masked_loss = serializers.BooleanField(
        help_text="the loss weighted by masks (use_alpha_mask implies it)"
    )
    background_weight = serializers.FloatField(
        help_text="the loss weight where the mask is black (with masked_loss)"
    )
    use_alpha_mask = serializers.BooleanField(help_text="masks from the images' alpha channels")
    prior_preservation_weight = serializers.FloatField(help_text="0: no prior preservation")
    class_prompt = serializers.CharField(
        allow_null=True,
        help_text="null: each image's caption without the trigger (with prior preservation)",
    )
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
    init_lora = init_lora_field()


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
    init_lora = init_lora_field()


class TrainStatusCompleted(KeptAlongTheWay):
    status = serializers.ChoiceField(choices=["completed"])
    progress = serializers.ChoiceField(choices=[100])
    lora = serializers.CharField(allow_null=True, help_text="null once the file was pruned")
    init_lora = init_lora_field()


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
