from django.apps import AppConfig


class AccessAppConfig(AppConfig):
    name = "access_app"
    verbose_name = "API access"
