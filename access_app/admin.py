"""Admin: create API tokens (the plaintext is shown once) and revoke them by deleting."""

from django.contrib import admin, messages
from django.utils.html import format_html

from access_app import services
from access_app.models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "created_at"]
    readonly_fields = ["prefix", "created_at"]

    def get_fields(self, request, obj=None):
        return ["name"] if obj is None else ["name", "prefix", "created_at"]

    def save_model(self, request, obj: ApiToken, form, change: bool) -> None:
        if change:
            obj.save(update_fields=["name"])
            return
        plaintext = services.api_token_issue(obj)
        messages.warning(
            request,
            format_html(
                "API token for {}: <code>{}</code> Copy it now: only its hash is stored, "
                "so it cannot be shown again.",
                obj.name,
                plaintext,
            ),
        )
