"""The front door (/): a page for a person, with the service's health, loading nothing
from elsewhere, open without a token."""

import re

import pytest
from django.contrib import admin
from django.db import OperationalError, connection
from django.test import Client

pytestmark = pytest.mark.django_db
LINKS = ["/api/docs", "/api/redoc", "/api/schema", "/admin/", "/healthz"]


def _row(html: str, name: str) -> str:
    return re.search(rf'<tr id="check-{name}">(.*?)</tr>', html, re.DOTALL).group(1)


def test_the_page_says_what_the_service_is_and_links_docs_and_admin(client: Client):
    response = client.get("/")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert "LoRA adapters for Stable Diffusion XL" in html
    hrefs = re.findall(r'href="([^"]+)"', html)
    assert set(LINKS) <= set(hrefs)
    for href in hrefs:
        assert not re.match(r"(https?:)?//", href), href
    assert "<script" not in html and "<link" not in html  # nothing else to load
    assert client.head("/").status_code == 200


def test_the_page_shows_each_check_ok_or_not_with_a_reason(client: Client, generation_worker):
    html = client.get("/").content.decode()
    for name in ("database", "broker", "generation_worker"):
        assert ">ok<" in _row(html, name), name
    training = _row(html, "training_worker")
    assert ">not ok<" in training and "no heartbeat" in training
    assert "degraded" in html


def test_a_database_down_shows_on_the_page_with_503(client: Client):
    def refuse(execute, sql, params, many, context):
        raise OperationalError("could not connect to server db.internal.example")

    with connection.execute_wrapper(refuse):
        response = client.get("/")
    assert response.status_code == 503
    html = response.content.decode()
    assert ">not ok<" in _row(html, "database") and "db.internal.example" not in html


def test_with_api_tokens_the_page_stays_open_and_says_a_token_is_needed(client, settings):
    settings.SDXL_API_TOKENS = ["secret-token"]
    assert client.get("/list_sessions").status_code == 401
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Authorization: Bearer &lt;token&gt;" in html and "secret-token" not in html


def test_without_tokens_the_page_says_the_api_is_open_on_loopback(client: Client):
    assert "loopback" in client.get("/").content.decode()


def test_only_get_and_head(client: Client):
    assert client.post("/").status_code == 405


def test_the_admins_view_site_link_leads_here(admin_client):
    assert admin.site.site_url == "/"
    html = admin_client.get("/admin/").content.decode()
    assert '<a href="/">View site</a>' in html
