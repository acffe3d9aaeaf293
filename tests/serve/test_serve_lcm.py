"""serve on an LCM model: requests without steps or guidance get the model's own (4 LCM steps, 4.5)."""

from __future__ import annotations

import pytest

from distilsd.serve import GenerationRequest


@pytest.fixture(scope="module")
def lcm_service():
    from distilsd.serve.service import ServeSettings, Service

    service = Service(ServeSettings(models=["shapes-tiny-lcm", "shapes-tiny"], device="cpu", ui=False))
    yield service
    service.shutdown(timeout=30)


def test_serve_defaults_to_the_lcm_models_steps_and_warns_of_another_scheduler(lcm_service, caplog):
    request = GenerationRequest("a red circle")
    assert lcm_service.validate(request) == "shapes-tiny-lcm"
    assert (request.num_inference_steps, request.guidance_scale) == (4, 4.5)
    assert lcm_service.model_defaults("shapes-tiny") == (25, 4.5)  # not an LCM: generate's 25
    request = GenerationRequest("a red circle", model="shapes-tiny")
    lcm_service.validate(request)
    assert request.num_inference_steps == 25
    explicit = GenerationRequest("a red circle", num_inference_steps=2, guidance_scale=3.0, scheduler="euler")
    with caplog.at_level("WARNING"):
        lcm_service.validate(explicit)
    assert (explicit.num_inference_steps, explicit.guidance_scale) == (2, 3.0)
    assert "--scheduler euler integrates it as an ordinary diffusion model" in caplog.text


def test_v1_txt2img_on_the_lcm_model_runs_its_4_steps(lcm_service):
    from fastapi.testclient import TestClient

    from distilsd.serve.api import create_app

    lcm_service.start()
    with TestClient(create_app(lcm_service)) as client:
        body = client.post("/v1/txt2img", json={"prompt": "a red circle", "seed": 0}).json()
    assert (body["model"], body["num_inference_steps"], body["guidance_scale"]) == ("shapes-tiny-lcm", 4, 4.5)
    assert body["scheduler"] == "lcm"
