"""Owners (tenants) and their API tokens. Only a token's hash is stored: a leaked database
leaks no token."""

from django.db import models

# Every scope a token may hold (README, Security). `admin` holds all the others and sees
# every owner's sessions.
SCOPES = ("read", "upload", "train", "generate", "delete", "admin")
DEFAULT_SCOPES = ("read", "upload", "train", "generate", "delete")
# Owns the data that existed before owners, and whatever is created with no token
# configured or with a token of SDXL_API_TOKENS.
DEFAULT_OWNER_NAME = "default"


class Owner(models.Model):
    """A tenant: its tokens see only its sessions. A quota left empty takes the setting's
    default (SDXL_QUOTA_*); 0 means no limit."""

    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    max_sessions = models.PositiveIntegerField(null=True, blank=True)
    max_images_per_session = models.PositiveIntegerField(null=True, blank=True)
    max_stored_mb = models.PositiveIntegerField(null=True, blank=True)
    max_concurrent_trainings = models.PositiveIntegerField(null=True, blank=True)
    max_generations_per_minute = models.PositiveIntegerField(null=True, blank=True)
    max_queued_generations = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ApiToken(models.Model):
    name = models.CharField(max_length=100, help_text="who or what uses this token")
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="tokens")
    scopes = models.JSONField(
        default=list, help_text=f"any of: {', '.join(SCOPES)} ('admin' holds them all)"
    )
    # The first characters of the token, enough to tell tokens apart in a list.
    prefix = models.CharField(max_length=12, editable=False)
    sha256 = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class IdempotencyKey(models.Model):
    """A client's `Idempotency-Key` on a request that does something (access_app.idempotency,
    docs/api.md): while the first request with it runs, `response_status` is null (a
    duplicate meanwhile answers 409); once it succeeded, its answer, which a retry with the
    same key and the same request gets again instead of a second job. Removed
    SDXL_IDEMPOTENCY_KEY_HOURS after the request that used it first."""

    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="idempotency_keys")
    key = models.CharField(max_length=255)
    # sha256 of the request: its method, endpoint and parameters (the body, the query).
    fingerprint = models.CharField(max_length=64)
    created_at = models.DateTimeField(db_index=True)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.TextField(blank=True)  # the JSON answered

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "key"], name="idempotency_key_per_owner")
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.owner_id})"
