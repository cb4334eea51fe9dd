from django.apps import AppConfig
from django.core.signals import request_started


class DatadirAppConfig(AppConfig):
    name = "datadir_app"
    verbose_name = "Data dir maintenance"

    def ready(self) -> None:
        from datadir_app.sqlite_wal import hold_wal_index

        request_started.connect(hold_wal_index, dispatch_uid="datadir_app.hold_wal_index")
