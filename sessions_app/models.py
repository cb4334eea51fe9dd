"""The index of what lies in the data dir.

The folder layout of docs/api.md is the storage, byte for byte; these rows say what is there
and hold the counters that must never go backwards.
"""

from django.db import models

from access_app.models import Owner


class Session(models.Model):
    created_at = models.DateTimeField(auto_now_add=True)
    # Whose it is: only the owner's tokens (and admin tokens) see it. Empty only for rows
    # made outside the API and its commands; admin tokens see those.
    owner = models.ForeignKey(
        Owner, on_delete=models.PROTECT, null=True, blank=True, related_name="sessions"
    )
    # Counters bumped under the session lock. `lora_<n>` numbers are never reused, so
    # the counter lives here rather than being derived from the files that remain.
    next_group_number = models.PositiveIntegerField(default=0)
    next_lora_number = models.PositiveIntegerField(default=1)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"session_{self.pk}"

    @property
    def folder_name(self) -> str:
        return f"session_{self.pk}"


class ImageGroup(models.Model):
    """One upload: the folder `<n>/` holding `<0>.<ext>` and `0.txt`."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="image_groups")
    number = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["session_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["session", "number"], name="unique_group_number")
        ]

    def __str__(self) -> str:
        return f"{self.session}/{self.number}"


class TrainingImage(models.Model):
    group = models.ForeignKey(ImageGroup, on_delete=models.CASCADE, related_name="images")
    # Path relative to the data dir, e.g. "session_data/session_1/0/0.png".
    file = models.CharField(max_length=500)
    caption = models.TextField()
    image_format = models.CharField(max_length=8)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    # Its mask, relative to the data dir ("session_data/session_1/0/0_mask.png", beside the
    # image: sdxl_engine.dataset.mask_path_for); empty for none. White is the subject.
    mask_file = models.CharField(max_length=500, blank=True, default="")
    mask_size = models.PositiveBigIntegerField(default=0)  # its bytes (quotas count them)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["group_id", "id"]

    def __str__(self) -> str:
        return self.file
