"""Training runs, the LoRA files they (or uploads) produce, generations and worker liveness."""

from typing import Any

from django.db import models
from django.db.models import Q

from access_app.models import Owner
from sdxl_engine.image_output import FILE_EXTENSIONS
from sdxl_engine.parameters import GenerationParams, field_names
from sessions_app.models import Session

# The keys of a Generation's `parameters` that are GenerationParams fields: rows recorded
# before the one LoRA became applied_loras also hold "lora_scale".
_PARAMS_FIELDS = field_names(GenerationParams)


class Job(models.Model):
    """The columns of a row a worker runs as a job (a training run, a generation): who runs
    it, since when, whether its process is alive, and where its events go. Its lifecycle
    (queue, claim, heartbeat, finish, lost, redeliver) is training_app.jobs'. A kind with
    more ends than these statuses (a generation) declares its own Status and `status`."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        ERROR = "error"

    ACTIVE_STATUSES: tuple[str, ...] = (Status.QUEUED, Status.RUNNING)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    error_message = models.TextField(blank=True)  # why, when it ended otherwise than completed
    task_id = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True)  # host:pid of the process running it
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Written by the running job's process (jobs.heartbeat) BEATS_PER_STALE_PERIOD times per
    # stale period: older than that, the process is gone (jobs.end_lost).
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Where to post the job's events (webhooks), and which: see services.webhooks.
    webhook_url = models.CharField(max_length=2000, blank=True)
    webhook_events = models.JSONField(default=list, blank=True)

    class Meta:
        abstract = True


class TrainingRun(Job):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        ERROR = "error"
        # Stopped by /cancel_training (or the admin's cancel): queued, it never ran; running,
        # it stopped within a step and saved no LoRA. Rows cancelled before this status
        # existed read "error" with error_message "training was cancelled" (migrated).
        CANCELLED = "cancelled"

    class Stage(models.TextChoices):
        QUEUED = "queued"
        LOADING = "loading"
        CACHING = "caching"  # encoding the images once with the frozen VAE and text encoders
        TRAINING = "training"
        SAVING = "saving"
        DONE = "done"

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="training_runs")
    stage = models.CharField(max_length=16, choices=Stage.choices, default=Stage.QUEUED)
    progress = models.PositiveSmallIntegerField(default=0)  # 0-100, never goes backwards
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(null=True, blank=True)
    last_loss = models.FloatField(null=True, blank=True)
    parameters = models.JSONField(default=dict, blank=True)
    # When the optimisation steps began: the time per step, hence the ETA, counts from here.
    training_started_at = models.DateTimeField(null=True, blank=True)
    # Times the run's worker was lost and the run queued again (SDXL_TRAINING_MAX_RESUMES).
    attempts = models.PositiveSmallIntegerField(default=0)
    # The checkpoint's step the current attempt continued from; null for a first attempt.
    resumed_from_step = models.PositiveIntegerField(null=True, blank=True)
    # The LoRA file of the session the run continues (/train_lora's init_lora), as it was
    # when the run was asked for: {"lora_filename", "iteration" (null for a checkpoint),
    # "sha256"}; the worker trains only from a file of that sha256. Null: fresh weights.
    init_lora = models.JSONField(null=True, blank=True)
    # The training loss as [[step, loss], ...], at most a few hundred points however long
    # the run (sdxl_engine.loss_history), saved as the run trains.
    loss_history = models.JSONField(default=list, blank=True)
    # The finished LoRA's scores (sdxl_engine.training.evaluation): the eval loss, and the
    # similarity of its samples to the photos (null without an image embedder).
    eval_loss = models.FloatField(null=True, blank=True)
    similarity = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            # The database, not a check-then-act in Python, guarantees one active run.
            models.UniqueConstraint(
                fields=["session"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_training_run_per_session",
            )
        ]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.session} ({self.status})"


class LoraArtifact(models.Model):
    class Source(models.TextChoices):
        TRAINED = "trained"
        UPLOADED = "uploaded"
        FOUND = "found"  # on disk, recorded by import_sessions, rescan or verify --fix

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="loras")
    number = models.PositiveIntegerField()  # the iteration `n`
    filename = models.CharField(max_length=255)  # in the session folder's root
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    source = models.CharField(max_length=16, choices=Source.choices)
    training_run = models.OneToOneField(
        TrainingRun, on_delete=models.SET_NULL, null=True, blank=True, related_name="artifact"
    )
    metadata = models.JSONField(default=dict, blank=True)  # the safetensors header metadata
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["session_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["session", "number"], name="unique_lora_number"),
            models.UniqueConstraint(fields=["session", "filename"], name="unique_lora_filename"),
        ]

    def __str__(self) -> str:
        return f"{self.session}/{self.filename}"


class TrainingCheckpoint(models.Model):
    """A LoRA file a run saved part-way (checkpoint_every), in the session's `checkpoints/`
    folder: a user may pick it over the final one. It takes no `lora_<n>` number and is
    never the session's latest LoRA."""

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="checkpoints")
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.PositiveIntegerField()
    filename = models.CharField(max_length=255)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    metadata = models.JSONField(default=dict, blank=True)  # the safetensors header metadata
    # Its scores, as its header records them (sdxl_engine.training.evaluation); null when
    # unknown (a file from before scores, or no samples at its step for the similarity).
    eval_loss = models.FloatField(null=True, blank=True)
    similarity = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "step"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step"], name="one_checkpoint_per_step"),
            models.UniqueConstraint(
                fields=["session", "filename"], name="unique_checkpoint_filename"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.session}/checkpoints/{self.filename}"


class TrainingSample(models.Model):
    """A sample image a run rendered at a step (sample_every), in `samples/run_<id>/`."""

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="samples")
    step = models.PositiveIntegerField()
    index = models.PositiveSmallIntegerField()  # the prompt's place in the run's sample prompts
    prompt = models.TextField()
    filename = models.CharField(max_length=255)
    size = models.PositiveBigIntegerField(default=0)  # its bytes (the stored-MB quota's)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "step", "index"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step", "index"], name="one_sample_per_prompt")
        ]

    def __str__(self) -> str:
        return f"sample {self.index} of {self.run} at step {self.step}"


class Generation(Job):
    """One /txt2img request: what was asked, what was used, how long it took. The LoRAs it
    applies are its applied_loras (GenerationLora), in order."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        ERROR = "error"
        ABANDONED = "abandoned"  # the caller stopped waiting before a worker took it
        # Stopped between denoising steps, or before it started, because nobody wants it
        # any more: its client went away or was answered 504, or POST .../cancel.
        CANCELLED = "cancelled"

    ACTIVE_STATUSES: tuple[str, ...] = (Status.QUEUED, Status.RUNNING)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    prompt = models.TextField()
    negative_prompt = models.TextField(blank=True)
    parameters = models.JSONField(default=dict)
    seed = models.PositiveBigIntegerField()
    # The session of its first LoRA (use_lora's session), for browsing; None without one.
    session = models.ForeignKey(
        Session, on_delete=models.SET_NULL, null=True, blank=True, related_name="generations"
    )
    # Who asked for it: only the owner's tokens (and admin tokens) see it.
    owner = models.ForeignKey(
        Owner, on_delete=models.SET_NULL, null=True, blank=True, related_name="generations"
    )
    image_count = models.PositiveSmallIntegerField(default=0)
    # The bytes of its folder once completed (its images, an img2img's starting image): the
    # stored-MB quota's. 0 before, and for one that failed or was cancelled (no folder).
    stored_bytes = models.PositiveBigIntegerField(default=0)
    # Denoising steps done, of Base and Refiner together, while running (GET /generations/<id>).
    step = models.PositiveSmallIntegerField(default=0)
    total_steps = models.PositiveSmallIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    # Per image, how many faces the face detail pass redid (a list of ints, once completed);
    # None for a request without face_detail.
    faces_redone = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"generation {self.pk} ({self.status})"

    @property
    def params(self) -> GenerationParams:
        """What the request asked for (GenerationParams.record), less its init_image (a file
        in its folder) and LoRAs (its applied_loras)."""
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            **self._recorded_params(),
        )

    def image_filename(self, index: int) -> str:
        """Image `index`'s file in the generation's folder (`0.png`, `1.jpg`...)."""
        # From `parameters` alone: callers may have loaded nothing else (datadir_app.verify).
        file_format = GenerationParams(**self._recorded_params()).file_format
        return f"{index}{FILE_EXTENSIONS[file_format]}"

    def _recorded_params(self) -> dict[str, Any]:
        return {name: value for name, value in self.parameters.items() if name in _PARAMS_FIELDS}


class GenerationLora(models.Model):
    """A LoRA a generation applies at a scale, in the order the request gave them. The
    file is named and hashed as it was when asked for: the row keeps saying what was used
    after the file is deleted."""

    generation = models.ForeignKey(
        Generation, on_delete=models.CASCADE, related_name="applied_loras"
    )
    position = models.PositiveSmallIntegerField()
    lora = models.ForeignKey(
        LoraArtifact,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="generation_uses",
    )
    # Or, when the file asked for is a run's checkpoint, that checkpoint.
    checkpoint = models.ForeignKey(
        "TrainingCheckpoint",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="generation_uses",
    )
    source_session_id = models.PositiveBigIntegerField(help_text="the session the LoRA came from")
    filename = models.CharField(max_length=255)
    sha256 = models.CharField(max_length=64)
    scale = models.FloatField()

    class Meta:
        ordering = ["generation_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["generation", "position"], name="one_lora_per_position")
        ]

    def __str__(self) -> str:
        return f"{self.filename} of session {self.source_session_id} at {self.scale:g}"


class WorkerHeartbeat(models.Model):
    """A running worker cluster says it is alive here every few seconds."""

    queue = models.CharField(max_length=100)
    host = models.CharField(max_length=200)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()

    class Meta:
        ordering = ["queue", "host", "pid"]
        constraints = [
            models.UniqueConstraint(fields=["queue", "host", "pid"], name="unique_worker")
        ]

    def __str__(self) -> str:
        return f"{self.queue} worker {self.host}:{self.pid}"


class WebhookDelivery(models.Model):
    """One event of a run or generation to post to its webhook_url: the outbox a worker's
    delivery thread sends from, retrying with back-off; every attempt's outcome is kept."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        DELIVERED = "delivered"
        FAILED = "failed"  # every attempt was refused or went unanswered

    event = models.CharField(max_length=32)
    url = models.CharField(max_length=2000)
    run = models.ForeignKey(
        TrainingRun, on_delete=models.SET_NULL, null=True, blank=True, related_name="webhooks"
    )
    generation = models.ForeignKey(
        Generation, on_delete=models.SET_NULL, null=True, blank=True, related_name="webhooks"
    )
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    claimed_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="webhook_due")]
        verbose_name_plural = "webhook deliveries"

    def __str__(self) -> str:
        return f"webhook {self.event} #{self.pk} ({self.status})"


class Event(models.Model):
    """One event of a run or generation (started, progress, sample, checkpoint, completed,
    failed, cancelled), recorded for every run and generation, with or without a webhook:
    what GET /runs/<id>/events and /generations/<id>/events stream. `payload` is the body a
    webhook posts for it; the row's id is the stream's event id (Last-Event-ID)."""

    run = models.ForeignKey(
        TrainingRun, on_delete=models.CASCADE, null=True, blank=True, related_name="events"
    )
    generation = models.ForeignKey(
        Generation, on_delete=models.CASCADE, null=True, blank=True, related_name="events"
    )
    name = models.CharField(max_length=32)
    payload = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(run__isnull=True) ^ Q(generation__isnull=True),
                name="event_of_run_or_generation",
            )
        ]

    def __str__(self) -> str:
        return f"event {self.name} #{self.pk}"
