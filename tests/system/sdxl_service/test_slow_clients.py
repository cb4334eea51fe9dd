"""Slow clients hold no web thread (issue 26, slowloris): with 300 connections open that
send their request slowly, half their headers a line every ~2 s, half a declared 100 KB
body a byte at a time, the real web server (serve's own processes and threads) still
answers /healthz and /list_sessions in under a second each, the slow connections still
open. gunicorn's threaded workers (2 x 32 threads, a thread per connection) answered
neither while 64 such connections were open."""

import resource
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

pytestmark = pytest.mark.e2e

SLOW_CLIENTS = 300
LINE_EVERY_S = 2.0
BYTE_EVERY_S = 0.5
DECLARED_BODY = 100 * 1024
# Long enough for each slow client to send more after its start (a server that gives a
# thread per connection has then given them all away), well within the web server's
# deadlines for a head (10 s) and a body (20 s).
TRICKLE_BEFORE_S = 2.5
LIMIT_S = 1.0


class SlowClients:
    """SLOW_CLIENTS connections to `address`, each sending its request a little at a
    time from one thread until stopped."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sockets: list[socket.socket] = []
        for number in range(SLOW_CLIENTS):
            sock = socket.create_connection(address, timeout=10)
            if number % 2:
                head = (
                    f"POST /train_status HTTP/1.1\r\nHost: slow\r\nContent-Type: "
                    f"application/json\r\nContent-Length: {DECLARED_BODY}\r\n\r\n"
                )
            else:
                head = "GET /healthz HTTP/1.1\r\nHost: slow\r\n"
            sock.sendall(head.encode())
            self.sockets.append(sock)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._trickle)
        self.thread.start()

    def _trickle(self) -> None:
        next_line = time.monotonic() + LINE_EVERY_S
        while not self.stopped.wait(BYTE_EVERY_S):
            line = time.monotonic() >= next_line
            if line:
                next_line += LINE_EVERY_S
            for number, sock in enumerate(self.sockets):
                try:
                    if number % 2:
                        sock.sendall(b" ")  # JSON allows whitespace anywhere
                    elif line:
                        sock.sendall(f"X-Slow-{number}: still coming\r\n".encode())
                except OSError:
                    pass  # closed by the server: still_open() tells

    def still_open(self) -> int:
        """How many connections the server has neither answered nor closed."""
        count = 0
        for sock in self.sockets:
            sock.setblocking(False)  # a socket with a timeout would wait for an answer
            try:
                sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:  # nothing to read: still waiting for the rest
                count += 1
            except OSError:
                pass
        return count

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def close(self) -> None:
        self.stop()
        for sock in self.sockets:
            sock.close()


def _timed_get(url: str) -> tuple[float, int | str]:
    started = time.monotonic()
    try:
        answer: int | str = requests.get(url, timeout=5).status_code
    except requests.RequestException as error:
        answer = type(error).__name__
    return round(time.monotonic() - started, 3), answer


def test_300_slow_clients_hold_no_thread(service_processes):
    # This process holds the slow clients' sockets (the web server raises its own limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    server = service_processes.gunicorn()  # serve's processes and threads
    address = urlsplit(server)
    slow = SlowClients((address.hostname, address.port))
    try:
        time.sleep(TRICKLE_BEFORE_S)
        timings = {
            path: [_timed_get(f"{server}{path}") for _ in range(3)]
            for path in ("/healthz", "/list_sessions")
        }
        slow.stop()
        open_after = slow.still_open()
    finally:
        slow.close()

    print(f"(seconds, status) with {open_after} slow clients open: {timings}")
    assert all(answer == 200 for runs in timings.values() for _, answer in runs), timings
    assert all(took < LIMIT_S for runs in timings.values() for took, _ in runs), timings
    assert open_after == SLOW_CLIENTS
