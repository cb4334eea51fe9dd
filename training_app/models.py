"""Training runs, the LoRA files they (or uploads) produce, generations and worker liveness."""

from django.db import models
from django.db.models import Q

from sessions_app.models import Session


class TrainingRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        ERROR = "error"

    class Stage(models.TextChoices):
        QUEUED = "queued"
        LOADING = "loading"
        CACHING = "caching"  # encoding the images once with the frozen VAE and text encoders
        TRAINING = "training"
        SAVING = "saving"
        DONE = "done"

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="training_runs")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    stage = models.CharField(max_length=16, choices=Stage.choices, default=Stage.QUEUED)
    progress = models.PositiveSmallIntegerField(default=0)  # 0-100, never goes backwards
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(null=True, blank=True)
    last_loss = models.FloatField(null=True, blank=True)
    parameters = models.JSONField(default=dict, blank=True)
    error_message = models.TextField(blank=True)
    task_id = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True)  # host:pid of the worker running it
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # When the optimisation steps began: the time per step, hence the ETA, counts from here.
    training_started_at = models.DateTimeField(null=True, blank=True)

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


class Generation(models.Model):
    """One /txt2img request: what was asked, what was used, how long it took."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        ERROR = "error"
        ABANDONED = "abandoned"  # the caller stopped waiting before a worker took it

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    prompt = models.TextField()
    negative_prompt = models.TextField(blank=True)
    parameters = models.JSONField(default=dict)
    seed = models.PositiveBigIntegerField()
    session = models.ForeignKey(
        Session, on_delete=models.SET_NULL, null=True, blank=True, related_name="generations"
    )
    lora = models.ForeignKey(
        LoraArtifact, on_delete=models.SET_NULL, null=True, blank=True, related_name="generations"
    )
    lora_filename = models.CharField(max_length=255, blank=True)
    lora_sha256 = models.CharField(max_length=64, blank=True)
    image_count = models.PositiveSmallIntegerField(default=0)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    error_message = models.TextField(blank=True)
    task_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"generation {self.pk} ({self.status})"


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
