"""distilsd on Ray Serve: the same app on many replicas, across the machines of a Ray cluster.

    distilsd serve --ray --replicas 2                       # a local Ray on 127.0.0.1
    distilsd serve --ray --autoscale 1:8 --ray-address HEAD:6379 --gpus-per-replica 1
    serve run distilsd.serve.ray:app models=shapes-tiny replicas=2   # Ray's own tools

Each replica is a Ray actor holding one :class:`~distilsd.serve.service.Service` (its models
loaded once, its bounded queue, its workers) behind the app of
:func:`distilsd.serve.api.create_app`, mounted with Ray Serve's FastAPI integration
(``@serve.ingress``, the app built on the replica after the models are loaded). Ray's proxy
routes each request to the less busy of two replicas; it sends a replica at most its
workers + queue size + a few requests (``max_ongoing_requests``), so a full replica answers
429 with Retry-After itself, exactly as ``distilsd serve`` does. Every answer names the
replica in ``X-Distilsd-Replica``; ``/health`` reports the answering replica (id, PID, node,
memory) and the states of all of them.

Imports ``ray``: only loaded for ``--ray`` (``pip install 'distilsd[ray]'``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilsd.errors import DistilSDError, InputError, MissingDependencyError

try:
    import ray
    from ray import serve
except ImportError:
    raise MissingDependencyError("ray[serve]", "ray", "distilsd serve --ray") from None

from distilsd.serve.server import REPLICA_HEADER, bind_socket
from distilsd.serve.service import ServeSettings, Service

APP_NAME = "distilsd"
DEPLOYMENT_NAME = "distilsd"
# Requests a replica takes beyond its workers and queue, so that /health, /metrics and the UI's
# pages still reach a replica whose queue is full (and generation requests get our 429 there).
EXTRA_ONGOING = 8
CONNECT_TIMEOUT_S = 3.0
STATUS_TIMEOUT_S = 5.0
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
# `serve run ... KEY=VALUE` arguments that are Ray's own options, not ServeSettings fields.
RAY_ARGS = ("replicas", "autoscale", "gpus_per_replica", "cpus_per_replica")
LIST_ARGS = ("models", "cors_origins")


@dataclass
class RaySettings:
    """Where and how many: the Ray options of ``distilsd serve --ray``."""

    replicas: int = 1
    autoscale: str | None = None  # "MIN:MAX": Ray Serve's autoscaler instead of a fixed count
    address: str | None = None  # a running cluster (HOST:PORT, ray://HOST:PORT, auto); None: start one
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0

    def validate(self) -> None:
        if self.replicas < 1:
            raise InputError(f"--replicas {self.replicas} must be >= 1")
        if self.gpus_per_replica < 0:
            raise InputError(f"--gpus-per-replica {self.gpus_per_replica:g} must be >= 0")
        if self.cpus_per_replica <= 0:
            raise InputError(f"--cpus-per-replica {self.cpus_per_replica:g} must be > 0")
        self.autoscale_range()

    def autoscale_range(self) -> tuple[int, int] | None:
        if self.autoscale is None:
            return None
        low, sep, high = str(self.autoscale).partition(":")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise InputError(f"--autoscale '{self.autoscale}' must be MIN:MAX, e.g. 1:4")
        low_n, high_n = int(low), int(high)
        if not 1 <= low_n <= high_n:
            raise InputError(f"--autoscale {self.autoscale} needs 1 <= MIN <= MAX")
        return low_n, high_n

    @property
    def min_replicas(self) -> int:
        scale = self.autoscale_range()
        return scale[0] if scale else self.replicas


def deployment_options(settings: ServeSettings, ray_settings: RaySettings) -> dict[str, Any]:
    """Ray Serve options of the deployment: replicas, per-replica limits, CPUs and GPUs."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": settings.workers + settings.queue_size + EXTRA_ONGOING,
        "ray_actor_options": {
            "num_cpus": ray_settings.cpus_per_replica,
            "num_gpus": ray_settings.gpus_per_replica,
        },
        # A replica being stopped (scale-down, redeploy) finishes the jobs it took first.
        "graceful_shutdown_timeout_s": settings.timeout_s + 5,
    }
    scale = ray_settings.autoscale_range()
    if scale is None:
        options["num_replicas"] = ray_settings.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scale[0],
            "initial_replicas": scale[0],
            "max_replicas": scale[1],
            # A replica is busy when each worker has a job running and one waiting.
            "target_ongoing_requests": 2 * settings.workers,
        }
    return options


class ReplicaHeaderMiddleware:
    """Pure ASGI middleware: every HTTP answer says which replica gave it (for debugging)."""

    def __init__(self, app: Any, replica_id: str):
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica_id.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def replica_states(app_name: str, deployment: str) -> dict[str, Any]:
    """The deployment's status and replica counts by state, from the Serve controller."""
    overview = serve.status().applications[app_name].deployments[deployment]
    states = {str(getattr(state, "value", state)): count for state, count in overview.replica_states.items()}
    return {
        "status": str(getattr(overview.status, "value", overview.status)),
        "running": states.get("RUNNING", 0),
        "states": states,
    }


@serve.ingress()
class DistilsdReplica:
    """One replica: its own Service (models loaded once, bounded queue, workers) behind the app."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.service = Service(settings)  # loads every model, once per replica
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name, self.deployment = context.app_name, context.deployment
        self.node = ray.util.get_node_ip_address()
        self.pid = os.getpid()

    def __serve_build_asgi_app__(self):
        # Called by Ray Serve after __init__, on the replica; it then runs the app's lifespan
        # (which starts the service's workers) and, on shutdown, drains them.
        from distilsd.serve.api import create_app

        app = create_app(self.service, self.settings)
        app.state.health_extra = self.health_info
        app.add_middleware(ReplicaHeaderMiddleware, replica_id=self.replica_id)
        return app

    def check_health(self) -> None:
        """Ray Serve's periodic check: a replica whose workers died is replaced."""
        if not self.service.healthy and self.service.accepting:
            raise RuntimeError("a distilsd worker thread is not running")

    async def health_info(self) -> dict[str, Any]:
        """This replica and the deployment's replica counts, added to /health."""
        import psutil

        info: dict[str, Any] = {
            "replica": {
                "id": self.replica_id,
                "pid": self.pid,
                "node": self.node,
                "rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
            }
        }
        try:
            info["replicas"] = await asyncio.wait_for(
                asyncio.to_thread(replica_states, self.app_name, self.deployment), STATUS_TIMEOUT_S
            )
        except Exception as exc:  # the controller is restarting: /health still answers
            info["replicas"] = {"status": "unknown", "detail": f"{type(exc).__name__}: {exc}"[:200]}
        return info


def build_application(settings: ServeSettings, ray_settings: RaySettings):
    """The Ray Serve application (``serve.run`` it, or return it from a builder)."""
    settings.validate()
    ray_settings.validate()
    deployment = serve.deployment(DistilsdReplica).options(**deployment_options(settings, ray_settings))
    return deployment.bind(settings)


def settings_from_args(args: dict[str, Any]) -> tuple[ServeSettings, RaySettings]:
    """``serve run`` / Serve config ``args`` -> settings; values may be strings (``replicas=2``)."""
    import pydantic

    serve_fields = {f.name for f in dataclasses.fields(ServeSettings)} - {"host", "port"}
    serve_args: dict[str, Any] = {}
    ray_args: dict[str, Any] = {}
    for key, value in (args or {}).items():
        name = key.replace("-", "_")
        if name == "model":
            name = "models"
        if name in LIST_ARGS and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if name in RAY_ARGS:
            ray_args[name] = value
        elif name in serve_fields:
            serve_args[name] = value
        elif name in ("host", "port", "address"):
            raise InputError(
                f"'{key}' is not an application argument",
                hint="set the address with Serve's own options (serve run --address, http_options in a config)",
            )
        else:
            known = ", ".join(sorted(serve_fields | set(RAY_ARGS)))
            raise InputError(f"unknown argument '{key}'", hint=f"known: {known}")
    if "api_key" not in serve_args and os.environ.get("DISTILSD_API_KEY"):
        serve_args["api_key"] = os.environ["DISTILSD_API_KEY"]  # as `distilsd serve` reads it
    try:
        settings = pydantic.TypeAdapter(ServeSettings).validate_python(serve_args)
        ray_settings = pydantic.TypeAdapter(RaySettings).validate_python(ray_args)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InputError(f"argument {where}: {error['msg']}") from None
    if settings.lora_dir:
        # Replicas run in other working directories; every node must see this path (a shared folder).
        settings.lora_dir = str(Path(settings.lora_dir).expanduser().resolve())
    return settings, ray_settings


def app(args: dict[str, Any]):
    """Ray Serve application builder: ``serve run distilsd.serve.ray:app models=shapes-tiny replicas=2``.

    ``args`` are ServeSettings fields (``models``, ``workers``, ``queue_size``, ``api_key``, ...)
    and ``replicas``, ``autoscale``, ``gpus_per_replica``, ``cpus_per_replica``; without
    ``api_key``, ``$DISTILSD_API_KEY`` is used. Serve's config file: docs/serve-ray.yaml.
    """
    return build_application(*settings_from_args(args))


# -- running it: distilsd serve --ray -------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int] | None:
    """The host and port to check for ``address``; None for ``auto`` (Ray finds the local cluster)."""
    if address == "auto":
        return None
    client = address.startswith("ray://")
    rest = address[len("ray://") :] if client else address
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, str(DEFAULT_CLIENT_PORT if client else DEFAULT_GCS_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise InputError(f"--ray-address '{address}' must be HOST:PORT, ray://HOST:PORT or auto")
    return host, int(port)


def check_reachable(address: str) -> None:
    """Fail within seconds, in one line, when nothing listens at ``address`` (ray.init would wait)."""
    target = parse_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise InputError(
            f"cannot reach the Ray cluster at {address}: {reason}",
            hint="start it there with `ray start --head`, or leave out --ray-address to start a local Ray",
        ) from None


def free_port(host: str) -> int:
    """A port free on ``host`` now (Ray's proxy binds it itself, so it cannot take a socket)."""
    sock = bind_socket(host, 0)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def check_port_free(host: str, port: int) -> None:
    try:
        bind_socket(host, port).close()
    except OSError as exc:
        raise InputError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="pick another --port"
        ) from None


def keep_on_loopback() -> None:
    """Make a local Ray use 127.0.0.1 only.

    Ray swaps 127.0.0.1 for the machine's network address so that other nodes can join; a
    local Ray is alone. Ray reads this switch at import, in each of its processes (which
    inherit the environment) and already did in this one.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_ray(ray_settings: RaySettings, log_level: str = "info") -> bool:
    """Join the cluster at ``ray_settings.address``, or start a local one on 127.0.0.1; True if started here."""
    import logging

    # Ray reports usage statistics to its authors unless told not to: nothing leaves this machine.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = {
        "include_dashboard": False,
        "log_to_driver": log_level == "debug",
        "logging_level": logging.DEBUG if log_level == "debug" else logging.WARNING,
    }
    if ray_settings.address:
        check_reachable(ray_settings.address)
        try:
            ray.init(address=ray_settings.address, **common)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DistilSDError(
                f"could not join the Ray cluster at {ray_settings.address}: {first_line}"
            ) from None
        return False
    keep_on_loopback()
    ray.init(address="local", _node_ip_address="127.0.0.1", **common)
    scale = ray_settings.min_replicas
    for resource, per_replica in (
        ("CPU", ray_settings.cpus_per_replica),
        ("GPU", ray_settings.gpus_per_replica),
    ):
        have = ray.cluster_resources().get(resource, 0)
        if per_replica * scale > have:
            ray.shutdown()
            raise InputError(
                f"{scale} replica(s) x {per_replica:g} {resource}s need {per_replica * scale:g} {resource}s; "
                f"this machine has {have:g}",
                hint="ask for fewer replicas, or lower --cpus-per-replica / --gpus-per-replica",
            )
    return True


def deploy(settings: ServeSettings, ray_settings: RaySettings, port: int) -> str:
    """Start Serve's proxy on ``settings.host:port`` and run the app; returns its URL once every replica is up."""
    serve.start(http_options={"host": settings.host, "port": port})
    try:
        serve.run(
            build_application(settings, ray_settings),
            name=APP_NAME,
            route_prefix="/",
            logging_config={"log_level": "WARNING"},
        )
    except RuntimeError as exc:
        # A replica failed to start (e.g. a model that does not load): Ray's message ends with
        # the replica's traceback, whose last line names the error.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise DistilSDError(
            "the Ray Serve deployment failed: " + (lines[-1] if lines else "unknown error"),
            hint="run with --log-level debug to see the replicas' logs",
        ) from None
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{shown}:{port}"


def serve_on_ray(
    settings: ServeSettings,
    ray_settings: RaySettings,
    on_ready: Callable[[str], None] | None = None,
    log_level: str = "info",
) -> None:
    """``distilsd serve --ray``: deploy, serve until SIGTERM / Ctrl-C, then drain and stop."""
    from distilsd.serve.api import require_serve_extra

    require_serve_extra("distilsd serve --ray")
    settings.validate()
    ray_settings.validate()
    if settings.port:
        check_port_free(settings.host, settings.port)
    port = settings.port or free_port(settings.host)
    started_here = start_ray(ray_settings, log_level)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        url = deploy(settings, ray_settings, port)
        if on_ready is not None:
            on_ready(url)
        while not stop.wait(1.0):
            pass
    finally:
        # Deleting the app stops routing to its replicas; each finishes the jobs it took, then
        # exits. On a shared cluster this process owns its app: nothing is left running there.
        try:
            serve.delete(APP_NAME)
        except Exception:  # Serve never started (the failure being reported is the real one)
            pass
        if started_here:
            serve.shutdown()
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
