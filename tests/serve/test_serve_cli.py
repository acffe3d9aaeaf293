"""`distilsd serve` as a process: start, serve, and drain on SIGTERM; the load-test report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from distilsd.serve.loadtest import _percentile, format_report


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_finishes_running_jobs_then_exits(tiny_pipeline_dir):
    import httpx

    command = [sys.executable, "-m", "distilsd", "serve", "--no-ui", "--port", "0", "--model", str(tiny_pipeline_dir),
               "--device", "cpu", "--torch-threads", "1", "--log-level", "warning"]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "DISTILSD_API_KEY"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line + server.stderr.read()
        url = line.split()[2]
        client = httpx.Client(base_url=url, trust_env=False, timeout=120)
        assert client.get("/health").json()["status"] == "ok"

        answers = {}

        def long_request():
            answers["running"] = client.post(
                "/v1/txt2img", json={"prompt": "x", "num_inference_steps": 60, "scheduler": "ddim"}
            )

        thread = threading.Thread(target=long_request)
        thread.start()
        deadline = time.monotonic() + 60
        while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)

        server.send_signal(signal.SIGTERM)
        thread.join(120)
        # The job that was running when SIGTERM came finished and was answered...
        assert answers["running"].status_code == 200, answers["running"].text
        assert len(answers["running"].json()["images"]) == 1
        # ...then the process exited cleanly and the port is closed.
        # uvicorn re-raises the captured SIGTERM once its graceful shutdown is done, so the
        # exit status is "terminated by SIGTERM" (as a supervisor expects), not a crash.
        assert server.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.stderr.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", trust_env=False, timeout=5)
    finally:
        if server.poll() is None:
            server.kill()


def test_loadtest_report_format():
    assert _percentile([1.0, 2.0, 3.0, 4.0], 50) in (2.0, 3.0) and _percentile([5.0], 95) == 5.0
    report = {
        "model": "tiny-random", "model_source": "tiny-random", "requests": 100, "concurrency": 16, "steps": 20, "size": "native",
        "server": {"workers": 1, "torch_threads": 1, "queue_size": 16}, "wall_s": 10.0, "throughput_rps": 10.0,
        "answered_rps": 10.0, "latency_s": {"p50": 1.0, "p95": 2.0, "max": 3.0}, "statuses": {"200": 90, "429": 10},
        "memory_mib": {"after_warmup": 500.0, "peak": 520.0, "end": 510.0, "growth_pct": 2.0}, "passed": True,
    }  # fmt: skip
    text = format_report(report)
    assert (
        "p50 1.000 s, p95 2.000 s" in text
        and "200: 90, 429: 10" in text
        and "peak 520.0 MiB" in text
        and "PASS" in text
    )
