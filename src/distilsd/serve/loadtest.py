"""A bounded load test against a fresh ``distilsd serve`` on the loopback interface.

The server runs in a subprocess (``--port 0``, API only) so that its memory is measured
alone; the client is httpx's async client with a fixed number of requests in flight.
Everything stays on 127.0.0.1 and stops at ``time_limit`` seconds. With ``ray_replicas``
the server is ``distilsd serve --ray`` (a local Ray on 127.0.0.1), and the memory measured
is each replica's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from typing import Any

from distilsd.errors import DistilSDError, InputError, MissingDependencyError

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
    """Samples processes' resident memory (RSS) every ``interval`` seconds in a thread."""

    def __init__(self, pids: list[int], interval: float = 0.1):
        import psutil

        self.processes = {pid: psutil.Process(pid) for pid in pids}
        self.interval = interval
        self.peaks = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> dict[int, int]:
        """Each process's RSS now (0 for one that ended)."""
        sizes = {}
        for pid, process in self.processes.items():
            try:
                sizes[pid] = process.memory_info().rss
            except Exception:  # the process ended (a replica restarted)
                sizes[pid] = 0
        return sizes

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, size in self.rss().items():
                self.peaks[pid] = max(self.peaks[pid], size)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peaks = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _start_server(
    model: str,
    workers: int,
    torch_threads: int | None,
    queue_size: int,
    timeout: float,
    ray_replicas: int | None = None,
    log: Any = subprocess.DEVNULL,
) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "distilsd", "serve", "--no-ui", "--host", HOST, "--port", "0", "--model", model,
        "--workers", str(workers), "--queue-size", str(queue_size), "--log-level", "warning",
    ]  # fmt: skip
    if torch_threads:
        command += ["--torch-threads", str(torch_threads)]
    if ray_replicas:
        command += ["--ray", "--replicas", str(ray_replicas)]
    env = {key: value for key, value in os.environ.items() if key not in ("DISTILSD_API_KEY", "RAY_ADDRESS")}
    # stderr goes to a file: Ray logs more than a pipe holds, and a full pipe blocks the server.
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
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
        server.wait(30)
        tail = ""
        if hasattr(log, "seek"):
            log.seek(0)
            tail = log.read()[-2000:]
        errors = [line for line in tail.splitlines() if line]
        reason = next((line for line in reversed(errors) if line.startswith("error: ")), None)
        raise DistilSDError(
            f"the server did not start: {reason.removeprefix('error: ') if reason else 'no answer in time'}",
            hint=None if reason else (errors[-1] if errors else None),
        )
    return server, url


async def fire(
    url: str,
    num_requests: int,
    concurrency: int,
    payload: dict[str, Any],
    time_limit: float,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Send ``num_requests`` to ``url``/v1/txt2img, ``concurrency`` at a time, within ``time_limit``.

    ``records`` (if given) gets one dict per request as it is sent (``k``, ``start``) and
    completed when answered (``end``, ``status``, ``replica``), so a caller's coroutine can
    watch the load while it runs.
    """
    import httpx

    from distilsd.serve.server import REPLICA_HEADER

    records = [] if records is None else records
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    replicas: dict[str, int] = {}
    deadline = time.monotonic() + time_limit

    async def one(client: httpx.AsyncClient, k: int) -> None:
        async with semaphore:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                statuses["not sent (time limit)"] = statuses.get("not sent (time limit)", 0) + 1
                return
            record: dict[str, Any] = {
                "k": k,
                "start": time.monotonic(),
                "end": None,
                "status": None,
                "replica": None,
            }
            records.append(record)
            try:
                response = await client.post(
                    f"{url}/v1/txt2img", json={**payload, "seed": k}, timeout=remaining
                )
                status = str(response.status_code)
                record["replica"] = response.headers.get(REPLICA_HEADER)
                record["retry_after"] = response.headers.get("retry-after")
            except httpx.TimeoutException:
                status = "client timeout"
            except httpx.HTTPError as exc:
                status = f"error: {type(exc).__name__}"
            record.update(end=time.monotonic(), status=status)
            latencies.append(record["end"] - record["start"])
            statuses[status] = statuses.get(status, 0) + 1
            if record["replica"] is not None and status == "200":
                replicas[record["replica"]] = replicas.get(record["replica"], 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.monotonic()
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        await asyncio.gather(*(one(client, k) for k in range(num_requests)))
    return {
        "wall_s": time.monotonic() - start,
        "latencies": latencies,
        "statuses": statuses,
        "replicas": replicas,
        "records": records,
    }


def _warm_up(client: Any, url: str, payload: dict[str, Any], ray_replicas: int | None) -> dict[str, int]:
    """First calls allocate torch's caches (not a leak): warm every replica; returns replica id -> PID."""
    if not ray_replicas:
        for k in range(WARMUP_REQUESTS):
            client.post(f"{url}/v1/txt2img", json={**payload, "seed": 10_000 + k}).raise_for_status()
        return {}
    from distilsd.serve.server import REPLICA_HEADER

    answered: dict[str, int] = {}
    # Ray's router picks between idle replicas at random: a bounded number of tries reaches all.
    for k in range(WARMUP_REQUESTS * ray_replicas * 6):
        response = client.post(f"{url}/v1/txt2img", json={**payload, "seed": 10_000 + k})
        response.raise_for_status()
        replica = response.headers[REPLICA_HEADER]
        answered[replica] = answered.get(replica, 0) + 1
        if len(answered) == ray_replicas and min(answered.values()) >= WARMUP_REQUESTS:
            break
    pids: dict[str, int] = {}
    for _ in range(20 * ray_replicas):
        replica = client.get(f"{url}/health").json()["replica"]
        pids[replica["id"]] = replica["pid"]
        if len(pids) == ray_replicas:
            break
    if len(pids) < ray_replicas:
        raise RuntimeError(f"/health showed {len(pids)} of {ray_replicas} replicas")
    return pids


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
    ray_replicas: int | None = None,
) -> dict[str, Any]:
    """Start a server, warm it up, fire ``num_requests`` at ``concurrency``; return the report.

    With ``ray_replicas``: ``distilsd serve --ray --replicas N`` on a local Ray instead.
    """
    for package, module in (("httpx", "httpx"), ("psutil", "psutil")):
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError(package, "serve", "distilsd serve-loadtest") from None
    import httpx

    from distilsd.serve.service import MIN_SIZE, ServeSettings

    # The server's own checks, before it starts: a bad value fails here in one line, not as a
    # refused warm-up request.
    settings = ServeSettings(
        models=[model], workers=workers, torch_threads=torch_threads, queue_size=queue_size
    )
    settings.validate()
    if size is not None and (size % 8 or not MIN_SIZE <= size <= settings.max_size):
        raise InputError(f"--size {size} must be a multiple of 8 between {MIN_SIZE} and {settings.max_size}")
    payload: dict[str, Any] = {"prompt": "a red circle above a blue square", "num_inference_steps": steps}
    if size:
        payload.update(width=size, height=size)
    import tempfile

    import psutil

    with tempfile.TemporaryFile("w+") as log:
        server, url = _start_server(
            model, workers, torch_threads, queue_size, min(time_limit, 300), ray_replicas, log
        )
        try:
            with httpx.Client(trust_env=False, timeout=time_limit) as client:
                replica_pids = _warm_up(client, url, payload, ray_replicas)
                health = client.get(f"{url}/health").json()
            pids = list(replica_pids.values()) or [server.pid]
            with _MemorySampler(pids) as memory:
                rss_start = memory.rss()
                result = asyncio.run(fire(url, num_requests, concurrency, payload, time_limit))
                rss_end = memory.rss()
                peaks = dict(memory.peaks)
            # Everything the server started: with Ray, its GCS, raylet, controller, proxy and replicas.
            tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
            total_rss = sum(_rss_or_zero(process) for process in tree)
        finally:
            server.terminate()
            try:
                server.wait(120 if ray_replicas else 60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(30)
    statuses = result["statuses"]
    latencies = result["latencies"]
    answered = sum(count for status, count in statuses.items() if status.isdigit())
    growth = (sum(rss_end.values()) - sum(rss_start.values())) / sum(rss_start.values())
    no_5xx = not any(status.startswith("5") for status in statuses)
    only_200_429 = set(statuses) <= {"200", "429"}
    report = {
        "server_kind": f"ray, {ray_replicas} replicas" if ray_replicas else "single process",
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
            "after_warmup": _mib(sum(rss_start.values())),
            "peak": _mib(sum(peaks.values())),
            "end": _mib(sum(rss_end.values())),
            "growth_pct": round(100 * growth, 2),
        },
        "total_rss_mib": _mib(total_rss),
        "passed": no_5xx and only_200_429 and growth < MEMORY_GROWTH_LIMIT,
    }
    if ray_replicas:
        report["replicas"] = [
            {
                "id": replica,
                "pid": pid,
                "answered_200": result["replicas"].get(replica, 0),
                "rss_mib": {
                    "after_warmup": _mib(rss_start[pid]),
                    "peak": _mib(peaks[pid]),
                    "end": _mib(rss_end[pid]),
                },
            }
            for replica, pid in replica_pids.items()
        ]
    return report


def _mib(size: int) -> float:
    return round(size / 2**20, 1)


def _rss_or_zero(process: Any) -> int:
    try:
        return process.memory_info().rss
    except Exception:  # ended between listing and reading
        return 0


def format_report(report: dict[str, Any]) -> str:
    latency, memory = report["latency_s"], report["memory_mib"]
    statuses = ", ".join(f"{status}: {count}" for status, count in report["statuses"].items())
    server = report["server"]
    replicas = [
        f"replica {r['id']}  pid {r['pid']}, {r['answered_200']} answered 200, RSS after warm-up "
        f"{r['rss_mib']['after_warmup']:.1f} MiB, peak {r['rss_mib']['peak']:.1f} MiB, end {r['rss_mib']['end']:.1f} MiB"
        for r in report.get("replicas", [])
    ]
    memory_of = "replicas' RSS" if replicas else "server RSS    "
    return "\n".join(
        [
            f"load test: {report['requests']} requests at concurrency {report['concurrency']} on {HOST}, "
            f"model {report['model']} ({report['model_source']}), {report['steps']} steps, size {report['size']}",
            f"server: {report.get('server_kind', 'single process')}, {server['workers']} worker(s)"
            f"{' each' if replicas else ''}, torch threads {server['torch_threads'] or 'default'}, queue {server['queue_size']}",
            f"wall time      {report['wall_s']:.2f} s",
            f"throughput     {report['throughput_rps']:.3f} images/s (200s), {report['answered_rps']:.3f} answers/s",
            f"latency        p50 {latency['p50']:.3f} s, p95 {latency['p95']:.3f} s, max {latency['max']:.3f} s",
            f"status counts  {statuses}",
            f"{memory_of} after warm-up {memory['after_warmup']:.1f} MiB, peak {memory['peak']:.1f} MiB, "
            f"end {memory['end']:.1f} MiB, growth {memory['growth_pct']:+.2f}%",
            *replicas,
            *(
                [f"all processes  {report['total_rss_mib']:.1f} MiB RSS at the end"]
                if "total_rss_mib" in report
                else []
            ),
            "result         "
            + ("PASS" if report["passed"] else "FAIL")
            + " (no 5xx, only 200/429, memory growth < 10%)",
        ]
    )


def format_comparison(reports: list[dict[str, Any]]) -> str:
    """The runs side by side (same load, same model): throughput, latency, memory."""
    rows = [("server", "images/s", "p50 s", "p95 s", "max s", "statuses", "memory MiB (end)")]
    for report in reports:
        latency = report["latency_s"]
        statuses = ", ".join(f"{status}: {count}" for status, count in report["statuses"].items())
        if report.get("replicas"):
            memory = " + ".join(f"{r['rss_mib']['end']:.0f}" for r in report["replicas"]) + " (replicas)"
        else:
            memory = f"{report['memory_mib']['end']:.0f}"
        memory += f", {report['total_rss_mib']:.0f} all"
        rows.append((report["server_kind"], f"{report['throughput_rps']:.3f}", f"{latency['p50']:.3f}",
                     f"{latency['p95']:.3f}", f"{latency['max']:.3f}", statuses, memory))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )
