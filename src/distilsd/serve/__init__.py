"""Serving: one process with a Gradio web UI and a JSON API (``distilsd serve``).

    from distilsd.serve import ServeSettings, Service, create_app

    settings = ServeSettings(models=["path/to/pipeline"])
    service = Service(settings)  # loads every model once
    app = create_app(service)  # FastAPI: /v1/txt2img, /sdapi/v1/*, /health, /metrics, /ui

The UI and the API share the service: one bounded job queue, a fixed number of worker
threads, and the pipelines loaded at start. FastAPI and Gradio are imported only here
(``pip install 'distilsd[serve]'``).
"""

from __future__ import annotations

from distilsd.serve.service import (
    GeneratedImage,
    GenerationRequest,
    Job,
    QueueFullError,
    RequestError,
    ServeSettings,
    Service,
    ServiceUnavailableError,
)

__all__ = [
    "GeneratedImage",
    "GenerationRequest",
    "Job",
    "QueueFullError",
    "RequestError",
    "ServeSettings",
    "Service",
    "ServiceUnavailableError",
    "create_app",
]


def create_app(service: Service, settings: ServeSettings | None = None):
    """The FastAPI app (API, and the UI unless ``settings.ui`` is False); see :mod:`distilsd.serve.api`."""
    from distilsd.serve.api import create_app as _create_app

    return _create_app(service, settings)
