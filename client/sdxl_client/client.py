"""SDXLClient (sync) and AsyncSDXLClient: the service's API as methods."""

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from . import _common as common
from .errors import SDXLError
from .events import EventParser
from .models import Event, Generation, LoraRef
from .uploads import MultipartStream, Progress, parts_for

EventCallback = Callable[[Event], None]
Source = str | Path | Sequence[str | Path]
InitImage = bytes | str | Path


def _download_target(dest: str | Path, response: httpx.Response, fallback: str) -> Path:
    target = Path(dest)
    if target.is_dir() or str(dest).endswith(("/", os.sep)):
        target.mkdir(parents=True, exist_ok=True)
        target = target / common.filename_from(response, fallback)
    return target


class SDXLClient:
    """The API, blocking. `url` from SDXL_URL (default http://127.0.0.1:8000), `token`
    from SDXL_API_TOKEN; a context manager."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 60,
        *,
        transport: httpx.BaseTransport | None = None,
        poll_interval: float = common.POLL_INTERVAL_S,
    ) -> None:
        self.url = common.base_url(url)
        self.poll_interval = poll_interval
        self._http = httpx.Client(
            base_url=self.url,
            headers=common.auth_headers(token),
            timeout=timeout,
            transport=transport,
        )
        # run id -> session id, for polling /train_status where no event stream answers.
        self._run_sessions: dict[int, int | str] = {}

    def __enter__(self) -> "SDXLClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return common.answer(self._http.request(method, path, **kwargs))

    # Sessions
    def create_session(self) -> int:
        return int(self._call("GET", "/create_session")["session_id"])

    def session(self, session_id: int | str) -> dict[str, Any]:
        return self._call("GET", f"/sessions/{session_id}")  # type: ignore[no-any-return]

    def list_sessions(self, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params = {"limit": limit, "offset": offset}
        return self._call("GET", "/list_sessions", params=params)  # type: ignore[no-any-return]

    def delete_session(self, session_id: int | str) -> None:
        self._call("POST", "/delete_session", json={"session_id": session_id})

    def upload(
        self,
        session_id: int | str,
        source: Source,
        caption: str | None = None,
        on_progress: Progress | None = None,
    ) -> dict[str, Any]:
        """A folder (kohya layout: <stem>.txt captions, <stem>_mask.png masks), a zip or
        image files, in one streamed multipart request: all stored or none."""
        stream = MultipartStream(parts_for(source, caption), on_progress)
        try:
            return self._call(  # type: ignore[no-any-return]
                "POST",
                f"/sessions/{session_id}/images",
                content=iter(stream),
                headers=stream.headers,
            )
        finally:
            stream.cleanup()

    # Training
    def train(self, session_id: int | str, **fields: Any) -> dict[str, Any]:
        """POST /train_lora with any of its fields (models.TRAINING_FIELDS)."""
        started = self._call("POST", "/train_lora", json=common.training_body(session_id, fields))
        self._run_sessions[int(started["run_id"])] = session_id
        return started  # type: ignore[no-any-return]

    def train_status(self, session_id: int | str) -> dict[str, Any]:
        return self._call("POST", "/train_status", json={"session_id": session_id})  # type: ignore[no-any-return]

    def cancel_training(self, session_id: int | str) -> dict[str, Any]:
        return self._call("POST", "/cancel_training", json={"session_id": session_id})  # type: ignore[no-any-return]

    def _session_of_run(self, run_id: int) -> int | str:
        if run_id in self._run_sessions:
            return self._run_sessions[run_id]
        offset = 0
        while True:
            page = self.list_sessions(limit=100, offset=offset)
            for summary in page.get("sessions", []):
                runs = self.session(summary["session_id"]).get("runs", [])
                if any(run.get("run_id") == run_id for run in runs):
                    found: int | str = summary["session_id"]
                    self._run_sessions[run_id] = found
                    return found
            if len(page.get("sessions", [])) < 100:
                raise SDXLError(404, f"run {run_id} not found")
            offset += 100

    # Events
    def _stream(self, path: str, last_event_id: int | None) -> Iterator[Event] | None:
        """The events of an event stream, reconnecting with Last-Event-ID when the
        connection drops before the terminal event; None when the server has no stream."""
        first = self._open_stream(path, last_event_id)
        if first is None:
            return None
        return self._stream_events(path, last_event_id, first)

    def _open_stream(self, path: str, last_event_id: int | None) -> httpx.Response | None:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        request = self._http.build_request(
            "GET",
            path,
            headers=headers,
            timeout=common.stream_timeout(self._http.timeout),
        )
        response = self._http.send(request, stream=True)
        if response.status_code == 404:
            response.close()
            return None
        if response.status_code >= 400:
            response.read()
            response.close()
            raise SDXLError.from_response(response)
        return response

    def _stream_events(
        self, path: str, last_event_id: int | None, response: httpx.Response
    ) -> Iterator[Event]:
        idle_reconnects = 0
        while True:
            parser = EventParser()
            received = False
            try:
                for line in response.iter_lines():
                    received = True  # a heart-beat too: the stream is alive
                    event = parser.feed(line)
                    if event is None:
                        continue
                    last_event_id = event.id
                    yield event
                    if common.is_terminal(event):
                        return
            except httpx.TransportError:
                pass  # dropped: resumed below from the last event seen
            finally:
                response.close()
            idle_reconnects = 0 if received else idle_reconnects + 1
            if idle_reconnects > common.MAX_RECONNECTS:
                raise SDXLError(0, f"the event stream {path} keeps closing without events")
            time.sleep(min(self.poll_interval * idle_reconnects, 5))
            reopened = self._open_stream(path, last_event_id)
            if reopened is None:
                raise SDXLError(404, f"the event stream {path} is gone")
            response = reopened

    def run_events(
        self, run_id: int, last_event_id: int | None = None, session_id: int | str | None = None
    ) -> Iterator[Event]:
        """The run's events up to its terminal one; polled from /train_status (every
        poll_interval seconds) where the server has no event stream."""
        stream = self._stream(common.events_url("runs", run_id), last_event_id)
        if stream is not None:
            yield from stream
            return
        poller = common.RunPoller(run_id, session_id or self._session_of_run(run_id))
        while True:
            for event in poller.events(self.train_status(poller.session_id)):
                yield event
                if common.is_terminal(event):
                    return
            time.sleep(self.poll_interval)

    def generation_events(
        self, generation_id: int, last_event_id: int | None = None
    ) -> Iterator[Event]:
        stream = self._stream(common.events_url("generations", generation_id), last_event_id)
        if stream is not None:
            yield from stream
            return
        poller = common.GenerationPoller(generation_id)
        while True:
            for event in poller.events(self.generation_status(generation_id)):
                yield event
                if common.is_terminal(event):
                    return
            time.sleep(self.poll_interval)

    def wait_for_run(
        self,
        run_id: int,
        on_event: EventCallback | None = None,
        session_id: int | str | None = None,
    ) -> dict[str, Any]:
        """Blocks until the run ends; its final /train_status."""
        for event in self.run_events(run_id, session_id=session_id):
            if on_event is not None:
                on_event(event)
            if common.is_terminal(event):
                session = event.data.get("data", {}).get("session_id") or session_id
                return self.train_status(session or self._session_of_run(run_id))
        raise SDXLError(0, f"the events of run {run_id} ended before it did")

    # Generations
    def generation_status(self, generation_id: int) -> dict[str, Any]:
        return self._call("GET", f"/generations/{generation_id}")  # type: ignore[no-any-return]

    def wait_for_generation(
        self, generation_id: int, on_event: EventCallback | None = None
    ) -> dict[str, Any]:
        """Blocks until the generation ends; its final GET /generations/<id>."""
        for event in self.generation_events(generation_id):
            if on_event is not None:
                on_event(event)
            if common.is_terminal(event):
                return self.generation_status(generation_id)
        raise SDXLError(0, f"the events of generation {generation_id} ended before it did")

    def generate(
        self,
        prompt: str,
        *,
        loras: list[LoraRef | dict[str, Any]] | None = None,
        session_id: int | str | None = None,
        use_lora: bool | None = None,
        init_image: InitImage | None = None,
        wait: bool = True,
        on_event: EventCallback | None = None,
        **fields: Any,
    ) -> Generation:
        """Queues a generation ("async": true); with `wait`, waits for it to end and
        fetches its images. A generation that failed comes back with its `status`
        (error, abandoned, cancelled) and `message`, not raised."""
        body = common.generation_body(prompt, loras, session_id, use_lora, init_image, fields)
        queued = self._call("POST", "/txt2img", json=body)
        if not wait:
            return Generation.from_api(queued)
        final = self.wait_for_generation(int(queued["generation_id"]), on_event)
        images = [self._http_get_bytes(url) for url in final.get("image_urls") or []]
        return Generation.from_api(final, images)

    def _http_get_bytes(self, url: str) -> bytes:
        response = self._http.get(url)
        if response.status_code >= 400:
            raise SDXLError.from_response(response)
        return response.content

    def cancel_generation(self, generation_id: int) -> dict[str, Any]:
        return self._call("POST", f"/generations/{generation_id}/cancel")  # type: ignore[no-any-return]

    # LoRA files
    def download_lora(
        self,
        session_id: int | str,
        dest: str | Path,
        filename: str | None = None,
        format: str | None = None,
    ) -> Path:
        """Writes a LoRA file (the session's latest without `filename`; `format`
        "kohya" for kohya's keys) to `dest`, a file path or a folder (then the name the
        server gives); written to <dest>.tmp then moved, never left half written."""
        if filename is None:
            filename = self._call("POST", "/get_lora", json={"session_id": session_id})[
                "lora_filename"
            ]
        params = {"format": format} if format else {}
        path = f"/sessions/{session_id}/loras/{filename}"
        with self._http.stream("GET", path, params=params) as response:
            if response.status_code >= 400:
                response.read()
                raise SDXLError.from_response(response)
            target = _download_target(dest, response, str(filename))
            partial = target.with_name(target.name + ".tmp")
            with partial.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
        os.replace(partial, target)
        return target


class AsyncSDXLClient:
    """The API as coroutines (events as async generators); as SDXLClient otherwise."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 60,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        poll_interval: float = common.POLL_INTERVAL_S,
    ) -> None:
        self.url = common.base_url(url)
        self.poll_interval = poll_interval
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=common.auth_headers(token),
            timeout=timeout,
            transport=transport,
        )
        self._run_sessions: dict[int, int | str] = {}

    async def __aenter__(self) -> "AsyncSDXLClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return common.answer(await self._http.request(method, path, **kwargs))

    async def create_session(self) -> int:
        return int((await self._call("GET", "/create_session"))["session_id"])

    async def session(self, session_id: int | str) -> dict[str, Any]:
        return await self._call("GET", f"/sessions/{session_id}")  # type: ignore[no-any-return]

    async def list_sessions(self, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params = {"limit": limit, "offset": offset}
        return await self._call("GET", "/list_sessions", params=params)  # type: ignore[no-any-return]

    async def delete_session(self, session_id: int | str) -> None:
        await self._call("POST", "/delete_session", json={"session_id": session_id})

    async def upload(
        self,
        session_id: int | str,
        source: Source,
        caption: str | None = None,
        on_progress: Progress | None = None,
    ) -> dict[str, Any]:
        stream = MultipartStream(parts_for(source, caption), on_progress)
        try:
            return await self._call(  # type: ignore[no-any-return]
                "POST",
                f"/sessions/{session_id}/images",
                content=stream.__aiter__(),
                headers=stream.headers,
            )
        finally:
            stream.cleanup()

    async def train(self, session_id: int | str, **fields: Any) -> dict[str, Any]:
        started = await self._call(
            "POST", "/train_lora", json=common.training_body(session_id, fields)
        )
        self._run_sessions[int(started["run_id"])] = session_id
        return started  # type: ignore[no-any-return]

    async def train_status(self, session_id: int | str) -> dict[str, Any]:
        return await self._call("POST", "/train_status", json={"session_id": session_id})  # type: ignore[no-any-return]

    async def cancel_training(self, session_id: int | str) -> dict[str, Any]:
        return await self._call("POST", "/cancel_training", json={"session_id": session_id})  # type: ignore[no-any-return]

    async def _session_of_run(self, run_id: int) -> int | str:
        if run_id in self._run_sessions:
            return self._run_sessions[run_id]
        offset = 0
        while True:
            page = await self.list_sessions(limit=100, offset=offset)
            for summary in page.get("sessions", []):
                runs = (await self.session(summary["session_id"])).get("runs", [])
                if any(run.get("run_id") == run_id for run in runs):
                    found: int | str = summary["session_id"]
                    self._run_sessions[run_id] = found
                    return found
            if len(page.get("sessions", [])) < 100:
                raise SDXLError(404, f"run {run_id} not found")
            offset += 100

    async def _open_stream(self, path: str, last_event_id: int | None) -> httpx.Response | None:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        request = self._http.build_request(
            "GET",
            path,
            headers=headers,
            timeout=common.stream_timeout(self._http.timeout),
        )
        response = await self._http.send(request, stream=True)
        if response.status_code == 404:
            await response.aclose()
            return None
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise SDXLError.from_response(response)
        return response

    async def _stream_events(
        self, path: str, last_event_id: int | None, response: httpx.Response
    ) -> AsyncIterator[Event]:
        idle_reconnects = 0
        while True:
            parser = EventParser()
            received = False
            try:
                async for line in response.aiter_lines():
                    received = True  # a heart-beat too: the stream is alive
                    event = parser.feed(line)
                    if event is None:
                        continue
                    last_event_id = event.id
                    yield event
                    if common.is_terminal(event):
                        return
            except httpx.TransportError:
                pass
            finally:
                await response.aclose()
            idle_reconnects = 0 if received else idle_reconnects + 1
            if idle_reconnects > common.MAX_RECONNECTS:
                raise SDXLError(0, f"the event stream {path} keeps closing without events")
            await asyncio.sleep(min(self.poll_interval * idle_reconnects, 5))
            reopened = await self._open_stream(path, last_event_id)
            if reopened is None:
                raise SDXLError(404, f"the event stream {path} is gone")
            response = reopened

    async def run_events(
        self, run_id: int, last_event_id: int | None = None, session_id: int | str | None = None
    ) -> AsyncIterator[Event]:
        path = common.events_url("runs", run_id)
        response = await self._open_stream(path, last_event_id)
        if response is not None:
            async for event in self._stream_events(path, last_event_id, response):
                yield event
            return
        poller = common.RunPoller(run_id, session_id or await self._session_of_run(run_id))
        while True:
            for event in poller.events(await self.train_status(poller.session_id)):
                yield event
                if common.is_terminal(event):
                    return
            await asyncio.sleep(self.poll_interval)

    async def generation_events(
        self, generation_id: int, last_event_id: int | None = None
    ) -> AsyncIterator[Event]:
        path = common.events_url("generations", generation_id)
        response = await self._open_stream(path, last_event_id)
        if response is not None:
            async for event in self._stream_events(path, last_event_id, response):
                yield event
            return
        poller = common.GenerationPoller(generation_id)
        while True:
            for event in poller.events(await self.generation_status(generation_id)):
                yield event
                if common.is_terminal(event):
                    return
            await asyncio.sleep(self.poll_interval)

    async def wait_for_run(
        self,
        run_id: int,
        on_event: EventCallback | None = None,
        session_id: int | str | None = None,
    ) -> dict[str, Any]:
        async for event in self.run_events(run_id, session_id=session_id):
            if on_event is not None:
                on_event(event)
            if common.is_terminal(event):
                session = event.data.get("data", {}).get("session_id") or session_id
                return await self.train_status(session or await self._session_of_run(run_id))
        raise SDXLError(0, f"the events of run {run_id} ended before it did")

    async def generation_status(self, generation_id: int) -> dict[str, Any]:
        return await self._call("GET", f"/generations/{generation_id}")  # type: ignore[no-any-return]

    async def wait_for_generation(
        self, generation_id: int, on_event: EventCallback | None = None
    ) -> dict[str, Any]:
        async for event in self.generation_events(generation_id):
            if on_event is not None:
                on_event(event)
            if common.is_terminal(event):
                return await self.generation_status(generation_id)
        raise SDXLError(0, f"the events of generation {generation_id} ended before it did")

    async def generate(
        self,
        prompt: str,
        *,
        loras: list[LoraRef | dict[str, Any]] | None = None,
        session_id: int | str | None = None,
        use_lora: bool | None = None,
        init_image: InitImage | None = None,
        wait: bool = True,
        on_event: EventCallback | None = None,
        **fields: Any,
    ) -> Generation:
        body = common.generation_body(prompt, loras, session_id, use_lora, init_image, fields)
        queued = await self._call("POST", "/txt2img", json=body)
        if not wait:
            return Generation.from_api(queued)
        final = await self.wait_for_generation(int(queued["generation_id"]), on_event)
        images = []
        for url in final.get("image_urls") or []:
            response = await self._http.get(url)
            if response.status_code >= 400:
                raise SDXLError.from_response(response)
            images.append(response.content)
        return Generation.from_api(final, images)

    async def cancel_generation(self, generation_id: int) -> dict[str, Any]:
        return await self._call("POST", f"/generations/{generation_id}/cancel")  # type: ignore[no-any-return]

    async def download_lora(
        self,
        session_id: int | str,
        dest: str | Path,
        filename: str | None = None,
        format: str | None = None,
    ) -> Path:
        if filename is None:
            got = await self._call("POST", "/get_lora", json={"session_id": session_id})
            filename = got["lora_filename"]
        params = {"format": format} if format else {}
        path = f"/sessions/{session_id}/loras/{filename}"
        async with self._http.stream("GET", path, params=params) as response:
            if response.status_code >= 400:
                await response.aread()
                raise SDXLError.from_response(response)
            target = _download_target(dest, response, str(filename))
            partial = target.with_name(target.name + ".tmp")
            with partial.open("wb") as file:
                async for chunk in response.aiter_bytes():
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
        os.replace(partial, target)
        return target
