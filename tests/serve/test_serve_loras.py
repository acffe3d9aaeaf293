"""LoRAs in ``distilsd serve --lora-dir``: AUTOMATIC1111's ``<lora:NAME:WEIGHT>`` tags through the real
``webuiapi`` client and the own API, the listing, the 400s, no leak between requests (one worker or
two at once), the infotext, and the web UI's picker."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def lora_pipelines(tiny_pipeline_dir):
    """The tiny pipeline loaded for these tests alone: adapters loaded here stay out of the other tests' models."""
    from distilsd.serve.service import ServeSettings, load_models

    return load_models(ServeSettings(models=[str(tiny_pipeline_dir)], device="cpu"))


@pytest.fixture(scope="module")
def lora_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """alpha (U-Net), beta (U-Net + text encoder), alpha in the kohya layout, a misfit, a pickle, a run folder."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from distilsd.lora.files import write_kohya
    from distilsd.testing import save_random_lora

    folder = tmp_path_factory.mktemp("loras")
    alpha = save_random_lora(tiny_pipeline_dir, folder / "alpha.safetensors", seed=1)
    save_random_lora(tiny_pipeline_dir, folder / "beta.safetensors", seed=2, text_encoder=True)
    write_kohya(alpha, folder / "alpha_kohya.safetensors")
    tensors = load_file(str(alpha))
    first_down = next(key for key in sorted(tensors) if key.endswith("lora.down.weight"))
    rank, features = tensors[first_down].shape
    tensors[first_down] = torch.zeros(rank, features + 8)  # made for a wider model
    save_file(tensors, str(folder / "wide.safetensors"))
    torch.save(load_file(str(alpha)), folder / "old.pt")
    (folder / "hexagon-run").mkdir()
    shutil.copyfile(alpha, folder / "hexagon-run" / "pytorch_lora_weights.safetensors")
    return folder


@pytest.fixture
def lora_service(lora_pipelines, lora_dir):
    """``make(**settings)``: a started Service over the LoRA folder; stopped after the test."""
    from distilsd.serve.service import ServeSettings, Service

    services = []

    def make(**overrides):
        settings = ServeSettings(
            models=list(lora_pipelines), device="cpu", ui=False, **{"lora_dir": str(lora_dir), **overrides}
        )
        service = Service(settings, pipelines=lora_pipelines)
        service.start()
        services.append(service)
        return service

    yield make
    for service in services:
        service.shutdown(timeout=30)


@pytest.fixture
def lora_client(lora_service):
    from fastapi.testclient import TestClient

    from distilsd.serve.api import create_app

    service = lora_service()
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client, service


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def differ(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_lora_tags_are_read_as_automatic1111_writes_them():
    from distilsd.serve.loras import LoRATag, parse_lora_tags
    from distilsd.serve.service import RequestError

    text, tags = parse_lora_tags("a <lora:alpha:0.5> cat, <lyco:beta> <lora:gamma:0.2:0.7> <x:kept>")
    assert text == "a  cat,   <x:kept>"  # cut out, as A1111 does; other brackets are text
    assert tags == [LoRATag("alpha", 0.5, 0.5), LoRATag("beta", 1.0, 1.0), LoRATag("gamma", 0.2, 0.7)]
    assert parse_lora_tags("<lora:a:te=0.3:unet=0.9>")[1] == [LoRATag("a", 0.3, 0.9)]
    assert tags[2].weight == {"unet": 0.7, "text_encoder": 0.2} and tags[0].weight == 0.5
    for bad, message in (
        ("<lora:a:heavy>", "weight 'heavy' is not a number"),
        ("<lora:a:1:dyn=4>", "dyn="),
        ("<hypernet:h:1>", "hypernetworks"),
        ("<lora:a:1:2:3>", "4 parts"),
    ):
        with pytest.raises(RequestError, match=message):
            parse_lora_tags(bad)


@pytest.mark.slow
def test_webuiapi_lists_the_folder_and_tags_change_images_without_leaking(lora_service, lora_dir):
    webuiapi = pytest.importorskip("webuiapi", reason="needs the test extra: pip install -e '.[dev]'")
    from distilsd.generate.metadata import parse_a1111_parameters
    from distilsd.serve.api import create_app
    from distilsd.serve.server import serve_in_thread

    service = lora_service()
    with serve_in_thread(create_app(service), service, service.settings) as url:
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", steps=3)
        listing = api.get_loras()
        assert sorted(item["name"] for item in listing) == [
            "alpha",
            "alpha_kohya",
            "beta",
            "hexagon-run",
            "wide",
        ]
        alpha = next(item for item in listing if item["name"] == "alpha")
        assert set(alpha) == {"name", "alias", "path", "metadata"} and alpha["alias"] == "alpha"
        assert alpha["path"] == str(lora_dir / "alpha.safetensors") and isinstance(alpha["metadata"], dict)

        def image(prompt: str, **extra) -> np.ndarray:
            result = api.txt2img(prompt=prompt, seed=5, width=64, height=64, cfg_scale=5, **extra)
            return np.asarray(result.image.convert("RGB"), dtype=np.int16), result

        plain, _ = image(PROMPT)
        tagged, result = image(f"{PROMPT} <lora:alpha:1>")
        assert differ(tagged, plain) > 8, "the LoRA must change the image"
        assert differ(image(f"{PROMPT} <lora:alpha:0>")[0], plain) == 0
        assert differ(image(PROMPT)[0], plain) == 0, "the previous request's LoRA leaked"
        assert differ(image(f"{PROMPT} <lora:alpha>")[0], tagged) == 0  # weight 1 by default
        # The kohya file and the run folder hold the same adapter: the same image.
        assert differ(image(f"{PROMPT} <lora:alpha_kohya:1>")[0], tagged) <= 1
        assert differ(image(f"{PROMPT} <lora:hexagon-run:1>")[0], tagged) == 0
        mixed, _ = image(f"{PROMPT} <lora:alpha:0.6> <lora:beta:0.8>")
        assert differ(mixed, tagged) > 8
        # The infotext keeps the tags in the prompt and names the files' hashes, as A1111 writes it.
        fields = parse_a1111_parameters(result.info["infotexts"][0])
        assert fields["prompt"] == f"{PROMPT} <lora:alpha:1>"
        assert (
            fields["Lora hashes"].startswith("alpha: ") and len(fields["Lora hashes"]) == len("alpha: ") + 12
        )
        assert result.info["extra_generation_params"]["Lora hashes"] == fields["Lora hashes"]
        assert result.image.info["parameters"] == result.info["infotexts"][0]
        # img2img reads the tags too.
        init = Image.fromarray(plain.astype(np.uint8))
        i2i = [
            np.asarray(
                api.img2img(images=[init], prompt=prompt, seed=3, denoising_strength=0.8, cfg_scale=5).image,
                dtype=np.int16,
            )
            for prompt in (PROMPT, f"{PROMPT} <lora:alpha:1>")
        ]
        assert differ(*i2i) > 8


def test_own_api_tags_listing_and_errors(lora_client):
    client, service = lora_client
    body = {"prompt": PROMPT, "seed": 5, "num_inference_steps": 3, "guidance_scale": 5}
    assert [item["name"] for item in client.get("/v1/loras").json()["loras"]] == [
        "alpha", "alpha_kohya", "beta", "hexagon-run", "wide",
    ]  # fmt: skip
    hash_before = service.model_hash(service.default_model)

    def image(prompt: str) -> np.ndarray:
        response = client.post("/v1/txt2img", json={**body, "prompt": prompt})
        assert response.status_code == 200, response.text
        return pixels(response.json()["images"][0]["image"])

    plain = image(PROMPT)
    tagged = image(f"{PROMPT} <lora:beta:0.9>")
    assert differ(tagged, plain) > 8
    assert differ(image(f"{PROMPT} <lora:beta:0>"), plain) == 0
    # beta adapts the text encoder too: its weight and the U-Net's apply apart, neither leaks.
    text_encoder_only = image(f"{PROMPT} <lora:beta:0.9:0>")
    assert differ(text_encoder_only, plain) > 8 and differ(image(f"{PROMPT} <lora:beta:0:0.9>"), tagged) > 8
    assert differ(image(PROMPT), plain) == 0
    # A loaded adapter is not part of the model's weights.
    service._hashes.clear()
    assert service.model_hash(service.default_model) == hash_before

    for endpoint, prompt, text in (
        ("/v1/txt2img", f"{PROMPT} <lora:missing:1>", "LoRA 'missing' is not served here"),
        ("/sdapi/v1/txt2img", f"{PROMPT} <lora:missing:1>", "LoRA 'missing' is not served here"),
        ("/sdapi/v1/txt2img", f"{PROMPT} <lora:wide:1>", "does not fit this model: unet module"),
        ("/v1/txt2img", f"{PROMPT} <lora:old:1>", "is a pickle"),
    ):
        sent = {**body, "prompt": prompt} if endpoint == "/v1/txt2img" else {"prompt": prompt, "steps": 3}
        response = client.post(endpoint, json=sent)
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["field"] == "prompt" and text in error["detail"], error
    missing = client.post("/sdapi/v1/txt2img", json={"prompt": "<lora:missing>", "steps": 2}).json()
    assert "served LoRAs (GET /sdapi/v1/loras): alpha, alpha_kohya, beta" in missing["detail"]
    wide = client.post("/v1/txt2img", json={**body, "prompt": "<lora:wide>"}).json()["detail"]
    assert "input features, the LoRA has" in wide
    negative = client.post(
        "/sdapi/v1/txt2img", json={"prompt": "x", "negative_prompt": "<lora:alpha:1>", "steps": 2}
    )
    assert negative.status_code == 400 and negative.json()["field"] == "negative_prompt"


def test_a_server_without_lora_dir_says_so(make_client):
    client, _ = make_client()
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a <lora:alpha:1>", "steps": 2})
    assert response.status_code == 400 and "serves no LoRAs" in response.json()["detail"]
    assert client.get("/sdapi/v1/loras").json() == []


def test_two_workers_never_mix_their_requests_loras(lora_service):
    """Jobs with and without a LoRA in flight at once: each image is the one it makes alone."""
    from distilsd.serve.service import GenerationRequest

    service = lora_service(workers=2, torch_threads=1)
    prompts = [
        PROMPT,
        f"{PROMPT} <lora:alpha:1>",
        f"{PROMPT} <lora:beta:0.7>",
        f"{PROMPT} <lora:alpha:1>",
        PROMPT,
    ]

    def request(prompt: str) -> GenerationRequest:
        return GenerationRequest(prompt, num_inference_steps=4, guidance_scale=5.0, seed=9)

    alone = {}
    for prompt in dict.fromkeys(prompts):
        alone[prompt] = service.submit(request(prompt)).result()[0].png
    jobs = [service.submit(request(prompt)) for prompt in prompts]  # queued together: both workers busy
    for prompt, job in zip(prompts, jobs, strict=True):
        got = np.asarray(Image.open(io.BytesIO(job.result()[0].png)), dtype=np.int16)
        want = np.asarray(Image.open(io.BytesIO(alone[prompt])), dtype=np.int16)
        assert differ(got, want) == 0, prompt


def test_adapter_gate_runs_one_mix_at_a_time_in_arrival_order():
    from distilsd.serve.loras import AdapterGate

    gate = AdapterGate(pipeline=object())
    gate._switch = lambda *args: None  # the order is under test, not diffusers
    log, inside = [], threading.Event()
    a, b = ((("a", 0, 0), 1.0, 1.0),), ((("b", 0, 0), 1.0, 1.0),)

    def job(name, mix, hold):
        with gate.use(mix, {}, False, lambda: None):
            log.append(f"{name} in ({gate.users})")
            if hold:
                inside.set()
                hold.wait(5)
            log.append(f"{name} out")

    release = threading.Event()
    first = threading.Thread(target=job, args=("a1", a, release))
    first.start()
    assert inside.wait(5)
    waiting_b = threading.Thread(target=job, args=("b1", b, None))
    waiting_b.start()
    while not gate._waiting:
        pass
    late_a = threading.Thread(target=job, args=("a2", a, None))  # same mix as the running one, but b waits
    late_a.start()
    while len(gate._waiting) < 2:
        pass
    release.set()
    for thread in (first, waiting_b, late_a):
        thread.join(5)
    assert log == ["a1 in (1)", "a1 out", "b1 in (1)", "b1 out", "a2 in (1)", "a2 out"]


def test_ui_picker_adds_the_tag_and_generates_with_it(lora_service):
    pytest.importorskip("gradio", reason="needs the serve extra")
    from distilsd.serve.ui import PngStore, add_lora_tag, build_ui

    service = lora_service()
    blocks = build_ui(service, service.settings, PngStore())
    dropdown = next(
        block for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "lora-pick"
    )
    assert [choice[0] for choice in dropdown.choices] == [
        "alpha",
        "alpha_kohya",
        "beta",
        "hexagon-run",
        "wide",
    ]
    functions = {fn.api_name: fn.fn for fn in blocks.fns.values()}
    prompt = functions["add_lora"](PROMPT, "alpha", 0.8)
    assert prompt == f"{PROMPT} <lora:alpha:0.8>"
    assert add_lora_tag(prompt, "alpha", 1.0) == f"{PROMPT} <lora:alpha:1>"  # a second pick re-weighs it
    assert add_lora_tag("", "beta", 0.5) == "<lora:beta:0.5>"

    def generate(text):
        gallery, paths, seed, info, *_ = functions["generate"](
            text,
            "",
            3,
            5.0,
            5,
            64,
            64,
            "model default",
            service.default_model,
            1,
            [],
            progress=lambda *a, **k: None,
        )
        return np.asarray(Image.open(paths[0]).convert("RGB"), dtype=np.int16), info

    plain, _ = generate(PROMPT)
    tagged, info = generate(prompt)
    assert differ(tagged, plain) > 8 and info.startswith(f"{PROMPT} <lora:alpha:0.8>\n")
    assert "Lora hashes: " in info


def test_serve_cli_checks_the_lora_folder(run_cli, tmp_path):
    code, _, err = run_cli(["serve", "--lora-dir", str(tmp_path / "nowhere"), "--model", "tiny-random"])
    assert code != 0 and err.strip().splitlines()[0].startswith("error: --lora-dir"), err
    code, _, err = run_cli(["serve", "--allow-pickle", "--model", "tiny-random"])
    assert code != 0 and "error: --allow-pickle applies to --lora-dir" in err and "Traceback" not in err
    code, _, err = run_cli(["serve", "--lora-skip-unknown", "--model", "tiny-random"])
    assert code != 0 and "error: --lora-skip-unknown applies to --lora-dir" in err and "Traceback" not in err
    code, _, err = run_cli(
        ["serve", "--lora-dir", str(tmp_path), "--max-loaded-loras", "0", "--model", "tiny-random"]
    )
    assert code != 0 and "error: --max-loaded-loras 0 must be >= 1" in err and "Traceback" not in err


def adapters_on(pipeline) -> set[str]:
    """The peft adapters loaded into a pipeline's U-Net and text encoder."""
    return {
        name
        for module in (pipeline.unet, pipeline.text_encoder)
        for name in getattr(module, "peft_config", {})
    }


def test_lora_skip_unknown_loads_the_matching_modules_else_a_400_names_the_lora(lora_service, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from distilsd.serve.service import GenerationRequest, RequestError

    source = Path(lora_service().settings.lora_dir)
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copyfile(source / "alpha.safetensors", folder / "alpha.safetensors")
    tensors = load_file(str(source / "alpha.safetensors"))
    tensors["unet.no_such_block.to_q.lora.down.weight"] = torch.zeros(4, 8)  # made for another model
    tensors["unet.no_such_block.to_q.lora.up.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(folder / "extra.safetensors"))

    def image(service, prompt):
        request = GenerationRequest(prompt, num_inference_steps=3, guidance_scale=5.0, seed=4)
        return np.asarray(Image.open(io.BytesIO(service.submit(request).result()[0].png)), dtype=np.int16)

    strict = lora_service(lora_dir=str(folder))
    with pytest.raises(RequestError) as refused:
        strict.submit(GenerationRequest(f"{PROMPT} <lora:extra:1>", num_inference_steps=3))
    assert refused.value.field == "prompt"
    assert (
        "LoRA 'extra'" in refused.value.message
        and "1 modules this model does not have" in refused.value.message
    )
    assert "--lora-skip-unknown" in refused.value.hint

    lenient = lora_service(lora_dir=str(folder), lora_skip_unknown=True)
    # The unknown module is dropped: the image of the LoRA without it (loaded through the kohya
    # layout, which keeps the file's alpha: within 1/255, as the kohya file of test_webuiapi_...).
    assert differ(image(lenient, f"{PROMPT} <lora:extra:1>"), image(lenient, f"{PROMPT} <lora:alpha:1>")) <= 1
    assert differ(image(lenient, f"{PROMPT} <lora:extra:1>"), image(lenient, PROMPT)) > 8


def test_a_request_after_a_lora_is_the_base_models_and_adapters_do_not_pile_up(
    lora_service, lora_dir, tiny_pipeline_dir, tmp_path
):
    """Exactly the image of a model that never saw a LoRA; at most --max-loaded-loras adapters stay loaded."""
    import os

    from distilsd.generate import generate
    from distilsd.serve.service import GenerationRequest

    (record,) = generate([PROMPT], model=str(tiny_pipeline_dir), output_dir=tmp_path / "base", seed=4,
                         num_inference_steps=3, guidance_scale=5.0, device="cpu", progress=False)  # fmt: skip
    base = np.asarray(Image.open(record.path), dtype=np.int16)
    service = lora_service(max_loaded_loras=1)
    pipeline = service.pipelines[service.default_model].pipeline

    def image(prompt):
        request = GenerationRequest(prompt, num_inference_steps=3, guidance_scale=5.0, seed=4)
        return np.asarray(Image.open(io.BytesIO(service.submit(request).result()[0].png)), dtype=np.int16)

    seen = {}
    for prompt in [f"{PROMPT} <lora:alpha:1>", PROMPT, f"{PROMPT} <lora:beta:0.8>", PROMPT,
                   f"{PROMPT} <lora:alpha:1>", f"{PROMPT} <lora:beta:0.8>", PROMPT]:  # fmt: skip
        got = image(prompt)
        if prompt == PROMPT:
            assert differ(got, base) == 0, "the previous request's LoRA leaked into a request without one"
        else:
            assert differ(got, base) > 8
            assert prompt not in seen or differ(got, seen[prompt]) == 0, "an unloaded LoRA came back changed"
            seen[prompt] = got
        assert len(adapters_on(pipeline)) <= 1, adapters_on(pipeline)
    # A mix of two LoRAs still gets both; the limit applies between requests.
    assert differ(image(f"{PROMPT} <lora:alpha:1> <lora:beta:0.8>"), base) > 8
    assert len(adapters_on(pipeline)) == 2
    assert differ(image(PROMPT), base) == 0

    # A LoRA file rewritten in place replaces its old adapter instead of adding one.
    unlimited = lora_service()
    image(f"{PROMPT} <lora:alpha:1>")
    before = adapters_on(pipeline)
    alpha = lora_dir / "alpha.safetensors"
    os.utime(alpha, ns=(alpha.stat().st_atime_ns, alpha.stat().st_mtime_ns + 1_000_000))
    unlimited.loras.refresh()
    request = GenerationRequest(f"{PROMPT} <lora:alpha:1>", num_inference_steps=3, guidance_scale=5.0, seed=4)
    assert differ(np.asarray(Image.open(io.BytesIO(unlimited.submit(request).result()[0].png)), dtype=np.int16),
                  seen[f"{PROMPT} <lora:alpha:1>"]) == 0  # fmt: skip
    assert len(adapters_on(pipeline)) == len(before)
