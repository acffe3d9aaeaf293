"""The FastAPI app: distilsd's own API, the AUTOMATIC1111-compatible one, health, metrics, the UI.

Every endpoint goes through the shared :class:`~distilsd.serve.service.Service`. Errors
are JSON ``{"error", "detail", "field"}`` with the same text the CLI prints: invalid
requests are 4xx (422 for the schema, 400 for other input errors), a full queue is 429
with ``Retry-After``, shutting down is 503 and a job over its time limit 504.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at
# runtime, and the request models are local to create_app (they carry the configured limits).
import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import parse_qs

from distilsd import __version__
from distilsd.errors import DistilSDError, MissingDependencyError
from distilsd.serve.requests import decode_image, run_job, strip_data_url  # noqa: F401 (re-exported)
from distilsd.serve.service import (
    GenerationRequest,
    JobCancelledError,
    JobTimeoutError,
    QueueFullError,
    RequestError,
    ServeSettings,
    Service,
    ServiceUnavailableError,
)

SESSION_COOKIE = "distilsd_session"
MAX_BODY_BYTES = 32 * 1024 * 1024  # init images arrive base64-encoded in JSON
OPEN_PATHS = ("/health", "/login")  # reachable without the API key
API_KEY_ENV = "DISTILSD_API_KEY"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; nobody reads it


def require_serve_extra(feature: str = "distilsd serve") -> None:
    """Raise MissingDependencyError naming the install line if the ``serve`` extra is missing."""
    import importlib.util

    for package, module in (
        ("fastapi", "fastapi"),
        ("uvicorn", "uvicorn"),
        ("prometheus-client", "prometheus_client"),
    ):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(package, "serve", feature)


def status_of(exc: BaseException) -> int:
    """The HTTP status a distilsd error maps to."""
    if isinstance(exc, QueueFullError):
        return 429
    if isinstance(exc, ServiceUnavailableError):
        return 503
    if isinstance(exc, JobTimeoutError):
        return 504
    if isinstance(exc, JobCancelledError):
        return CLIENT_CLOSED_REQUEST
    if isinstance(exc, DistilSDError):
        return 400
    return 500


def error_body(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, DistilSDError):
        # RequestError is an InputError with a field; clients see the family name the CLI uses.
        name = "InputError" if isinstance(exc, RequestError) else type(exc).__name__
        return {"error": name, "detail": str(exc), "field": getattr(exc, "field", None)}
    return {"error": "InternalError", "detail": f"{type(exc).__name__}: {exc}", "field": None}


def session_token(api_key: str) -> str:
    # The UI cookie holds a digest of the key, not the key itself.
    return hmac.new(api_key.encode(), b"distilsd-ui-session", hashlib.sha256).hexdigest()


def authorized(request: Any, api_key: str | None) -> bool:
    """Whether ``request`` carries ``api_key`` (header or UI session cookie); True when none is set."""
    if not api_key:
        return True
    header = request.headers.get("authorization", "")
    given = (
        header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    )
    if given and hmac.compare_digest(given.encode(), api_key.encode()):
        return True
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_token(api_key).encode())


class GuardMiddleware:
    """Pure ASGI middleware: request size limit, API key, and metrics.

    Pure ASGI (not BaseHTTPMiddleware) so that endpoints still see a client's disconnect.
    """

    def __init__(self, app: Any, settings: ServeSettings, metrics: Any):
        self.app = app
        self.api_key = settings.api_key
        self.metrics = metrics

    def _authorized(self, request: Any) -> bool:
        return authorized(request, self.api_key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.requests import Request
        from starlette.responses import JSONResponse, RedirectResponse

        if scope["type"] != "http":
            if scope["type"] == "websocket" and self.api_key and not self._authorized(Request(scope)):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = scope["path"]
        start = time.perf_counter()
        status = {"code": 500}

        async def send_with_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                body = {
                    "error": "InputError",
                    "detail": f"the request body is over {MAX_BODY_BYTES // 2**20} MiB",
                    "field": None,
                }
                await JSONResponse(body, status_code=413)(scope, receive, send_with_status)
            elif path not in OPEN_PATHS and request.method != "OPTIONS" and not self._authorized(request):
                if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                    await RedirectResponse("/login", status_code=303)(scope, receive, send_with_status)
                else:
                    body = {
                        "error": "Unauthorized",
                        "detail": "a valid API key is needed (Authorization: Bearer KEY or X-API-Key: KEY)",
                        "field": None,
                    }
                    await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                        scope, receive, send_with_status
                    )
            else:
                await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe(scope, path, status["code"], time.perf_counter() - start)


class Metrics:
    """Prometheus metrics in a registry of their own (so several apps can live in one process)."""

    def __init__(self, service: Service):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
        from prometheus_client.core import CounterMetricFamily

        disable_created_metrics()  # the *_created series only double the output

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "distilsd_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "distilsd_request_latency_seconds",
            "HTTP request latency by endpoint, queue wait included.",
            ["endpoint"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        Gauge("distilsd_queue_depth", "Jobs waiting in the queue.", registry=self.registry).set_function(
            lambda: service.queue_depth
        )
        Gauge("distilsd_running_jobs", "Jobs being generated.", registry=self.registry).set_function(
            lambda: len(service.running_jobs)
        )
        Gauge("distilsd_workers", "Worker threads.", registry=self.registry).set(service.settings.workers)

        class JobCollector:
            def collect(self):
                jobs = CounterMetricFamily(
                    "distilsd_jobs",
                    "Finished jobs by outcome (rejected = refused with 429).",
                    labels=["outcome"],
                )
                for outcome, count in service.counts.items():
                    jobs.add_metric([outcome], count)
                yield jobs
                yield CounterMetricFamily(
                    "distilsd_images", "Images generated.", value=service.images_generated
                )

        self.registry.register(JobCollector())

    def observe(self, scope: dict, path: str, status: int, seconds: float) -> None:
        route = scope.get("route")
        if route is not None and hasattr(route, "path") and not path.startswith("/ui"):
            endpoint = route.path
        else:
            endpoint = "/ui" if path.startswith("/ui") else "other"
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>distilsd: sign in</title></head>
<body style="font-family: sans-serif; max-width: 24em; margin: 4em auto">
<h2>distilsd</h2><p>This server needs its API key.</p>{error}
<form method="post" action="/login"><input type="password" name="key" placeholder="API key" autofocus>
<button type="submit">Sign in</button></form></body></html>"""


def create_app(service: Service, settings: ServeSettings | None = None):
    """The FastAPI app over ``service``; starts its workers on startup and drains them on shutdown."""
    require_serve_extra()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from distilsd.serve.schemas import (
        ErrorBody,
        ImageOut,
        Txt2ImgResponse,
        make_schemas,
    )

    settings = settings or service.settings
    schemas = make_schemas(settings)
    metrics = Metrics(service)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        # Uvicorn calls this after the last open request finished: queued jobs are done too.
        await asyncio.get_running_loop().run_in_executor(None, service.shutdown)

    app = FastAPI(
        title="distilsd",
        version=__version__,
        description="Stable Diffusion, small and fast: distilsd's own API (/v1), the AUTOMATIC1111-compatible "
        "one (/sdapi/v1), health and Prometheus metrics. The web UI is at /ui.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    errors = {status: {"model": ErrorBody} for status in (400, 401, 422, 429, 503, 504)}

    @app.exception_handler(DistilSDError)
    async def distilsd_error(request: Request, exc: DistilSDError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
        return JSONResponse(error_body(exc), status_code=status_of(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems: list[tuple[str | None, str]] = []
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                # The location is a character offset into the body, not a field.
                reason = (error.get("ctx") or {}).get("error", "invalid")
                position = error.get("loc", ("body", "?"))[-1]
                problems.append((None, f"the body is not valid JSON ({reason} at character {position})"))
                continue
            location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query")]
            problems.append((".".join(location) or "body", error.get("msg", "invalid")))
        detail = "; ".join(f"{field}: {message}" if field else message for field, message in problems)
        return JSONResponse(
            {"error": "ValidationError", "detail": detail, "field": problems[0][0] if problems else None},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # 404, 405, and a body FastAPI cannot parse at all (not UTF-8): the same shape as every error.
        names = {400: "InputError", 404: "NotFound", 405: "MethodNotAllowed"}
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no endpoint {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 400 and "parsing the body" in detail:
            detail = "the body cannot be read as JSON (it must be UTF-8 JSON)"
        return JSONResponse(
            {"error": names.get(exc.status_code, "HTTPError"), "detail": detail, "field": None},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return JSONResponse(error_body(exc), status_code=500)

    # -- distilsd's own API -------------------------------------------------------------------

    @app.post("/v1/txt2img", response_model=Txt2ImgResponse, responses=errors, tags=["distilsd"])
    async def txt2img(body: schemas.Txt2ImgRequest, request: Request):  # type: ignore[name-defined]
        """Text to image; images come back base64-encoded with their parameters embedded."""
        generation = GenerationRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            width=body.width,
            height=body.height,
            seed=None if body.seed in (None, -1) else body.seed,
            scheduler=body.scheduler,
            model=body.model,
            batch_size=body.num_images,
            field_names={"batch_size": "num_images"},
        )
        job = await run_job(service, request, generation)
        return Txt2ImgResponse(
            images=[
                ImageOut(
                    image=base64.b64encode(i.png).decode(), seed=i.seed, parameters=i.parameters, nsfw=i.nsfw
                )
                for i in job.images
            ],
            model=job.model,
            scheduler=job.scheduler,
            width=job.width,
            height=job.height,
            num_inference_steps=job.request.num_inference_steps,
            guidance_scale=job.request.guidance_scale,
            queue_seconds=round(job.started - job.created, 4),
            run_seconds=round(job.run_seconds or 0.0, 4),
            warnings=job.warnings,
        )

    @app.get("/v1/loras", tags=["distilsd"])
    async def v1_loras():
        """The LoRAs a prompt may ask for with `<lora:NAME:WEIGHT>` (from `--lora-dir`), by name, with
        the words whose trained token embeddings each carries."""
        served = service.loras.served() if service.loras is not None else []
        return {"loras": [{"name": lora.name, "alias": lora.alias, "words": lora.words} for lora in served]}

    # -- the AUTOMATIC1111-compatible API -------------------------------------------------------

    from distilsd.serve.a1111 import add_a1111_routes

    add_a1111_routes(app, service, settings, schemas, errors)

    # -- operations -----------------------------------------------------------------------------

    @app.get("/health", tags=["operations"])
    async def health(request: Request):
        """200 while serving; 503 once shutting down (so a balancer stops sending work).

        With an API key set, a request without it gets only the status: model names and the
        version are for key holders.
        """
        body = {"status": "ok" if service.accepting else "draining"}
        if not authorized(request, settings.api_key):
            return JSONResponse(body, status_code=200 if service.accepting else 503)
        body |= {
            "version": __version__,
            "models": list(service.pipelines),
            "default_model": service.default_model,
            "workers": settings.workers,
            "queue_depth": service.queue_depth,
            "queue_size": settings.queue_size,
            "running": len(service.running_jobs),
        }
        # A deployment adds what it knows (Ray Serve: this replica and the others; serve/ray.py).
        health_extra = getattr(request.app.state, "health_extra", None)
        if health_extra is not None:
            body.update(await health_extra())
        return JSONResponse(body, status_code=200 if service.accepting else 503)

    @app.get("/metrics", tags=["operations"])
    async def prometheus_metrics():
        """Prometheus text format: requests, latency, queue depth, running jobs, jobs and images."""
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    @app.get("/login", include_in_schema=False)
    async def login_page():
        return HTMLResponse(LOGIN_PAGE.format(error=""))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0]
        if not settings.api_key or not hmac.compare_digest(key.encode(), settings.api_key.encode()):
            return HTMLResponse(
                LOGIN_PAGE.format(error="<p style='color: #b00'>Wrong key.</p>"), status_code=401
            )
        response = RedirectResponse("/ui/" if settings.ui else "/docs", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_token(settings.api_key), httponly=True, samesite="strict")
        return response

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/" if settings.ui else "/docs")

    if settings.ui:
        from distilsd.serve.ui import mount_ui

        app = mount_ui(app, service, settings)

    # Middleware added last runs first: CORS (answers preflights) -> guard (size, key, metrics).
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    return app
