"""A bounded load test against a fresh ``distilsd serve`` on the loopback interface.

The server runs in a subprocess (``--port 0``, API only) so that its memory is measured
alone; the client is httpx's async client with a fixed number of requests in flight.
Everything stays on 127.0.0.1 and stops at ``time_limit`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from typing import Any

from distilsd.errors import MissingDependencyError

HOST = "127.0.0.1"  # never anything else
MEMORY_GROWTH_LIMIT = 0.10
WARMUP_REQUESTS = 3


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class _MemorySampler:
    """Samples a process's resident memory (RSS) every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except Exception:  # the process ended
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _start_server(
    model: str, workers: int, torch_threads: int | None, queue_size: int, timeout: float
) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "distilsd", "serve", "--no-ui", "--host", HOST, "--port", "0", "--model", model,
        "--workers", str(workers), "--queue-size", str(queue_size), "--log-level", "warning",
    ]  # fmt: skip
    if torch_threads:
        command += ["--torch-threads", str(torch_threads)]
    env = {key: value for key, value in os.environ.items() if key != "DISTILSD_API_KEY"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    # The server prints "serving on http://127.0.0.1:PORT ..." once it listens.
    lines: list[str] = []

    def read() -> None:
        for line in server.stdout:
            lines.append(line)
            if line.startswith("serving on "):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    url = next((line.split()[2] for line in lines if line.startswith("serving on ")), None)
    if url is None or time.monotonic() > deadline:
        server.kill()
        raise RuntimeError(
            "the server did not start: " + (server.stderr.read()[-2000:] if server.stderr else "")
        )
    return server, url


async def _fire(
    url: str, num_requests: int, concurrency: int, payload: dict[str, Any], time_limit: float
) -> dict[str, Any]:
    import httpx

    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + time_limit

    async def one(client: httpx.AsyncClient, k: int) -> None:
        async with semaphore:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                statuses["not sent (time limit)"] = statuses.get("not sent (time limit)", 0) + 1
                return
            start = time.monotonic()
            try:
                response = await client.post(
                    f"{url}/v1/txt2img", json={**payload, "seed": k}, timeout=remaining
                )
                status = str(response.status_code)
            except httpx.TimeoutException:
                status = "client timeout"
            except httpx.HTTPError as exc:
                status = f"error: {type(exc).__name__}"
            latencies.append(time.monotonic() - start)
            statuses[status] = statuses.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.monotonic()
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        await asyncio.gather(*(one(client, k) for k in range(num_requests)))
    return {"wall_s": time.monotonic() - start, "latencies": latencies, "statuses": statuses}


def run_loadtest(
    model: str,
    num_requests: int = 100,
    concurrency: int = 16,
    steps: int = 20,
    size: int | None = None,
    workers: int = 1,
    torch_threads: int | None = None,
    queue_size: int = 16,
    time_limit: float = 600.0,
) -> dict[str, Any]:
    """Start a server, warm it up, fire ``num_requests`` at ``concurrency``; return the report."""
    for package, module in (("httpx", "httpx"), ("psutil", "psutil")):
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError(package, "serve", "distilsd serve-loadtest") from None
    import httpx

    payload: dict[str, Any] = {"prompt": "a red circle above a blue square", "num_inference_steps": steps}
    if size:
        payload.update(width=size, height=size)
    server, url = _start_server(model, workers, torch_threads, queue_size, timeout=min(time_limit, 300))
    try:
        with httpx.Client(trust_env=False, timeout=time_limit) as client:
            for k in range(WARMUP_REQUESTS):  # first calls allocate torch's caches: not a leak
                client.post(f"{url}/v1/txt2img", json={**payload, "seed": 10_000 + k}).raise_for_status()
            health = client.get(f"{url}/health").json()
        with _MemorySampler(server.pid) as memory:
            rss_start = memory.rss()
            result = asyncio.run(_fire(url, num_requests, concurrency, payload, time_limit))
            rss_end = memory.rss()
            peak = memory.peak
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    statuses = result["statuses"]
    latencies = result["latencies"]
    answered = sum(count for status, count in statuses.items() if status.isdigit())
    growth = (rss_end - rss_start) / rss_start
    no_5xx = not any(status.startswith("5") for status in statuses)
    only_200_429 = set(statuses) <= {"200", "429"}
    return {
        "model": health["default_model"],
        "model_source": model,
        "requests": num_requests,
        "concurrency": concurrency,
        "steps": steps,
        "size": size or "native",
        "server": {"workers": workers, "torch_threads": torch_threads, "queue_size": queue_size},
        "wall_s": round(result["wall_s"], 2),
        "throughput_rps": round(statuses.get("200", 0) / result["wall_s"], 3),
        "answered_rps": round(answered / result["wall_s"], 3),
        "latency_s": {
            "p50": round(_percentile(latencies, 50), 3),
            "p95": round(_percentile(latencies, 95), 3),
            "max": round(max(latencies, default=float("nan")), 3),
        },
        "statuses": dict(sorted(statuses.items())),
        "memory_mib": {
            "after_warmup": round(rss_start / 2**20, 1),
            "peak": round(peak / 2**20, 1),
            "end": round(rss_end / 2**20, 1),
            "growth_pct": round(100 * growth, 2),
        },
        "passed": no_5xx and only_200_429 and growth < MEMORY_GROWTH_LIMIT,
    }


def format_report(report: dict[str, Any]) -> str:
    latency, memory = report["latency_s"], report["memory_mib"]
    statuses = ", ".join(f"{status}: {count}" for status, count in report["statuses"].items())
    server = report["server"]
    return "\n".join(
        [
            f"load test: {report['requests']} requests at concurrency {report['concurrency']} on {HOST}, "
            f"model {report['model']} ({report['model_source']}), {report['steps']} steps, size {report['size']}",
            f"server: {server['workers']} worker(s), torch threads {server['torch_threads'] or 'default'}, queue {server['queue_size']}",
            f"wall time      {report['wall_s']:.2f} s",
            f"throughput     {report['throughput_rps']:.3f} images/s (200s), {report['answered_rps']:.3f} answers/s",
            f"latency        p50 {latency['p50']:.3f} s, p95 {latency['p95']:.3f} s, max {latency['max']:.3f} s",
            f"status counts  {statuses}",
            f"server RSS     after warm-up {memory['after_warmup']:.1f} MiB, peak {memory['peak']:.1f} MiB, "
            f"end {memory['end']:.1f} MiB, growth {memory['growth_pct']:+.2f}%",
            "result         "
            + ("PASS" if report["passed"] else "FAIL")
            + " (no 5xx, only 200/429, memory growth < 10%)",
        ]
    )
