"""API tokens created in the admin. Only a hash is stored: a leaked database leaks no token."""

from django.db import models


class ApiToken(models.Model):
    name = models.CharField(max_length=100, help_text="who or what uses this token")
    # The first characters of the token, enough to tell tokens apart in a list.
    prefix = models.CharField(max_length=12, editable=False)
    sha256 = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"
