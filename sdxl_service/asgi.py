"""The web server's ASGI application: `manage.py serve` runs
`sdxl_service.asgi:application` under gunicorn with sdxl_service.web_server's workers.

Django's ASGI application behind SyncRequests (slow clients cost no thread; at most
`--threads` requests in Django at once per process; a client's disconnect is seen), with
the web process's database lock timeout (sdxl_service.web_requests).
"""

import os

from django.core.asgi import get_asgi_application

from sdxl_service.web_requests import use_web_lock_timeout
from sdxl_service.web_server import SyncRequests
from training_app.workers.supervisor import WEB_THREADS

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sdxl_service.settings")

use_web_lock_timeout()
# WEB_THREADS unless gunicorn's worker says otherwise (web_server.WebWorker: --threads).
application = SyncRequests(get_asgi_application(), WEB_THREADS)
