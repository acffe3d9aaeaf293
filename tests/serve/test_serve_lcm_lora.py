"""serve with an LCM-LoRA named in the prompt (``<lora:NAME:WEIGHT>``): unset steps, guidance and
scheduler become the LoRA's own (4 steps, guidance 1, lcm), as ``distilsd generate --lora`` samples
it, through the service, ``/v1``, AUTOMATIC1111's endpoints (the real ``webuiapi`` client) and the UI.
The LCM-LoRA is distilled for 2 steps from the tiny pipeline by the real trainer."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from distilsd.serve import GenerationRequest

LCM_LORA = "lcm-run"  # the run folder's name in --lora-dir: what the tag names
PROMPT = "a red circle"
SEED = 3


@pytest.fixture(scope="module")
def lora_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A --lora-dir with an LCM-LoRA run folder (distill --method lcm --lora-rank 4) and a plain LoRA."""
    from distilsd.distill import load_config, run_training
    from distilsd.distill.samples import write_shapes_folder
    from distilsd.testing import save_random_lora

    work = tmp_path_factory.mktemp("lcm-lora")
    data = write_shapes_folder(work / "data", num_images=4, size=64)
    folder = work / "loras"
    overrides = {
        "teacher": str(tiny_pipeline_dir), "method": "lcm", "lora.rank": 4, "lcm.num_ddim_timesteps": 10,
        "output_dir": str(folder / LCM_LORA), "data.source": str(data), "data.resolution": 64,
        "data.cache_dir": str(work / "latent-cache"), "train_batch_size": 2, "max_steps": 2,
        "checkpoint_every": 0, "validation.prompts": [], "progress_bar": False, "log_with": ["csv"],
    }  # fmt: skip
    run_training(load_config(overrides=overrides))
    save_random_lora(tiny_pipeline_dir, folder / "plain.safetensors", seed=1)
    return folder


@pytest.fixture(scope="module")
def generated(tiny_pipeline_dir, lora_dir, tmp_path_factory) -> Image.Image:
    """The image of ``distilsd generate PROMPT -m BASE --lora LCM_LORA --seed SEED`` (its defaults)."""
    from distilsd.cli import main

    out = tmp_path_factory.mktemp("generated")
    main(["generate", PROMPT, "-m", str(tiny_pipeline_dir), "--lora", str(lora_dir / LCM_LORA),
          "--seed", str(SEED), "-o", str(out), "--device", "cpu"])  # fmt: skip
    (path,) = out.glob("*.png")
    assert "Steps: 4, Sampler: LCM, CFG scale: 1" in Image.open(path).text["parameters"]
    return Image.open(path)


@pytest.fixture(scope="module")
def service(tiny_pipeline_dir, lora_dir):
    """A started service over its own copy of the tiny pipeline (the adapters stay out of other tests)."""
    from distilsd.serve.service import ServeSettings, Service

    settings = ServeSettings(models=[str(tiny_pipeline_dir)], device="cpu", ui=False, lora_dir=str(lora_dir))
    service = Service(settings)
    service.start()
    yield service
    service.shutdown(timeout=30)


def pixels(image_b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(image_b64))).tobytes()


def test_the_prompts_lcm_lora_gives_the_defaults_whatever_its_weight(service, caplog):
    from distilsd.errors import RequestError
    from distilsd.serve.a1111 import a1111_defaults
    from distilsd.serve.service import Service

    for weight in ("1", "0.5"):
        request = GenerationRequest(f"{PROMPT} <lora:{LCM_LORA}:{weight}>")
        service.validate(request)
        assert (request.num_inference_steps, request.guidance_scale, request.scheduler) == (4, 1.0, "lcm")
    plain = GenerationRequest(f"{PROMPT} <lora:plain:1>")
    service.validate(plain)
    assert (plain.num_inference_steps, plain.guidance_scale, plain.scheduler) == (25, 7.5, None)
    explicit = GenerationRequest(
        f"{PROMPT} <lora:{LCM_LORA}>", num_inference_steps=2, guidance_scale=3.0, scheduler="euler"
    )
    with caplog.at_level("WARNING"):
        service.validate(explicit)
    assert (explicit.num_inference_steps, explicit.guidance_scale, explicit.scheduler) == (2, 3.0, "euler")
    assert "--scheduler euler integrates it as an ordinary diffusion model" in caplog.text
    assert f"the LCM-LoRA {service.loras.find(LCM_LORA).path}" in caplog.text

    # A1111's 50 steps and cfg 7 are for the others; the LCM-LoRA's prompt leaves them to the service.
    model = service.default_model
    lcm_loras = service.prompt_loras(GenerationRequest(f"<lora:{LCM_LORA}:0.3> {PROMPT}"), model)[1]
    assert a1111_defaults(service, None, None, None, lcm_loras) == (None, None)
    assert a1111_defaults(service, None, 8, 2.0, lcm_loras) == (8, 2.0)
    plain_loras = service.prompt_loras(plain, model)[1]
    assert a1111_defaults(service, None, None, None, plain_loras) == (50, 7.0)

    # --max-steps applies to the LoRA's own steps too.
    limited = Service(dataclasses.replace(service.settings, max_steps=3), pipelines=service.pipelines)
    with pytest.raises(RequestError, match="LCM-LoRA's default of 4 steps is above this server's limit of 3"):
        limited.validate(GenerationRequest(f"{PROMPT} <lora:{LCM_LORA}:1>"))
    limited.validate(GenerationRequest(f"{PROMPT} <lora:{LCM_LORA}:1>", num_inference_steps=3))


def test_v1_and_sdapi_images_equal_generates(service, generated):
    from fastapi.testclient import TestClient

    from distilsd.serve.api import create_app

    service.start()
    tagged = f"{PROMPT} <lora:{LCM_LORA}:1>"
    with TestClient(create_app(service)) as client:
        v1 = client.post("/v1/txt2img", json={"prompt": tagged, "seed": SEED}).json()
        sdapi = client.post("/sdapi/v1/txt2img", json={"prompt": tagged, "seed": SEED}).json()
        img2img = client.post(
            "/sdapi/v1/img2img", json={"prompt": tagged, "seed": SEED, "init_images": sdapi["images"]}
        ).json()
        ordinary = client.post(
            "/sdapi/v1/txt2img", json={"prompt": tagged, "seed": SEED, "sampler_name": "Euler"}
        )
    assert (v1["num_inference_steps"], v1["guidance_scale"], v1["scheduler"]) == (4, 1.0, "lcm")
    assert pixels(v1["images"][0]["image"]) == generated.tobytes()

    info = json.loads(sdapi["info"])
    assert (info["steps"], info["cfg_scale"], info["sampler_name"]) == (4, 1.0, "LCM")
    parameters = sdapi["parameters"]
    assert (parameters["steps"], parameters["cfg_scale"], parameters["sampler_name"]) == (4, 1.0, "LCM")
    assert "Steps: 4, Sampler: LCM, CFG scale: 1" in info["infotexts"][0]
    assert pixels(sdapi["images"][0]) == generated.tobytes()

    img2img_info = json.loads(img2img["info"])
    assert (img2img_info["steps"], img2img_info["cfg_scale"], img2img_info["sampler_name"]) == (4, 1.0, "LCM")
    # A sampler given explicitly is honoured (with generate's warning): other steps, other pixels.
    assert ordinary.status_code == 200, ordinary.text
    ordinary_info = json.loads(ordinary.json()["info"])
    assert (ordinary_info["steps"], ordinary_info["sampler_name"]) == (4, "Euler")
    assert pixels(ordinary.json()["images"][0]) != generated.tobytes()


def test_webuiapi_gets_generates_image_for_the_lcm_lora(service, generated):
    webuiapi = pytest.importorskip("webuiapi", reason="needs the test extra: pip install -e '.[dev]'")
    from distilsd.serve.api import create_app
    from distilsd.serve.server import serve_in_thread

    service.start()
    with serve_in_thread(create_app(service), service, service.settings) as url:
        # A script that leaves sampler, steps and cfg_scale to the server (webuiapi sends them as null).
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler=None, steps=None)
        result = api.txt2img(
            prompt=f"<lora:{LCM_LORA}:1> {PROMPT}", seed=SEED, cfg_scale=None, width=64, height=64
        )
    assert (result.info["steps"], result.info["cfg_scale"], result.info["sampler_name"]) == (4, 1.0, "LCM")
    assert result.image.convert("RGB").tobytes() == generated.tobytes()


def test_ui_picker_moves_the_sliders_to_the_lcm_loras_own(service, generated):
    pytest.importorskip("gradio", reason="needs the serve extra")
    from distilsd.serve.ui import MODEL_SCHEDULER, PngStore, build_ui

    service.start()  # a server run before stopped it
    blocks = build_ui(service, service.settings, PngStore())
    functions = {fn.fn.__name__: fn.fn for fn in blocks.fns.values()}
    model = service.default_model
    assert functions["on_lora_added"](LCM_LORA, model, 25, 7.5) == (4, 1.0)
    assert functions["on_lora_added"]("plain", model, 25, 7.5) == (25, 7.5)  # not an LCM-LoRA: unchanged
    prompt = functions["add_lora_tag"](PROMPT, LCM_LORA, 1.0)
    _, paths, _, info, *_ = functions["generate"](
        prompt, "", 4, 1.0, SEED, 64, 64, MODEL_SCHEDULER, model, 1, [], progress=lambda *a, **k: None
    )
    assert "Steps: 4, Sampler: LCM, CFG scale: 1" in info
    assert Image.open(paths[0]).convert("RGB").tobytes() == generated.tobytes()
