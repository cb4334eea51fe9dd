"""The web process's request rules that hold under both entry points (web_requests)."""

import asyncio

from django.contrib.staticfiles import finders
from django.test import AsyncClient


def test_under_asgi_a_file_is_streamed_in_parts_not_read_whole_first():
    async def download():
        response = await AsyncClient().get("/static/admin/js/vendor/jquery/jquery.js")
        return response, b"".join([part async for part in response.streaming_content])

    response, body = asyncio.run(download())
    assert response.status_code == 200
    # Django reads a synchronous iterator whole before sending (with a warning).
    assert response.is_async
    with open(finders.find("admin/js/vendor/jquery/jquery.js"), "rb") as original:
        assert body == original.read()
