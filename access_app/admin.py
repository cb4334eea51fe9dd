"""Admin: owners with their quotas and usage; API tokens (created here, the plaintext shown
once; revoked by deleting), listed by prefix only."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, TypedDict

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from access_app import services
from access_app.models import DEFAULT_SCOPES, SCOPES, ApiToken, Owner
from access_app.selectors import QUOTA_SETTINGS, owner_quota, owner_stored_bytes

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations


class ApiTokenForm(forms.ModelForm[ApiToken]):
    scopes = forms.MultipleChoiceField(
        choices=[(scope, scope) for scope in SCOPES],
        initial=list(DEFAULT_SCOPES),
        widget=forms.CheckboxSelectMultiple,
        help_text="'admin' holds every scope and sees every owner's sessions",
    )

    class Meta:
        model = ApiToken
        fields = ["name", "owner", "scopes"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    form = ApiTokenForm
    list_display = ["name", "owner", "prefix", "scope_list", "created_at"]
    list_filter = ["owner"]
    readonly_fields = ["prefix", "created_at"]

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> tuple[str, ...]:
        editable = ("name", "owner", "scopes")
        return editable if obj is None else (*editable, "prefix", "created_at")

    @admin.display(description="scopes")
    def scope_list(self, token: ApiToken) -> str:
        return ", ".join(token.scopes)

    def save_model(
        self, request: HttpRequest, obj: ApiToken, form: ApiTokenForm, change: bool
    ) -> None:
        if change:
            obj.scopes = services.scopes_checked(obj.scopes)
            obj.save(update_fields=["name", "owner", "scopes"])
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


class ApiTokenInline(admin.TabularInline[ApiToken, Owner]):
    model = ApiToken
    readonly_fields = ("name", "prefix", "scopes", "created_at")
    fields = readonly_fields
    extra = 0
    can_delete = True
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Owner | None = None) -> bool:
        return False  # a token is made on its own page, which shows the plaintext once


class _Counts(TypedDict):
    token_total: int
    session_total: int


@admin.register(Owner)
class OwnerAdmin(admin.ModelAdmin[Owner]):
    list_display = [
        "name",
        "token_count",
        "session_count",
        "stored_mb",
        "active_trainings",
        "generations_last_minute",
        "quotas",
    ]
    fields = ["name", *QUOTA_SETTINGS]
    inlines = [ApiTokenInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Owner]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                token_total=Count("tokens", distinct=True),
                session_total=Count("sessions", distinct=True),
            )
        )

    @admin.display(description="tokens", ordering="token_total")
    def token_count(self, owner: WithAnnotations[Owner, _Counts]) -> int:
        return owner.token_total

    @admin.display(description="sessions", ordering="session_total")
    def session_count(self, owner: WithAnnotations[Owner, _Counts]) -> int:
        return owner.session_total

    @admin.display(description="stored MB")
    def stored_mb(self, owner: Owner) -> str:
        return f"{owner_stored_bytes(owner.pk) / (1024 * 1024):.1f}"

    @admin.display(description="trainings now")
    def active_trainings(self, owner: Owner) -> int:
        return owner.sessions.filter(training_runs__status__in=["queued", "running"]).count()

    @admin.display(description="generations / min")
    def generations_last_minute(self, owner: Owner) -> int:
        since = timezone.now() - timedelta(minutes=1)
        return owner.generations.filter(created_at__gt=since).count()

    @admin.display(description="quotas (0: none)")
    def quotas(self, owner: Owner) -> str:
        return ", ".join(
            f"{field.removeprefix('max_').replace('_', ' ')} {owner_quota(owner, field) or 0}"
            for field in QUOTA_SETTINGS
        )
