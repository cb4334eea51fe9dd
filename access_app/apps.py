from django.apps import AppConfig


class AccessAppConfig(AppConfig):
    name = "access_app"
    verbose_name = "API access"

    def ready(self) -> None:
        # drf-spectacular finds extensions by their being imported.
        from access_app import schema  # noqa: F401
