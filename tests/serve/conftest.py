"""Fixtures for the serving tests: the tiny pipeline loaded once, apps built over it per test."""

from __future__ import annotations

import importlib.util
import os

import pytest

SERVE_EXTRA_MISSING = (
    importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("gradio") is None
)
if SERVE_EXTRA_MISSING and os.environ.get("CI", "").lower() in ("1", "true"):
    # `make install` installs the serve extra (through dev): CI must run these tests, not skip them.
    raise RuntimeError("the serve tests need the serve extra in CI: pip install -e '.[dev]'")


def pytest_collection_modifyitems(config, items):
    if SERVE_EXTRA_MISSING:
        skip = pytest.mark.skip(reason="needs the serve extra: pip install 'distilsd[serve]'")
        for item in items:
            if "tests/serve/" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def pipelines(tiny_pipeline_dir):
    """Two served models: the tiny pipeline, and the same with its U-Net swapped in (BASE::UNET)."""
    from distilsd.serve.service import ServeSettings, load_models

    return load_models(
        ServeSettings(
            models=[str(tiny_pipeline_dir), f"{tiny_pipeline_dir}::{tiny_pipeline_dir}"], device="cpu"
        )
    )


@pytest.fixture
def make_service(pipelines):
    """Build a started Service with these settings (sharing the loaded pipelines); stopped after the test."""
    from distilsd.serve.service import ServeSettings, Service

    services = []

    def make(**overrides):
        settings = ServeSettings(models=list(pipelines), device="cpu", **{"ui": False, **overrides})
        service = Service(settings, pipelines=pipelines)
        service.start()
        services.append(service)
        return service

    yield make
    for service in services:
        for job in service.running_jobs:
            service.cancel(job)
        service.shutdown(timeout=30)


@pytest.fixture
def make_client(make_service):
    """A TestClient over a fresh app: ``make_client(api_key="k", max_steps=10)``; returns (client, service)."""
    from fastapi.testclient import TestClient

    from distilsd.serve.api import create_app

    clients = []

    def make(**overrides):
        service = make_service(**overrides)
        client = TestClient(create_app(service), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client, service

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()[0]
