"""A session's admin page that acts: start a training run, cancel the active one, download
its LoRAs (diffusers or kohya), and see its LoRAs, runs, sample images and generations.

The page is the shell: the start form's fields are /train_lora's (TrainLoraSerializer), so
the admin accepts exactly what the API accepts, and the actions call the same services. It
lives beside the API, above both apps, and replaces sessions_app's registration of Session;
sdxl_service.urls imports it before it reads the admin's URLs.
"""

from typing import Any, TypeVar

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Model
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, QueryDict
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST
from rest_framework import serializers

from core.errors import ServiceError
from sdxl_service.api.training.serializers import TrainLoraSerializer
from sdxl_service.links import cancel_training_admin_url, start_training_admin_url
from sessions_app.admin import SessionAdmin
from sessions_app.links import session_admin_url
from sessions_app.models import Session
from training_app.admin import lora_download_links, sample_figures
from training_app.links import generation_image_admin_urls, run_admin_url
from training_app.models import Generation, LoraArtifact, TrainingRun, TrainingSample
from training_app.services import runs

# /train_lora's fields that are not training parameters: the page names the session, and
# webhooks are for API callers.
NOT_IN_THE_FORM = ("session_id", "webhook_url", "webhook_events")
# Shown at once; the others wait behind "More parameters".
MAIN_FIELDS = (
    "recipe",
    "steps",
    "epochs",
    "rank",
    "learning_rate",
    "batch_size",
    "resolution",
    "trigger",
)
# The most sample images the session's page shows (the newest); a run's page shows all.
SAMPLES_SHOWN = 24

_Shown = TypeVar("_Shown", bound=Model)


def training_form_fields() -> dict[str, serializers.Field[Any, Any, Any, Any]]:
    """The start form's fields: every training parameter /train_lora takes, by name."""
    fields = TrainLoraSerializer().fields
    return {name: field for name, field in fields.items() if name not in NOT_IN_THE_FORM}


def _widget(name: str, field: serializers.Field[Any, Any, Any, Any]) -> dict[str, Any]:
    if isinstance(field, serializers.BooleanField):
        kind, choices = "choice", ["true", "false"]
    elif isinstance(field, serializers.ChoiceField):
        kind, choices = "choice", list(field.choices)
    elif isinstance(field, serializers.ListField):
        kind, choices = "lines", []
    else:
        kind, choices = "text", []
    limits = [
        f"{word} {value}"
        for word, value in (
            ("min", getattr(field, "min_value", None)),
            ("max", getattr(field, "max_value", None)),
        )
        if value is not None
    ]
    help_text = str(field.help_text or "")
    if kind == "lines":
        help_text = f"one per line; {help_text}"
    return {
        "name": name,
        "kind": kind,
        "choices": choices,
        "help": "; ".join(part for part in (help_text, ", ".join(limits)) if part),
    }


def training_request(post: QueryDict, session_id: int) -> dict[str, Any]:
    """The form's answers as a /train_lora body: empty fields are left out (the recipe
    fills them), list fields take one value per line."""
    data: dict[str, Any] = {"session_id": session_id}
    for name, field in training_form_fields().items():
        if isinstance(field, serializers.ListField):
            lines = [line.strip() for line in post.get(name, "").splitlines() if line.strip()]
            if lines:
                data[name] = lines
        elif value := post.get(name, "").strip():
            data[name] = value
    return data


def _error_lines(errors: object, prefix: str = "") -> list[str]:
    if isinstance(errors, dict):
        return [
            line
            for name, nested in errors.items()
            for line in _error_lines(
                nested, "" if name == "non_field_errors" else f"{prefix}{name}: "
            )
        ]
    if isinstance(errors, list):
        return [line for nested in errors for line in _error_lines(nested, prefix)]
    return [f"{prefix}{errors}"]


class ReadOnlyInline(admin.TabularInline[_Shown, Session]):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Session | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Session | None = None) -> bool:
        return False


class LoraInline(ReadOnlyInline[LoraArtifact]):
    model = LoraArtifact
    readonly_fields = ("number", "filename", "source", "size", "sha256", "created_at", "downloads")
    fields = readonly_fields
    verbose_name_plural = "LoRAs"

    @admin.display(description="download")
    def downloads(self, lora: LoraArtifact) -> str:
        return lora_download_links(lora)


class TrainingRunInline(ReadOnlyInline[TrainingRun]):
    model = TrainingRun
    readonly_fields = (
        "status",
        "stage",
        "progress",
        "steps_done",
        "last_loss",
        "error_message",
        "created_at",
        "finished_at",
    )
    fields = readonly_fields
    ordering = ["-id"]

    @admin.display(description="steps")
    def steps_done(self, run: TrainingRun) -> str:
        return f"{run.step} / {run.total_steps or '?'}"


class GenerationInline(ReadOnlyInline[Generation]):
    model = Generation
    readonly_fields = ("status", "prompt", "seed", "thumbnails", "duration_ms", "created_at")
    fields = readonly_fields

    @admin.display(description="images")
    def thumbnails(self, generation: Generation) -> str:
        if not generation.image_count:
            return "-"
        return format_html_join(
            " ",
            '<a href="{0}"><img src="{0}" style="max-width:96px;max-height:96px"></a>',
            ((url,) for url in generation_image_admin_urls(generation)),
        )


admin.site.unregister(Session)


@admin.register(Session)
class SessionTrainingAdmin(SessionAdmin):
    change_form_template = "admin/session/change_form.html"
    inlines = [*SessionAdmin.inlines, LoraInline, TrainingRunInline, GenerationInline]
    readonly_fields = [*SessionAdmin.readonly_fields, "sample_images"]

    @admin.display(description="sample images")
    def sample_images(self, session: Session) -> str:
        newest = TrainingSample.objects.filter(run__session=session).order_by(
            "-run_id", "-step", "index"
        )[:SAMPLES_SHOWN]
        return sample_figures(newest)

    def may_act(self, request: HttpRequest) -> bool:
        """Staff (the admin site checks that) with permission to change sessions."""
        opts = self.model._meta
        allowed: bool = request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")
        return allowed

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = dict(extra_context or {})
        session = self.get_object(request, object_id)
        if session is not None and self.may_act(request):
            fields = [_widget(name, field) for name, field in training_form_fields().items()]
            context.update(
                training_fields=[field for field in fields if field["name"] in MAIN_FIELDS],
                more_training_fields=[
                    field for field in fields if field["name"] not in MAIN_FIELDS
                ],
                start_training_url=start_training_admin_url(session),
                cancel_training_url=cancel_training_admin_url(session),
                active_run=session.training_runs.filter(
                    status__in=TrainingRun.ACTIVE_STATUSES
                ).first(),
            )
        return super().change_view(request, object_id, form_url, context)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<int:pk>/start-training/",
                self.admin_site.admin_view(require_POST(self.start_training)),
                name="sessions_app_session_start_training",
            ),
            path(
                "<int:pk>/cancel-training/",
                self.admin_site.admin_view(require_POST(self.cancel_training)),
                name="sessions_app_session_cancel_training",
            ),
            *super().get_urls(),
        ]

    def _acted_on(self, request: HttpRequest, pk: int) -> Session:
        if not self.may_act(request):
            raise PermissionDenied
        return get_object_or_404(Session, pk=pk)

    def _back(self, session: Session) -> HttpResponseRedirect:
        return HttpResponseRedirect(session_admin_url(session.pk))

    def start_training(self, request: HttpRequest, pk: int) -> HttpResponseRedirect:
        """Validated as /train_lora validates, started by the same service."""
        session = self._acted_on(request, pk)
        serializer = TrainLoraSerializer(data=training_request(request.POST, session.pk))
        if not serializer.is_valid():
            for line in _error_lines(serializer.errors):
                self.message_user(request, f"Training not started: {line}", messages.ERROR)
            return self._back(session)
        try:
            run = runs.training_run_start(
                session.pk, TrainLoraSerializer.training_parameters(serializer.validated_data)
            )
        except ServiceError as error:
            self.message_user(request, f"Training not started: {error.message}", messages.ERROR)
            return self._back(session)
        length = run.parameters.get("steps") or run.parameters.get("epochs")
        unit = "step" if run.parameters.get("steps") else "epoch"
        unit += "s" if length != 1 else ""
        self.message_user(
            request,
            format_html(
                'Training run <a href="{}">{}</a> queued: {} {}, rank {}.',
                run_admin_url(run),
                run.pk,
                length,
                unit,
                run.parameters.get("rank"),
            ),
            messages.SUCCESS,
        )
        return self._back(session)

    def cancel_training(self, request: HttpRequest, pk: int) -> HttpResponseRedirect:
        session = self._acted_on(request, pk)
        try:
            run = runs.training_run_cancel(session.pk)
        except ServiceError as error:
            self.message_user(request, error.message, messages.ERROR)
        else:
            self.message_user(request, f"Training run {run.pk} cancelled.", messages.SUCCESS)
        return self._back(session)
