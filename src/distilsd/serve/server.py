"""Running the app under uvicorn: in the foreground (``distilsd serve``) or in a thread (tests, load test).

On SIGTERM (or Ctrl-C) the server stops accepting connections and new jobs (503), lets
the running and queued jobs finish and their answers go out, then exits.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from distilsd.serve.service import ServeSettings, Service

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The answer header that names the replica behind it, where there are several (serve/ray.py).
REPLICA_HEADER = "X-Distilsd-Replica"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(app: Any, service: Service, settings: ServeSettings, log_level: str = "info"):
    """A uvicorn server whose SIGTERM / SIGINT first makes the service refuse new jobs."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.stop_accepting()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_level=log_level,
        # Open Gradio event streams would keep a graceful shutdown waiting for ever.
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
        access_log=False,
    )
    return DrainingServer(config)


def serve(
    settings: ServeSettings, on_ready: Callable[[str], None] | None = None, log_level: str = "info"
) -> None:
    """Load the models, build the app and serve it until SIGTERM / Ctrl-C."""
    from distilsd.serve.api import create_app, require_serve_extra

    require_serve_extra()
    sock = bind_socket(settings.host, settings.port)  # fail on a taken port before loading models
    service = Service(settings)
    app = create_app(service, settings)
    server = make_server(app, service, settings, log_level)
    host, port = sock.getsockname()[:2]
    if on_ready is not None:
        shown = f"[{host}]" if ":" in host else host
        on_ready(f"http://{shown}:{port}")
    server.run(sockets=[sock])


@contextmanager
def serve_in_thread(
    app: Any, service: Service, settings: ServeSettings, host: str = "127.0.0.1"
) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a background thread; yields its base URL."""
    import time

    sock = bind_socket(host, 0)
    server = make_server(app, service, settings, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
