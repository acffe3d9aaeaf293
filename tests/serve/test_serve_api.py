"""The JSON API, in-process: every endpoint, every limit, the error bodies, auth, CORS, the queue."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import pytest
from PIL import Image

from distilsd.schedulers import SCHEDULERS
from distilsd.serve import GenerationRequest

STEPS = 2  # denoising steps of the fast requests: the tiny model makes noise at any count


def png_of(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def b64_png(size=(64, 64), color=(200, 30, 30), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def long_job(service, steps=150):
    """A real job that keeps the single worker busy until cancelled."""
    job = service.submit(GenerationRequest("busy", num_inference_steps=steps, seed=0, scheduler="ddim"))
    deadline = time.monotonic() + 30
    while job.status == "queued" and time.monotonic() < deadline:
        time.sleep(0.01)
    return job


# -- distilsd's own API ---------------------------------------------------------------------


def test_v1_txt2img_matches_distilsd_generate(client, tiny_pipeline_dir, tmp_path):
    from distilsd.generate import generate

    response = client.post(
        "/v1/txt2img",
        json={"prompt": "a red circle", "num_inference_steps": STEPS, "seed": 5, "num_images": 2},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [image["seed"] for image in body["images"]] == [5, 6]
    assert (body["width"], body["height"], body["scheduler"], body["model"]) == (64, 64, "pndm", "pipeline")
    assert body["run_seconds"] > 0 and body["queue_seconds"] >= 0
    for k, image in enumerate(body["images"]):
        png = png_of(image["image"])
        assert png.size == (64, 64)
        assert png.text["parameters"] == image["parameters"]
        assert f"Seed: {5 + k}, Size: 64x64" in image["parameters"]

    # The same image `distilsd generate` writes for the same settings, byte for byte.
    records = generate(["a red circle"], model=str(tiny_pipeline_dir), output_dir=tmp_path, seed=5, num_inference_steps=STEPS,
                       num_images_per_prompt=2, batch_size=2, device="cpu", progress=False)  # fmt: skip
    for record, image in zip(records, body["images"], strict=True):
        with open(record.path, "rb") as f:
            assert f.read() == base64.b64decode(image["image"])


def test_v1_names_a_prompt_cut_to_the_text_encoders_window(client):
    long_prompt = "a red circle above a blue square " * 12  # 84 CLIP tokens + start and end
    body = client.post(
        "/v1/txt2img", json={"prompt": long_prompt, "num_inference_steps": 1, "seed": 0}
    ).json()
    assert len(body["warnings"]) == 1
    assert (
        "is 86 tokens long; the text encoder reads 77, so its last 9 tokens are dropped "
        "('blue square a red circle above a blue square')" in body["warnings"][0]
    )
    short = client.post("/v1/txt2img", json={"prompt": "a cat", "num_inference_steps": 1, "seed": 0}).json()
    assert short["warnings"] == []


def test_v1_random_seed_scheduler_and_second_model(client):
    body = client.post(
        "/v1/txt2img",
        json={
            "prompt": "x",
            "num_inference_steps": STEPS,
            "scheduler": "euler-a",
            "model": "pipeline+unet:pipeline",
            "width": 72,
            "height": 64,
        },
    ).json()
    assert body["scheduler"] == "euler-a" and body["model"] == "pipeline+unet:pipeline"
    assert png_of(body["images"][0]["image"]).size == (72, 64)
    assert "Sampler: Euler a" in body["images"][0]["parameters"]
    assert 0 <= body["images"][0]["seed"] < 2**32  # no seed given: a random one, reported
    assert body["guidance_scale"] == 7.5 and "CFG scale: 7.5" in body["images"][0]["parameters"]


LIMITS = {"max_size": 128, "max_steps": 10, "max_images": 2, "max_prompt_length": 20}


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"num_inference_steps": 11}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"width": 136}, "width"),
        ({"height": 56}, "height"),
        ({"width": 100}, "width"),  # not a multiple of 8
        ({"num_images": 3}, "num_images"),
        ({"prompt": "x" * 21}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"negative_prompt": "x" * 21}, "negative_prompt"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"seed": -2}, "seed"),
        ({"steps": 5}, "steps"),  # not a field of this schema: refused, not ignored
        ({"num_inference_steps": "many"}, "num_inference_steps"),
    ],
)
def test_v1_limits_and_schema_errors_name_the_field(make_client, payload, field):
    client, _ = make_client(**LIMITS)
    response = client.post("/v1/txt2img", json={"prompt": "ok", "num_inference_steps": STEPS, **payload})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "ValidationError" and body["field"] == field and field in body["detail"]


@pytest.mark.parametrize(
    "payload, field, text",
    [
        ({"scheduler": "nope"}, "scheduler", "unknown scheduler 'nope' (choose one of: pndm"),
        (
            {"model": "../../etc/passwd"},
            "model",
            "model '../../etc/passwd' is not served here (served models: pipeline, pipeline+unet:pipeline)",
        ),
    ],
)
def test_v1_input_errors_are_400_with_the_cli_text(client, payload, field, text):
    response = client.post("/v1/txt2img", json={"prompt": "ok", "num_inference_steps": STEPS, **payload})
    assert response.status_code == 400
    assert response.json() == {"error": "InputError", "detail": response.json()["detail"], "field": field}
    assert response.json()["detail"].startswith(text)


def test_malformed_json_is_422(client):
    response = client.post("/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"] == "ValidationError"


# -- the AUTOMATIC1111-compatible API ---------------------------------------------------------


def test_sdapi_txt2img_response_fields(client):
    request = {"prompt": "a blue square", "negative_prompt": "red", "steps": STEPS, "cfg_scale": 6, "seed": 42,
               "sampler_name": "Euler a", "batch_size": 2, "n_iter": 2, "width": 64, "height": 64,
               "restore_faces": False, "styles": []}  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    assert len(body["images"]) == 4 and all(png_of(image).size == (64, 64) for image in body["images"])
    assert body["parameters"]["prompt"] == "a blue square" and body["parameters"]["steps"] == STEPS
    info = json.loads(body["info"])
    assert info["seed"] == 42 and info["all_seeds"] == [42, 43, 44, 45]
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6 and info["steps"] == STEPS
    assert info["all_prompts"] == ["a blue square"] * 4 and info["negative_prompt"] == "red"
    assert info["sd_model_name"] == "pipeline" and info["styles"] == []
    assert len(info["infotexts"]) == 4 and "Seed: 45" in info["infotexts"][3]
    assert png_of(body["images"][3]).text["parameters"] == info["infotexts"][3]


def test_sdapi_txt2img_defaults_model_override_and_send_images(client):
    body = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "x", "steps": STEPS, "send_images": False, "override_settings": {"sd_model_checkpoint": "pipeline+unet:pipeline"},
              "sampler_index": "DDIM"},
    ).json()  # fmt: skip
    info = json.loads(body["info"])
    assert body["images"] == [] and info["sd_model_name"] == "pipeline+unet:pipeline"
    assert info["sampler_name"] == "DDIM" and info["seed"] >= 0  # seed -1 (the default) draws one
    assert (info["width"], info["height"]) == (64, 64)  # the model's native size when not given


@pytest.mark.parametrize(
    "payload, status, field",
    [
        ({"steps": 11}, 422, "steps"),
        ({"cfg_scale": -0.5}, 422, "cfg_scale"),
        ({"width": 256}, 422, "width"),
        ({"batch_size": 3}, 422, "batch_size"),
        ({"batch_size": 2, "n_iter": 2}, 400, "batch_size"),  # 4 images > max_images 2
        ({"prompt": "y" * 21}, 422, "prompt"),
        ({"seed": -5}, 422, "seed"),
        ({"sampler_name": "DPM++ 3M Karras"}, 400, "sampler_name"),
        (
            {"override_settings": {"sd_model_checkpoint": "sd-v1-5.ckpt"}},
            400,
            "override_settings.sd_model_checkpoint",
        ),
    ],
)
def test_sdapi_limits(make_client, payload, status, field):
    client, _ = make_client(**LIMITS)
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "ok", "steps": STEPS, **payload})
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert field.split(".")[-1] in response.json()["detail"]


def test_sdapi_img2img_and_inpaint(client):
    base = {
        "prompt": "x",
        "steps": 4,
        "seed": 1,
        "denoising_strength": 0.5,
        "init_images": [b64_png((80, 64))],
    }
    response = client.post("/sdapi/v1/img2img", json=base)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert (info["width"], info["height"]) == (80, 64) and info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in png_of(response.json()["images"][0]).text["parameters"]
    assert "init_images" not in response.json()["parameters"]

    data_url = "data:image/png;base64," + b64_png((80, 64), mode="L")
    response = client.post("/sdapi/v1/img2img", json={**base, "mask": data_url, "width": 64, "height": 64})
    assert response.status_code == 200, response.text
    assert "Mask: yes" in json.loads(response.json()["info"])["infotexts"][0]


@pytest.mark.parametrize(
    "change, status, field",
    [
        ({"init_images": ["not base64!"]}, 400, "init_images"),
        ({"init_images": [base64.b64encode(b"plain text").decode()]}, 400, "init_images"),
        ({"init_images": []}, 422, "init_images"),
        ({"mask": b64_png((32, 32), mode="L")}, 400, "mask"),
        ({"denoising_strength": 0}, 422, "denoising_strength"),
    ],
)
def test_sdapi_img2img_errors(client, change, status, field):
    payload = {"prompt": "x", "steps": STEPS, "init_images": [b64_png()], **change}
    response = client.post("/sdapi/v1/img2img", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field


def test_sdapi_img2img_refuses_huge_images_before_decoding(client):
    buffer = io.BytesIO()
    Image.new("1", (5000, 10)).save(buffer, format="PNG")  # tiny file, too wide
    response = client.post(
        "/sdapi/v1/img2img",
        json={"prompt": "x", "init_images": [base64.b64encode(buffer.getvalue()).decode()]},
    )
    assert response.status_code == 400 and "5000x10" in response.json()["detail"]


def test_sdapi_models_and_samplers(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["pipeline", "pipeline+unet:pipeline"]
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    samplers = client.get("/sdapi/v1/samplers").json()
    assert [s["name"] for s in samplers] == [spec.a1111_name for spec in SCHEDULERS.values()]
    assert samplers[0] == {"name": "PLMS", "aliases": ["pndm"], "options": {}}


def test_sdapi_progress_idle_and_running(make_client):
    client, service = make_client()
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    job = long_job(service)
    try:
        deadline = time.monotonic() + 30
        while job.step < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        body = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
        assert 0 < body["progress"] < 1 and body["eta_relative"] > 0
        assert body["state"]["job_count"] == 1 and body["state"]["sampling_steps"] == 150
        assert body["state"]["sampling_step"] >= 2
    finally:
        service.cancel(job)
    assert job.wait(30) and job.status == "cancelled"


# -- health, metrics, docs ------------------------------------------------------------------


def test_health_and_draining(make_client):
    client, service = make_client()
    body = client.get("/health").json()
    assert (
        body["status"] == "ok"
        and body["models"] == ["pipeline", "pipeline+unet:pipeline"]
        and body["queue_depth"] == 0
    )
    service.stop_accepting()
    assert client.get("/health").status_code == 503
    response = client.post("/v1/txt2img", json={"prompt": "x", "num_inference_steps": STEPS})
    assert response.status_code == 503 and response.json()["error"] == "ServiceUnavailableError"


def test_metrics_prometheus_text(client):
    client.post("/v1/txt2img", json={"prompt": "x", "num_inference_steps": STEPS})
    client.post("/v1/txt2img", json={"prompt": "x", "num_inference_steps": 0})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'distilsd_requests_total{endpoint="/v1/txt2img",status="200"} 1.0' in text
    assert 'distilsd_requests_total{endpoint="/v1/txt2img",status="422"} 1.0' in text
    assert 'distilsd_request_latency_seconds_count{endpoint="/v1/txt2img"} 2.0' in text
    assert "distilsd_queue_depth 0.0" in text and "distilsd_running_jobs 0.0" in text
    assert 'distilsd_jobs_total{outcome="done"} 1.0' in text and "distilsd_images_total 1.0" in text


def test_a_finished_job_is_not_running_while_its_worker_lets_go(make_client):
    """A job's waiter is answered a moment before its worker takes it off the running list; in
    between, /metrics and the progress endpoints must not count it as running."""
    client, service = make_client()
    job = service.submit(GenerationRequest("x", num_inference_steps=STEPS, seed=0))
    job.result()
    with service._cond:
        service._running.append(job)  # the worker's moment between finishing and letting go
    try:
        assert service.running_jobs == []
        assert "distilsd_running_jobs 0.0" in client.get("/metrics").text
    finally:
        with service._cond:
            service._running.remove(job)


def test_openapi_documents_every_endpoint_with_the_limits(make_client):
    client, _ = make_client(**LIMITS)
    schema = client.get("/openapi.json").json()
    for path in ["/v1/txt2img", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/sd-models", "/sdapi/v1/samplers",
                 "/sdapi/v1/progress", "/health", "/metrics"]:  # fmt: skip
        assert path in schema["paths"], path
    steps = schema["components"]["schemas"]["Txt2ImgRequest"]["properties"]["num_inference_steps"]
    assert steps["anyOf"][0]["maximum"] == 10  # an integer, or null: the model's default
    assert client.get("/docs").status_code == 200


# -- load handling ----------------------------------------------------------------------------


def test_full_queue_answers_429_with_retry_after(make_client):
    client, service = make_client(queue_size=1)
    running = long_job(service)
    queued = service.submit(GenerationRequest("waiting", num_inference_steps=STEPS))
    try:
        response = client.post("/v1/txt2img", json={"prompt": "x", "num_inference_steps": STEPS})
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"] == "QueueFullError" and "queue is full" in response.json()["detail"]
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS})
        assert response.status_code == 429
        assert 'distilsd_jobs_total{outcome="rejected"} 2.0' in client.get("/metrics").text
    finally:
        service.cancel(queued)
        service.cancel(running)
    assert queued.status == "cancelled" and running.wait(30)


def test_time_limit_answers_504(make_client, monkeypatch):
    client, service = make_client(timeout_s=0.5)
    monkeypatch.setattr(service, "estimate_seconds", lambda request, model: None)  # let it start
    start = time.monotonic()
    response = client.post("/v1/txt2img", json={"prompt": "x", "num_inference_steps": 150})
    assert response.status_code == 504
    assert response.json()["error"] == "JobTimeoutError" and "0.5 s time limit" in response.json()["detail"]
    assert time.monotonic() - start < 20  # stopped at the next step, not after 150


def test_disconnected_client_frees_its_queue_slot(make_client):
    from distilsd.serve.api import create_app

    _, service = make_client(queue_size=1)
    app = create_app(service)
    running = long_job(service)
    body = json.dumps({"prompt": "x", "num_inference_steps": STEPS}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/txt2img", "raw_path": b"/v1/txt2img", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    sent: list[dict] = []
    seen_queued = []

    async def receive():
        if not seen_queued:
            seen_queued.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        seen_queued.append(service.queue_depth)
        return {"type": "http.disconnect"}  # the client is gone

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
        assert seen_queued[1] == 1  # it was waiting in the queue when the client went away
        assert sent[0]["status"] == 499
        assert service.queue_depth == 0 and service.counts["cancelled"] == 1
        # The slot is free again while the long job still runs.
        service.submit(GenerationRequest("next", num_inference_steps=STEPS))
    finally:
        service.cancel(running)


def test_internal_errors_are_500_and_the_worker_survives(make_client, monkeypatch):
    client, service = make_client()
    original = service._generate

    def broken(job):
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "_generate", broken)
    response = client.post("/v1/txt2img", json={"prompt": "x", "num_inference_steps": STEPS})
    assert response.status_code == 500 and response.json() == {
        "error": "InternalError",
        "detail": "RuntimeError: boom",
        "field": None,
    }
    monkeypatch.setattr(service, "_generate", original)
    assert client.post("/v1/txt2img", json={"prompt": "x", "num_inference_steps": STEPS}).status_code == 200


def test_two_workers_generate_concurrently_with_their_own_schedulers(make_client):
    # Each job builds its own pipeline object and scheduler over the shared modules.
    client, service = make_client(workers=2)
    jobs = [
        service.submit(GenerationRequest("x", num_inference_steps=STEPS, seed=3, scheduler=s))
        for s in ("euler", "ddim", "euler", "ddim")
    ]
    images = [job.result()[0].png for job in jobs]
    assert images[0] == images[2] and images[1] == images[3] and images[0] != images[1]


def test_each_worker_tokenizes_with_its_own_tokenizer(make_client):
    # A fast tokenizer's padding settings live on the shared object; two threads sharing one
    # could encode a prompt with the other's padding (a 3-token embedding instead of 77).
    import threading

    _, service = make_client(workers=2)
    loaded = service.pipelines[service.default_model]
    request = GenerationRequest("x", num_inference_steps=STEPS)
    seen = []

    def build_twice():
        seen.append([service._pipeline_for(loaded, request).tokenizer for _ in range(2)])

    threads = [threading.Thread(target=build_twice) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (a1, a2), (b1, b2) = seen
    assert a1 is a2 and b1 is b2  # copied once per thread, not per job
    assert a1 is not b1 and loaded.pipeline.tokenizer not in (a1, b1)
    assert a1("a red circle").input_ids == loaded.pipeline.tokenizer("a red circle").input_ids


# -- security -------------------------------------------------------------------------------


def test_api_key_is_required_everywhere_but_health(make_client):
    client, _ = make_client(api_key="s3cret")
    payload = {"prompt": "x", "num_inference_steps": STEPS}
    for method, path in [("post", "/v1/txt2img"), ("post", "/sdapi/v1/txt2img"), ("post", "/sdapi/v1/img2img"),
                         ("get", "/sdapi/v1/sd-models"), ("get", "/sdapi/v1/samplers"), ("get", "/sdapi/v1/progress"),
                         ("get", "/metrics"), ("get", "/docs"), ("get", "/openapi.json")]:  # fmt: skip
        response = getattr(client, method)(path, **({"json": payload} if method == "post" else {}))
        assert response.status_code == 401, path
        assert response.json()["error"] == "Unauthorized" and response.headers["www-authenticate"] == "Bearer"
    assert client.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/sdapi/v1/sd-models", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/v1/txt2img", json=payload, headers={"X-API-Key": "s3cret"}).status_code == 200
    # /health stays open for balancers, but tells a stranger only that the server is up.
    response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    full = client.get("/health", headers={"X-API-Key": "s3cret"}).json()
    assert full["models"] == ["pipeline", "pipeline+unet:pipeline"] and "version" in full


def test_api_key_login_page_sets_a_session_cookie(make_client):
    client, _ = make_client(api_key="s3cret")
    response = client.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert "API key" in client.get("/login").text
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert client.post("/login", content="key=wrong", headers=form).status_code == 401
    response = client.post("/login", content="key=s3cret", headers=form, follow_redirects=False)
    assert response.status_code == 303
    cookie = response.cookies["distilsd_session"]
    assert "s3cret" not in cookie  # a digest, not the key
    client.cookies.clear()
    assert client.get("/sdapi/v1/sd-models", cookies={"distilsd_session": cookie}).status_code == 200
    assert client.get("/sdapi/v1/sd-models", cookies={"distilsd_session": "forged"}).status_code == 401


def test_cors_is_off_unless_configured(make_client):
    preflight = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    client, _ = make_client()
    response = client.options("/v1/txt2img", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    assert (
        "access-control-allow-origin"
        not in client.get("/health", headers={"Origin": "https://example.org"}).headers
    )
    client, _ = make_client(cors_origins=["https://example.org"])
    response = client.options("/v1/txt2img", headers=preflight)
    assert (
        response.status_code == 200
        and response.headers["access-control-allow-origin"] == "https://example.org"
    )
    response = client.options("/v1/txt2img", headers={**preflight, "Origin": "https://evil.example"})
    assert response.headers.get("access-control-allow-origin") != "https://evil.example"


def test_oversized_body_is_413(client, monkeypatch):
    import distilsd.serve.api as api

    monkeypatch.setattr(api, "MAX_BODY_BYTES", 1000)
    response = client.post("/v1/txt2img", json={"prompt": "x" * 2000})
    assert response.status_code == 413 and "request body" in response.json()["detail"]


def test_missing_serve_extra_names_the_install_line(monkeypatch):
    import importlib.util

    from distilsd.errors import MissingDependencyError
    from distilsd.serve.api import require_serve_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    with pytest.raises(MissingDependencyError, match=r"pip install 'distilsd\[serve\]'"):
        require_serve_extra()


def test_settings_are_validated():
    from distilsd.errors import InputError
    from distilsd.serve import ServeSettings

    for bad in (
        {"workers": 0},
        {"queue_size": 0},
        {"timeout_s": 0},
        {"max_size": 100},
        {"models": []},
        {"torch_threads": 0},
    ):
        with pytest.raises(InputError):
            ServeSettings(**bad).validate()


# -- the A1111 API: what clients rely on beyond generating ------------------------------------


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"restore_faces": True}, "restore_faces"),
        ({"tiling": True}, "tiling"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts.ControlNet"),
        ({"s_churn": 0.5}, "s_churn"),
        ({"seed_resize_from_w": 128}, "seed_resize_from_w"),
        ({"hr_checkpoint_name": "other"}, "hr_checkpoint_name"),
        ({"save_images": True}, "save_images"),
        (
            {"override_settings": {"CLIP_stop_at_last_layers": 2}},
            "override_settings.CLIP_stop_at_last_layers",
        ),
        ({"sampler_name": "DPM++ 2S a"}, "sampler_name"),
        ({"sampler_name": "Euler a", "eta": 0.5}, "eta"),
        ({"scheduler": "align_your_steps"}, "scheduler"),
        ({"sampler_name": "PLMS", "scheduler": "karras"}, "sampler_name"),
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
        ({"enable_hr": True, "hr_scale": 100}, "hr_scale"),
    ],
)
def test_sdapi_refuses_what_it_cannot_honour(client, payload, field):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS, **payload})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field and field.split(".")[-1] in response.json()["detail"]


def test_sdapi_accepts_the_do_nothing_values_clients_send(client):
    # What webuiapi sends by default for fields distilsd does not implement.
    neutral = {"restore_faces": False, "tiling": False, "seed_resize_from_h": 0, "seed_resize_from_w": -1,
               "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "script_args": [], "alwayson_scripts": {},
               "hr_sampler_name": None, "hr_prompt": "", "styles": [], "eta": 1.0, "sampler_name": "Euler a",
               "scheduler": "automatic", "override_settings": {"CLIP_stop_at_last_layers": 1},
               "unknown_extension_field": 3}  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS, **neutral})
    assert response.status_code == 200, response.text


def test_sdapi_sampler_names_with_a_schedule_suffix(client):
    from distilsd.serve.a1111 import sampler_to_scheduler

    assert sampler_to_scheduler("DPM++ 2M Karras", "sampler_name") == ("dpm++", "karras")
    assert sampler_to_scheduler("DPM++ SDE Karras", "sampler_name") == ("dpm++-sde-k", "karras")
    assert sampler_to_scheduler("Euler Exponential", "sampler_name") == ("euler", "exponential")
    assert sampler_to_scheduler("euler-a", "sampler_name") == ("euler-a", None)
    body = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS, "seed": 3, "sampler_name": "DPM++ 2M",
                                                  "scheduler": "Karras"}).json()  # fmt: skip
    assert "Sampler: DPM++ 2M" in json.loads(body["info"])["infotexts"][0]
    assert "Schedule type: Karras" in json.loads(body["info"])["infotexts"][0]
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == ["Automatic", "Karras", "Exponential", "Beta"]


def test_variation_seed_strength_zero_and_one(client):
    def image(**extra):
        body = client.post(
            "/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS, "seed": 7, **extra}
        ).json()
        return png_of(body["images"][0]).tobytes()

    plain = image()
    assert image(subseed=9, subseed_strength=0) == plain  # strength 0: the seed's noise alone
    assert image(subseed=9, subseed_strength=0.3) != plain
    # Strength 1: the subseed's noise (the sampler's later noise still follows the seed).
    assert image(seed=9) == image(seed=9, subseed=123, subseed_strength=0.0)


def test_errors_keep_the_documented_shape(client):
    for response, status in (
        (client.get("/sdapi/v1/no-such-endpoint"), 404),
        (client.get("/sdapi/v1/txt2img"), 405),
        (
            client.post(
                "/sdapi/v1/txt2img",
                content=b'{"prompt": "x", "steps": }',
                headers={"content-type": "application/json"},
            ),
            422,
        ),
        (
            client.post(
                "/sdapi/v1/txt2img",
                content=b'{"prompt": "' + bytes([0xFF, 0xFE]) + b'"}',
                headers={"content-type": "application/json"},
            ),
            400,
        ),
        (client.post("/sdapi/v1/interrogate", json={"image": b64_png()}), 501),
    ):
        assert response.status_code == status, (status, response.text)
        assert set(response.json()) == {"error", "detail", "field"}, response.text
    decode_error = client.post(
        "/sdapi/v1/txt2img",
        content=b'{"prompt": "x", "steps": }',
        headers={"content-type": "application/json"},
    )
    assert decode_error.json()["field"] is None and "not valid JSON" in decode_error.json()["detail"]


def test_a_request_over_the_time_limit_is_refused_with_the_estimate(make_client):
    client, service = make_client(timeout_s=2)
    per_step = service.step_seconds("pipeline", 64, 64)
    assert per_step is not None and per_step > 0  # measured at start
    assert service.step_seconds("pipeline", 512, 512) > per_step  # scaled by the pixel count
    steps = max(2, int(4 / per_step))  # about 4 s at 64x64: over the 2 s limit
    response = client.post(
        "/sdapi/v1/txt2img", json={"prompt": "x", "steps": min(steps, 150), "width": 512, "height": 512}
    )
    assert response.status_code == 400 and response.json()["field"] == "steps"
    assert (
        "would take about" in response.json()["detail"] and "time limit is 2 s" in response.json()["detail"]
    )
    assert service.counts == {"done": 0, "failed": 0, "cancelled": 0, "timeout": 0, "rejected": 0}


def test_skip_stops_the_current_batch_and_runs_the_next(make_client):
    client, service = make_client()
    job = service.submit(
        GenerationRequest(
            "x", num_inference_steps=150, seed=0, n_iter=2, scheduler="ddim", width=128, height=128
        )
    )
    deadline = time.monotonic() + 60
    while job.step < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.post("/sdapi/v1/skip").json() == {"skipped": 1}
    skipped_at = job.step
    while job.step < skipped_at + 5:  # the first batch stopped at its next step; the second one runs
        assert not job.done
        time.sleep(0.01)
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": 1}
    assert job.wait(60) and job.status == "done" and job.interrupted
    assert len(job.images) == 2 and job.step < skipped_at + 100


def test_options_switch_the_default_model(client):
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "pipeline"
    models = client.get("/sdapi/v1/sd-models").json()
    second = models[1]
    # A1111 clients may send "title [hash]".
    answer = client.post(
        "/sdapi/v1/options", json={"sd_model_checkpoint": f"{second['title']} [{second['hash']}]"}
    )
    assert answer.status_code == 200 and answer.json()["not_honoured"] == {}
    assert client.get("/sdapi/v1/options").json()["sd_checkpoint_hash"] == second["sha256"]
    body = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS}).json()
    assert json.loads(body["info"])["sd_model_name"] == second["title"]
    assert (
        client.post("/v1/txt2img", json={"prompt": "x", "num_inference_steps": STEPS}).json()["model"]
        == second["title"]
    )
    refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned.safetensors"})
    assert refused.status_code == 400 and refused.json()["field"] == "sd_model_checkpoint"
    # The two served models hold the same weights (the second is the first with its own U-Net swapped in).
    assert models[0]["sha256"] == second["sha256"]
