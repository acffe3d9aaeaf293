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


def test_sdapi_without_steps_or_cfg_scale_samples_as_generate_does(lcm_service, tmp_path):
    """A1111's endpoints leave an LCM model at its 4 steps and guidance 4.5 (A1111's 50 / 7 are for others)."""
    import base64
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from distilsd.generate import generate
    from distilsd.serve.a1111 import a1111_defaults
    from distilsd.serve.api import create_app

    lcm_service.start()
    with TestClient(create_app(lcm_service)) as client:
        body = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 3}).json()
        explicit = client.post(
            "/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 3, "steps": 2, "cfg_scale": 3}
        ).json()
        init = body["images"][0]
        img2img = client.post(
            "/sdapi/v1/img2img", json={"prompt": "a red circle", "seed": 3, "init_images": [init]}
        ).json()
    info = json.loads(body["info"])
    assert (info["steps"], info["cfg_scale"], info["sampler_name"]) == (4, 4.5, "LCM")
    assert (body["parameters"]["steps"], body["parameters"]["cfg_scale"]) == (4, 4.5)
    assert "Steps: 4, Sampler: LCM, CFG scale: 4.5" in info["infotexts"][0]
    assert (json.loads(explicit["info"])["steps"], json.loads(explicit["info"])["cfg_scale"]) == (2, 3)
    assert json.loads(img2img["info"])["steps"] == 4

    # The image `distilsd generate` makes with the model's defaults and the same seed.
    (record,) = generate(["a red circle"], model="shapes-tiny-lcm", output_dir=tmp_path, seed=3, device="cpu",
                         progress=False)  # fmt: skip
    served = Image.open(io.BytesIO(base64.b64decode(init)))
    assert served.tobytes() == Image.open(record.path).tobytes()

    # An ordinary model keeps AUTOMATIC1111's own defaults; given values always win.
    assert a1111_defaults(lcm_service, "shapes-tiny", None, None) == (50, 7.0)
    assert a1111_defaults(lcm_service, None, None, None) == (None, None)  # the default model: the LCM
    assert a1111_defaults(lcm_service, "shapes-tiny-lcm", 8, 1.0) == (8, 1.0)


def test_webuiapi_on_the_lcm_model_gets_its_steps_unless_it_sends_some(lcm_service, caplog):
    webuiapi = pytest.importorskip("webuiapi", reason="needs the test extra: pip install -e '.[dev]'")
    from distilsd.serve.api import create_app
    from distilsd.serve.server import serve_in_thread

    lcm_service.start()
    with serve_in_thread(create_app(lcm_service), lcm_service, lcm_service.settings) as url:
        # A script that leaves sampler, steps and cfg_scale to the server (webuiapi sends them as null).
        plain = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler=None, steps=None)
        result = plain.txt2img(prompt="a red circle", seed=3, cfg_scale=None, width=64, height=64)
        assert (result.info["steps"], result.info["cfg_scale"], result.info["sampler_name"]) == (
            4,
            4.5,
            "LCM",
        )
        # webuiapi's own defaults (Euler a, 20 steps here 2, cfg 7) are explicit: respected, with a warning.
        scripted = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", steps=2)
        with caplog.at_level("WARNING"):
            result = scripted.txt2img(prompt="a red circle", seed=3, width=64, height=64)
    assert (result.info["steps"], result.info["cfg_scale"], result.info["sampler_name"]) == (
        2,
        7.0,
        "Euler a",
    )
    assert "--scheduler euler-a integrates it as an ordinary diffusion model" in caplog.text


def test_ui_compare_runs_each_model_at_its_own_steps_by_default(lcm_service):
    """Compare on a teacher and an LCM student: 25 against 4 steps unless the sliders are asked for."""
    pytest.importorskip("gradio", reason="needs the serve extra")
    from distilsd.serve.ui import PngStore, build_ui

    lcm_service.start()
    blocks = build_ui(lcm_service, lcm_service.settings, PngStore())
    own = next(block for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "compare-own")
    assert own.value is True  # an LCM model is served
    compare = next(fn.fn for fn in blocks.fns.values() if fn.api_name == "compare")

    def summary(own: bool) -> str:
        outputs = compare("a red circle", "", 3, 2.0, 7, ["shapes-tiny", "shapes-tiny-lcm"], own, [],
                          progress=lambda *a, **k: None)  # fmt: skip
        return outputs[4]

    text = summary(True)
    assert text.startswith("Seed 7, each model at its own steps.")
    assert "**shapes-tiny** (reference) (25 steps)" in text and "**shapes-tiny-lcm** (4 steps)" in text
    assert summary(False).startswith("Seed 7, 3 steps.")
