from django.apps import AppConfig


class DatadirAppConfig(AppConfig):
    name = "datadir_app"
    verbose_name = "Data dir maintenance"
