"""`serve`: which processes it starts, and an open API (no token configured) kept on
loopback unless told --insecure."""

import subprocess

import pytest
from django.core.management import CommandError, call_command

from access_app import services
from access_app.models import ApiToken, Owner
from training_app.management.commands.serve import Command, access_mode, is_loopback
from training_app.workers.supervisor import service_processes

pytestmark = pytest.mark.django_db


def test_one_worker_of_each_queue_by_default():
    processes = service_processes("127.0.0.1", 8000, 2, 8, "")
    assert list(processes) == ["web", "training worker", "generation worker"]
    assert all(environment is None for _, environment in processes.values())
    web, _ = processes["web"]
    assert web[web.index("--bind") + 1] == "127.0.0.1:8000"


def test_web_server_defaults_many_threads_on_the_asgi_application():
    defaults = Command().create_parser("manage.py", "serve").parse_args([])
    assert (defaults.web_workers, defaults.threads) == (2, 32)
    web, _ = service_processes("127.0.0.1", 8000, 2, 32, "")["web"]
    assert "sdxl_service.asgi:application" in web
    assert web[web.index("--worker-class") + 1] == "sdxl_service.web_server.WebWorker"
    assert web[web.index("--workers") + 1] == "2"
    assert web[web.index("--threads") + 1] == "32"


def test_one_training_and_one_generation_worker_per_gpu_pinned():
    processes = service_processes("127.0.0.1", 8000, 2, 8, "0, 1")
    workers = {name: env for name, (command, env) in processes.items() if name != "web"}
    assert sorted(workers) == [
        "generation worker (GPU 0)",
        "generation worker (GPU 1)",
        "training worker (GPU 0)",
        "training worker (GPU 1)",
    ]
    assert workers["training worker (GPU 1)"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert workers["generation worker (GPU 0)"]["CUDA_VISIBLE_DEVICES"] == "0"
    command, _ = processes["generation worker (GPU 1)"]
    assert command[-2:] == ["worker", "generation"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_without_a_token_only_loopback_is_served():
    assert "no API token configured" in access_mode("127.0.0.1", insecure=False)
    assert "loopback" in access_mode("127.0.0.1", insecure=False)
    with pytest.raises(CommandError, match="refusing to serve the API on 0.0.0.0"):
        access_mode("0.0.0.0", insecure=False)
    assert access_mode("0.0.0.0", insecure=True).startswith("access: INSECURE")


def test_with_a_token_any_host_is_served(settings):
    settings.SDXL_API_TOKENS = ["t0ken"]
    assert "API tokens required" in access_mode("0.0.0.0", insecure=False)
    settings.SDXL_API_TOKENS = []
    services.api_token_issue(ApiToken(name="admin-made", owner=Owner.objects.create(name="a")))
    assert "API tokens required" in access_mode("0.0.0.0", insecure=False)


def test_serve_refuses_a_public_host_before_starting_anything(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("serve started a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(CommandError, match="pass --insecure"):
        call_command("serve", "--host", "0.0.0.0", verbosity=0)
