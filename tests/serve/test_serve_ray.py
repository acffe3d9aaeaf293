"""`distilsd serve --ray`: the app on Ray Serve, on a local Ray bound to 127.0.0.1, CPU only.

One Ray instance with one 2-replica deployment serves the whole module (Ray takes tens of
seconds to start on 2 cores); every wait has a deadline. The bad-input tests start no Ray.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

RAY_MISSING = importlib.util.find_spec("ray") is None
if RAY_MISSING and os.environ.get("CI", "").lower() in ("1", "true"):
    raise RuntimeError("the Ray Serve tests need the ray extra in CI: pip install -e '.[dev]'")
pytestmark = pytest.mark.skipif(RAY_MISSING, reason="needs the ray extra: pip install 'distilsd[ray]'")

REPO = Path(__file__).resolve().parents[2]
REPLICAS = 2
QUEUE_SIZE = 2  # per replica: 2 replicas x (1 running + 2 waiting) < 8 in flight, so some 429s
STEPS = 10
LOAD = 40  # requests of the kill test (each re-sent after a 429 until answered)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


# -- bad input: no Ray is started ------------------------------------------------------------------


def test_replicas_zero_is_refused(run_cli):
    code, _, err = run_cli(["serve", "--ray", "--replicas", "0"])
    assert code == 2 and err.strip() == "error: --replicas 0 must be >= 1", err


def test_ray_flags_need_ray_and_exclude_each_other(run_cli):
    code, _, err = run_cli(["serve", "--replicas", "2"])
    assert code == 2 and err.startswith("error: --replicas needs --ray"), err
    code, _, err = run_cli(["serve", "--ray", "--replicas", "2", "--autoscale", "1:3"])
    assert code == 2 and "exclude each other" in err, err
    code, _, err = run_cli(["serve", "--ray", "--autoscale", "3:1"])
    assert code == 2 and "1 <= MIN <= MAX" in err, err


def test_missing_ray_names_the_extra(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, err = run_cli(["serve", "--ray"])
    assert code == 2 and "pip install 'distilsd[ray]'" in err and "Traceback" not in err, err
    assert [line.split(":")[0] for line in err.strip().splitlines()] == ["error", "hint"]


@pytest.mark.timeout(60)  # an unreachable cluster must not hang the command
def test_unreachable_ray_address_fails_in_one_line(run_cli, tiny_pipeline_dir):
    address = f"127.0.0.1:{closed_port()}"
    code, _, err = run_cli(["serve", "--ray", "--ray-address", address, "--model", str(tiny_pipeline_dir)])
    lines = [line for line in err.strip().splitlines() if line.startswith(("error:", "hint:"))]
    assert code == 2 and lines[0].startswith(f"error: cannot reach the Ray cluster at {address}"), err
    assert "Traceback" not in err


def test_serve_config_file_and_builder_arguments():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from distilsd.errors import InputError
    from distilsd.serve.ray import EXTRA_ONGOING, app, deployment_options, settings_from_args

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "docs" / "serve-ray.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "distilsd.serve.ray:app"
    settings, ray_settings = settings_from_args(application.args)
    assert settings.models == ["shapes-tiny"] and ray_settings.replicas == 2
    assert type(app(application.args)).__name__ == "Application"

    # `serve run distilsd.serve.ray:app KEY=VALUE` passes strings.
    settings, ray_settings = settings_from_args(
        {"model": "a,b::c", "queue-size": "3", "workers": "2", "autoscale": "1:4", "gpus_per_replica": "0.5"}
    )
    assert settings.models == ["a", "b::c"] and settings.queue_size == 3
    # A replica runs elsewhere: the LoRA folder goes to it as an absolute path.
    lora_settings, _ = settings_from_args({"model": "a", "lora_dir": "docs"})
    assert lora_settings.lora_dir == str((Path.cwd() / "docs").resolve())
    options = deployment_options(settings, ray_settings)
    assert options["max_ongoing_requests"] == 2 + 3 + EXTRA_ONGOING
    assert options["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    for bad, message in (
        ({"replicas": "0"}, "--replicas 0"),
        ({"colour": "red"}, "unknown argument 'colour'"),
    ):
        with pytest.raises(InputError, match=message):
            app(bad)


# -- on a local Ray ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_app(tiny_pipeline_dir):
    """A local Ray (127.0.0.1, 2 CPUs) serving the tiny pipeline on 2 replicas; yields (url, settings)."""
    import ray
    from ray import serve

    from distilsd.serve.ray import RaySettings, deploy, free_port, start_ray
    from distilsd.serve.service import ServeSettings

    ray_settings = RaySettings(replicas=REPLICAS, cpus_per_replica=1)
    settings = ServeSettings(
        models=[str(tiny_pipeline_dir)], device="cpu", torch_threads=1, queue_size=QUEUE_SIZE, max_steps=60
    )
    start_ray(ray_settings)
    try:
        url = deploy(settings, ray_settings, free_port("127.0.0.1"))
        yield url, settings
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_pids(client, count: int, deadline_s: float = 60) -> dict[str, int]:
    """Replica id -> PID, from /health (each call reaches one replica, chosen by Ray's router)."""
    pids: dict[str, int] = {}
    deadline = time.monotonic() + deadline_s
    while len(pids) < count:
        assert time.monotonic() < deadline, f"/health showed only {pids}"
        body = client.get("/health").json()
        pids[body["replica"]["id"]] = body["replica"]["pid"]
    return pids


@pytest.mark.slow
@pytest.mark.timeout(900)  # includes starting Ray and the replicas (module fixture): minutes
def test_two_replicas_serve_a_bounded_load_with_backpressure(ray_app):
    import httpx

    from distilsd.serve.loadtest import fire
    from distilsd.serve.server import REPLICA_HEADER

    url, _ = ray_app
    result = asyncio.run(fire(url, 60, 8, {"prompt": "a red circle", "num_inference_steps": STEPS}, 240))
    statuses = result["statuses"]
    print(f"60 requests at concurrency 8 through Ray: {statuses}, answered by {result['replicas']}")
    assert set(statuses) <= {"200", "429"} and sum(statuses.values()) == 60, statuses
    assert statuses.get("429", 0) > 0, "8 in flight on 2 x (1 + 2) slots must be refused sometimes"
    assert len(result["replicas"]) == REPLICAS, result["replicas"]  # both replicas answered 200s

    # A 429 comes from the full replica itself, with Retry-After, as from `distilsd serve`.
    refused = [r for r in result["records"] if r["status"] == "429"]
    assert all(r["replica"] and r["retry_after"].isdigit() for r in refused), refused

    with httpx.Client(base_url=url, trust_env=False, timeout=30) as client:
        health = client.get("/health")
        body = health.json()
        assert health.status_code == 200 and body["replicas"]["running"] == REPLICAS, body
        assert health.headers[REPLICA_HEADER] == body["replica"]["id"] and body["replica"]["rss_mib"] > 0
        assert body["queue_size"] == QUEUE_SIZE  # the per-replica limit


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first test to run also starts Ray
def test_a1111_api_and_ui_through_rays_proxy(ray_app):
    import base64
    import io

    import httpx
    from PIL import Image

    from distilsd.serve.server import REPLICA_HEADER

    url, _ = ray_app
    with httpx.Client(base_url=url, trust_env=False, timeout=60) as client:
        models = client.get("/sdapi/v1/sd-models").json()
        assert len(models) == 1
        response = client.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "a blue square", "steps": 3, "seed": 7, "batch_size": 2, "sampler_name": "Euler a",
                  "override_settings": {"sd_model_checkpoint": models[0]["title"]}},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.headers[REPLICA_HEADER]
        body = response.json()
        info = json.loads(body["info"])
        assert info["all_seeds"] == [7, 8] and info["sampler_name"] == "Euler a"
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        assert image.size == (64, 64) and "Seed: 7" in image.text["parameters"]
        bad = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 500})
        assert bad.status_code == 422 and bad.json()["field"] == "steps"  # over --max-steps
        assert client.get("/ui/").status_code == 200


async def polite_load(
    url: str, count: int, concurrency: int, payload: dict, records: list, time_limit: float
):
    """``count`` requests, ``concurrency`` at a time; a 429 is sent again shortly (as a client told
    Retry-After would, sooner), so every request ends as 200 unless it is lost."""
    import httpx

    semaphore = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + time_limit

    async def one(client: httpx.AsyncClient, k: int) -> None:
        async with semaphore:
            record = {"k": k, "start": time.monotonic(), "end": None, "status": None, "replica": None}
            records.append(record)
            while True:
                try:
                    response = await client.post("/v1/txt2img", json={**payload, "seed": k}, timeout=120)
                    status = str(response.status_code)
                except httpx.HTTPError as exc:
                    status = f"error: {type(exc).__name__}"
                if status != "429" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            record.update(end=time.monotonic(), status=status)
            if status == "200":
                record["replica"] = response.headers.get("x-distilsd-replica")

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(one(client, k) for k in range(count)))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_replica_is_restarted_and_only_its_requests_are_lost(ray_app):
    import httpx

    url, settings = ray_app
    client = httpx.Client(base_url=url, trust_env=False, timeout=30)
    before = replica_pids(client, REPLICAS)
    victim_id, victim_pid = sorted(before.items())[0]
    records: list[dict] = []
    at_kill: dict = {}

    async def kill_mid_load() -> None:
        deadline = time.monotonic() + 180
        # Once each replica has answered a few requests of this load, kill one.
        while True:
            answered = [r["replica"] for r in records if r["status"] == "200"]
            if all(answered.count(replica) >= 2 for replica in before):
                break
            assert time.monotonic() < deadline, f"the load did not reach both replicas: {answered}"
            await asyncio.sleep(0.02)
        at_kill["time"] = time.monotonic()
        at_kill["outstanding"] = {r["k"] for r in records if r["end"] is None}
        at_kill["done"] = sum(1 for r in records if r["end"] is not None)
        os.kill(victim_pid, signal.SIGKILL)

    async def load_and_kill() -> None:
        payload = {"prompt": "a green triangle", "num_inference_steps": STEPS}
        await asyncio.gather(polite_load(url, LOAD, 8, payload, records, 300), kill_mid_load())

    asyncio.run(load_and_kill())
    statuses: dict[str, int] = {}
    for record in records:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
    lost = {r["k"]: r["status"] for r in records if r["status"] != "200"}
    print(
        f"killed replica {victim_id} (pid {victim_pid}) after {at_kill['done']} of {LOAD} requests, with "
        f"{len(at_kill['outstanding'])} in flight in the cluster; lost {len(lost)} {sorted(set(lost.values()))}; "
        f"statuses {statuses}"
    )
    assert len(records) == LOAD and at_kill["done"] < LOAD
    # Only requests already in flight when the replica died may fail; nothing sent later...
    assert set(lost) <= at_kill["outstanding"], (lost, at_kill["outstanding"])
    # ...and at most what the killed replica held: its running job, its queue, and requests it had
    # taken from Ray's proxy but not yet answered (a 429 on its way), up to max_ongoing_requests.
    from distilsd.serve.ray import EXTRA_ONGOING

    assert len(lost) <= settings.workers + settings.queue_size + EXTRA_ONGOING, lost
    survivor = next(replica for replica in before if replica != victim_id)
    assert any(r["replica"] == survivor and r["start"] > at_kill["time"] for r in records)

    # Ray starts a new replica in place of the killed one: /health shows it with another PID.
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, "Ray did not restart the killed replica"
        try:
            body = client.get("/health").json()
        except httpx.HTTPError:
            body = {}
        if body.get("replicas", {}).get("running") == REPLICAS and body["replica"]["id"] not in before:
            break
        time.sleep(0.5)
    assert body["replica"]["pid"] != victim_pid
    after = replica_pids(client, REPLICAS, deadline_s=60)
    assert victim_id not in after and set(after.values()).isdisjoint({victim_pid})
    response = client.post("/v1/txt2img", json={"prompt": "x", "num_inference_steps": 2})
    assert response.status_code == 200
    client.close()
