"""Webhooks: a run's or generation's events posted to the URL its request gave.

Events are recorded in the database with the change they report (WebhookDelivery: an
outbox) and sent by a small pool of delivery threads in each worker process, never by a
web request's thread. A delivery is claimed with a lease (`webhooks_claim_due`): due ones
oldest first, by the time they became due (an expired lease counts from its expiry, so a
restart does not hand a dead worker's claims back first), and at most
SDXL_WEBHOOK_PER_HOST at once to one host, so a slow receiver holds its own share of the
threads and delays nothing but its own events. Each attempt must end within
SDXL_WEBHOOK_TIMEOUT, connect, request and the answer's headers together (a watchdog shuts
the socket down), and is retried with exponential back-off until it is answered 2xx or
SDXL_WEBHOOK_MAX_ATTEMPTS attempts were made; every outcome stays on the row (admin).

Only hosts listed in SDXL_WEBHOOK_ALLOWED_HOSTS may be targets, checked when the request
is made and again before each attempt, and redirects are not followed. Before each attempt
the host is resolved, every address it resolves to is checked (private, loopback,
link-local, shared, reserved and multicast ones refused unless SDXL_WEBHOOK_ALLOW_PRIVATE,
cloud metadata ones always), and the connection goes to the checked address while Host,
TLS SNI and the certificate check keep the name: the service cannot be made to call
internal addresses (server-side request forgery), not by DNS rebinding either. Bodies are
signed:

    X-SDXL-Signature: sha256=<hex HMAC-SHA256 of "<X-SDXL-Timestamp>.<body>" with
                      SDXL_WEBHOOK_SECRET>
"""

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections import Counter
from datetime import timedelta
from http.client import HTTPException
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3.connection
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from core.errors import ServiceError
from training_app.models import Event, Generation, TrainingRun, WebhookDelivery

logger = logging.getLogger(__name__)

WEBHOOK_EVENTS = ("started", "progress", "sample", "checkpoint", "completed", "failed")
DEFAULT_WEBHOOK_EVENTS = ("completed", "failed")
SIGNATURE_HEADER = "X-SDXL-Signature"
TIMESTAMP_HEADER = "X-SDXL-Timestamp"
EVENT_HEADER = "X-SDXL-Event"
DELIVERY_HEADER = "X-SDXL-Delivery"
# A claimed delivery whose attempt did not end this long after its deadline (its thread
# died with its worker) is due again.
_LEASE_MARGIN_S = 50
# Due deliveries read per query while claiming (the ones of hosts at their limit skipped).
_CLAIM_PAGE = 200
# Never a webhook receiver, whatever SDXL_WEBHOOK_ALLOW_PRIVATE says: cloud instance
# metadata services (AWS, GCP, Azure, OpenStack; AWS's IPv6 one; Alibaba's).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
# Progress events: one each time a run or generation passes another tenth of its steps
# (webhooks), another hundredth (event streams: a progress bar's steps).
PROGRESS_EVENTS = 10
STREAM_PROGRESS_EVENTS = 100


def webhook_target_check(url: str | None, events: list[str] | None) -> tuple[str, list[str]]:
    """The (url, events) to record for a request; ("", []) without a url. 400 when
    webhooks are off, the url is no http(s) URL, its host is not allowed, or it is an
    address refused (a name is resolved and checked before each attempt instead)."""
    if not url:
        if events:
            raise ServiceError("webhook_events needs a webhook_url")
        return "", []
    if not settings.SDXL_WEBHOOK_ALLOWED_HOSTS or not settings.SDXL_WEBHOOK_SECRET:
        raise ServiceError(
            "webhooks are off: the operator sets SDXL_WEBHOOK_ALLOWED_HOSTS and "
            "SDXL_WEBHOOK_SECRET to turn them on"
        )
    problem = _url_problem(url)
    if problem:
        raise ServiceError(f"webhook_url {problem}")
    return url, list(dict.fromkeys(events or DEFAULT_WEBHOOK_EVENTS))


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    if parts.username or parts.password:
        return "must not hold credentials (sign with SDXL_WEBHOOK_SECRET instead)"
    if not host_allowed(parts.hostname):
        return f"host {parts.hostname} is not in SDXL_WEBHOOK_ALLOWED_HOSTS"
    try:  # an address written out is checked now; a name when it is resolved, each attempt
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return None
    problem = address_problem(literal)
    return f"address {literal} is {problem}" if problem else None


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes `address` no webhook target ("private, loopback ..."), or None."""
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata service's address"
    if settings.SDXL_WEBHOOK_ALLOW_PRIVATE:
        return None
    if not address.is_global or address.is_multicast:
        return (
            "private, loopback, link-local, multicast or reserved "
            "(SDXL_WEBHOOK_ALLOW_PRIVATE allows all but metadata addresses)"
        )
    return None


def resolve_checked(host: str, port: int) -> str:
    """The address to connect to for `host`: the first it resolves to, once every one of
    them passed address_problem (a name mixing public and private addresses is refused).
    Raises _Refused saying why, OSError when the name does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    for address in addresses:
        problem = address_problem(address)
        if problem:
            raise _Refused(f"host {host} resolves to {address}, which is {problem}")
    return str(addresses[0])


class _Refused(Exception):
    """The attempt is not made: the URL's host resolved to an address refused."""


def host_allowed(host: str) -> bool:
    """`host` is listed, or is under a listed `.domain` (Django's ALLOWED_HOSTS form)."""
    host = host.lower().rstrip(".")
    for allowed in settings.SDXL_WEBHOOK_ALLOWED_HOSTS:
        allowed = allowed.lower()
        if host == allowed or (allowed.startswith(".") and host.endswith(allowed)):
            return True
    return False


def webhook_emit(
    subject: TrainingRun | Generation, event: str, data: dict[str, Any], to_webhook: bool = True
) -> None:
    """Records `event` in the subject's event log (its event stream, every run and
    generation), and for delivery if its request asked for it (and `to_webhook`: progress
    goes to webhooks each tenth of the steps, to the stream each hundredth).

    A webhook reports a cancel as "failed" (its body's status reads "cancelled"); the
    stream names it "cancelled", its payload's "event" too."""
    kind = "training" if isinstance(subject, TrainingRun) else "generation"
    now = timezone.now()
    cancelled = event == "failed" and subject.status == subject.Status.CANCELLED
    stream_event = "cancelled" if cancelled else event
    payload = {
        "event": event,
        "type": kind,
        "id": subject.pk,
        "created_at": now.isoformat(),
        "data": json.loads(json.dumps(data, default=str)),
    }
    run = subject if isinstance(subject, TrainingRun) else None
    generation = subject if isinstance(subject, Generation) else None
    Event.objects.create(
        run=run,
        generation=generation,
        name=stream_event,
        payload={**payload, "event": stream_event},
    )
    if not to_webhook or not subject.webhook_url or event not in subject.webhook_events:
        return
    WebhookDelivery.objects.create(
        event=event,
        url=subject.webhook_url,
        run=run,
        generation=generation,
        payload=payload,
        next_attempt_at=now,
    )


def progress_crossed(done: int, total: int, parts: int = PROGRESS_EVENTS) -> bool:
    """Whether step `done` of `total` passed another 1/`parts` of the steps (a progress
    event fires then: tenths for webhooks, hundredths for event streams)."""
    return bool(total) and done * parts // total > (done - 1) * parts // total


def webhooks_claim_due(slots: int) -> list[int]:
    """Claims up to `slots` due deliveries for this thread's pool; their ids.

    Due ones go oldest first by next_attempt_at, which a claim moves to the end of its
    lease: a delivery whose worker died is due again from then on, behind what became due
    before (a restart does not hand the dead worker's claims back first). A host with
    SDXL_WEBHOOK_PER_HOST deliveries under live leases is skipped. Each claim is a
    compare-and-set on (status, next_attempt_at), so one thread alone wins a delivery."""
    now = timezone.now()
    lease_ends = now + timedelta(seconds=settings.SDXL_WEBHOOK_TIMEOUT + _LEASE_MARGIN_S)
    in_flight = Counter(
        _host_key(url)
        for url in WebhookDelivery.objects.filter(
            status=WebhookDelivery.Status.SENDING, next_attempt_at__gt=now
        ).values_list("url", flat=True)
    )
    due = WebhookDelivery.objects.filter(
        status__in=(WebhookDelivery.Status.PENDING, WebhookDelivery.Status.SENDING),
        next_attempt_at__lte=now,
    ).order_by("next_attempt_at", "id")
    claimed: list[int] = []
    after: Q = Q()
    while len(claimed) < slots:
        page = list(
            due.filter(after).values_list("pk", "url", "status", "next_attempt_at")[:_CLAIM_PAGE]
        )
        for pk, url, status, due_at in page:
            host = _host_key(url)
            if in_flight[host] >= settings.SDXL_WEBHOOK_PER_HOST:
                continue
            won = WebhookDelivery.objects.filter(
                pk=pk, status=status, next_attempt_at=due_at
            ).update(
                status=WebhookDelivery.Status.SENDING, claimed_at=now, next_attempt_at=lease_ends
            )
            if won:
                claimed.append(pk)
                in_flight[host] += 1
                if len(claimed) == slots:
                    break
        if len(page) < _CLAIM_PAGE:
            break
        _, _, _, last_due_at = page[-1]
        after = Q(next_attempt_at__gt=last_due_at) | Q(
            next_attempt_at=last_due_at, pk__gt=page[-1][0]
        )
    return claimed


def _host_key(url: str) -> str:
    """What SDXL_WEBHOOK_PER_HOST counts per: the URL's host name."""
    try:
        return (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:
        return ""


def signature(body: bytes, timestamp: str, secret: str) -> str:
    """The X-SDXL-Signature value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def webhook_deliver(delivery_id: int) -> None:
    """One attempt at a delivery this thread claimed (webhooks_claim_due); its outcome is
    recorded on the row: delivered, pending again after a back-off, or failed."""
    delivery = WebhookDelivery.objects.get(pk=delivery_id)
    attempts = delivery.attempts + 1
    problem = _url_problem(delivery.url)  # the allowed hosts may have changed since
    status_code, error = None, ""
    if problem:
        error = f"not sent: webhook_url {problem}"
    else:
        try:
            status_code = _post(delivery)
            if not 200 <= status_code < 300:
                error = f"answered {status_code}"
        except _Refused as refused:
            problem = error = f"not sent: webhook_url {refused}"
        except _DeadlinePassed:
            error = (
                f"no complete answer within {settings.SDXL_WEBHOOK_TIMEOUT:g} s "
                "(SDXL_WEBHOOK_TIMEOUT)"
            )
        except (OSError, HTTPException, urllib3.exceptions.HTTPError) as exception:
            error = f"{type(exception).__name__}: {exception}"[:1000]
    now = timezone.now()
    fields: dict[str, object] = {
        "attempts": attempts,
        "last_status_code": status_code,
        "last_error": error,
    }
    if not error:
        fields |= {"status": WebhookDelivery.Status.DELIVERED, "delivered_at": now}
    elif problem or attempts >= settings.SDXL_WEBHOOK_MAX_ATTEMPTS:
        fields |= {"status": WebhookDelivery.Status.FAILED}
        logger.warning("webhook %s to %s given up: %s", delivery.pk, delivery.url, error)
    else:
        fields |= {
            "status": WebhookDelivery.Status.PENDING,
            "next_attempt_at": now + retry_delay(attempts),
        }
    WebhookDelivery.objects.filter(pk=delivery.pk).update(**fields)


def _post(delivery: WebhookDelivery) -> int:
    """POSTs the delivery's signed payload to the checked address of its URL's host, within
    SDXL_WEBHOOK_TIMEOUT in all; the answer's status (its body is not read)."""
    parts = urlsplit(delivery.url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    deadline = _Deadline(settings.SDXL_WEBHOOK_TIMEOUT)
    try:
        address = resolve_checked(host, port)
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        connection_class = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
        connection = connection_class(
            host, port, timeout=deadline.remaining(), address=address, deadline=deadline
        )
        try:
            connection.request(
                "POST",
                (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "sdxl-lora-service-webhooks",
                    EVENT_HEADER: delivery.event,
                    DELIVERY_HEADER: str(delivery.pk),
                    TIMESTAMP_HEADER: timestamp,
                    SIGNATURE_HEADER: signature(body, timestamp, settings.SDXL_WEBHOOK_SECRET),
                },
                preload_content=False,
            )
            return connection.getresponse().status
        except (OSError, HTTPException, urllib3.exceptions.HTTPError):
            if deadline.passed:
                raise _DeadlinePassed from None
            raise
        finally:
            connection.close()
    finally:
        deadline.cancel()


class _DeadlinePassed(Exception):
    """The attempt's SDXL_WEBHOOK_TIMEOUT ran out (its socket was shut down)."""


class _Deadline:
    """An attempt's total time: when it runs out a timer shuts the attempt's socket down,
    so a read or write blocked on it (a receiver trickling a byte every few seconds, each
    within the per-read timeout) returns at once."""

    def __init__(self, seconds: float):
        self._ends = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.passed = False
        self._timer = threading.Timer(seconds, self._pass)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(self._ends - time.monotonic(), 0.001)

    def watch(self, connected: socket.socket) -> None:
        """Shuts `connected` down when the time runs out. Kept as a duplicate: TLS takes
        the original's descriptor over, and shutting either down ends the connection."""
        with self._lock:
            self._socket = connected.dup()
            if self.passed:
                self._shut()

    def _pass(self) -> None:
        with self._lock:
            self.passed = True
            self._shut()

    def _shut(self) -> None:
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by the other side
                pass

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


class _PinnedHTTPConnection(urllib3.connection.HTTPConnection):
    """Connects to the address resolve_checked approved instead of resolving the host
    again (no DNS rebinding between check and connect); the host name still goes in the
    Host header (and TLS SNI and the certificate check, _PinnedHTTPSConnection). The
    deadline watches the socket."""

    def __init__(self, *args: Any, address: str, deadline: _Deadline, **kwargs: Any):
        self._address, self._deadline = address, deadline
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        connected = socket.create_connection((self._address, self.port), self._deadline.remaining())
        self._deadline.watch(connected)
        return connected


class _PinnedHTTPSConnection(_PinnedHTTPConnection, urllib3.connection.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(), **kwargs)


def retry_delay(attempts: int) -> timedelta:
    """SDXL_WEBHOOK_RETRY_BASE_S x 4^(attempts - 1): 5 s, 20 s, 80 s, 5 min, 21 min..."""
    return timedelta(seconds=settings.SDXL_WEBHOOK_RETRY_BASE_S * 4 ** (attempts - 1))
