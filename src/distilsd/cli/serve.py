"""``distilsd serve`` (web UI + JSON API) and ``distilsd serve-loadtest``."""

from __future__ import annotations

from pathlib import Path

import click

from distilsd.cli.options import (
    FINITE_FLOAT,
    FiniteFloat,
    allow_pickle_option,
    device_option,
    dtype_option,
    lora_skip_unknown_option,
)
from distilsd.models import BUILTIN_MODELS, DEFAULT_MODEL

MODEL_HELP = (
    "Model to serve; repeat for several (the first is the default). A pipeline folder, .safetensors file, hub id or "
    "built-in name ("
    + ", ".join(BUILTIN_MODELS)
    + "); BASE::UNET serves BASE with another U-Net (a student) swapped in."
)


@click.command("serve", context_settings={"show_default": True})
@click.option("-m", "--model", "models", multiple=True, default=[DEFAULT_MODEL], help=MODEL_HELP)
@click.option(
    "--host", default="127.0.0.1", help="Address to bind; anything but loopback should come with --api-key."
)
@click.option("--port", default=7860, type=int, help="Port (0: a free one, printed at start).")
@click.option(
    "--workers",
    default=1,
    type=int,
    help="Jobs generated at once (on a CPU, 1: torch already uses every core).",
)
@click.option(
    "--torch-threads",
    default=None,
    type=int,
    show_default="torch's default",
    help="torch intra-op threads (cores / workers on a CPU).",
)
@click.option(
    "--queue-size",
    default=16,
    type=int,
    help="Jobs that may wait; beyond that requests get 429 with Retry-After.",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=300.0,
    type=FINITE_FLOAT,
    help="Per-request time limit in seconds, queue wait included (then 504).",
)
@click.option("--max-size", default=1024, type=int, help="Largest width or height, in pixels.")
@click.option("--max-steps", default=150, type=int, help="Most denoising steps per request.")
@click.option("--max-images", default=8, type=int, help="Most images per request (batch_size x n_iter).")
@click.option(
    "--max-prompt-length", default=1000, type=int, help="Longest prompt (and negative prompt), in characters."
)
@click.option(
    "--api-key",
    envvar="DISTILSD_API_KEY",
    default=None,
    show_default="$DISTILSD_API_KEY",
    help="Require this key on every API and UI request (Authorization: Bearer KEY, X-API-Key, or the UI's sign-in page).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Allow cross-origin requests from this origin (repeatable). Default: CORS off.",
)
@click.option("--no-ui", is_flag=True, help="Serve the API only (no Gradio UI at /ui).")
@click.option(
    "--lora-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Serve every LoRA file in this folder (diffusers or kohya layout) by its file stem; prompts pick them "
    "with AUTOMATIC1111's <lora:NAME:WEIGHT>.",
)
@allow_pickle_option(
    "With --lora-dir: serve pickled LoRA files (.ckpt, .pt) too. Unpickling can run code: only files you trust."
)
@click.option(
    "--max-loaded-loras",
    default=8,
    type=int,
    help="With --lora-dir: LoRAs kept loaded per model between requests; the least recently used beyond "
    "that are unloaded.",
)
@lora_skip_unknown_option(
    "With --lora-dir: load the modules of a LoRA that the model has and skip the rest (default: a request "
    "naming such a LoRA gets a 400 that names it)."
)
@dtype_option()
@device_option()
@click.option("--no-safety-checker", is_flag=True, help="Do not run the models' safety checkers.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    help="uvicorn's log level.",
)
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Deploy on Ray Serve: replicas across a Ray cluster behind Ray's proxy (pip install 'distilsd[ray]').",
)
@click.option(
    "--replicas",
    default=None,
    type=int,
    show_default="1",
    help="With --ray: replicas, each with its own models and queue.",
)
@click.option(
    "--autoscale",
    default=None,
    metavar="MIN:MAX",
    help="With --ray: let Ray Serve scale between MIN and MAX replicas (instead of --replicas).",
)
@click.option(
    "--ray-address",
    envvar="RAY_ADDRESS",
    default=None,
    show_default="start a local Ray on 127.0.0.1",
    help="With --ray: a running Ray cluster to join (HOST:PORT of its head, ray://HOST:PORT, or auto).",
)
@click.option(
    "--gpus-per-replica", default=None, type=float, show_default="0", help="With --ray: GPUs per replica."
)
@click.option(
    "--cpus-per-replica", default=None, type=float, show_default="1", help="With --ray: CPUs per replica."
)
def serve_command(
    models, no_ui, no_safety_checker, cors_origins, log_level, use_ray, replicas, autoscale, ray_address,
    gpus_per_replica, cpus_per_replica, lora_dir, **options,
):  # fmt: skip
    """Serve a web UI (/ui) and a JSON API (/v1, AUTOMATIC1111's /sdapi/v1, /health, /metrics).

    The API's OpenAPI docs are at /docs. SIGTERM stops accepting work, finishes the jobs
    already taken, then exits.

    \b
    Examples:
      distilsd serve
      distilsd serve --model teacher/ --model teacher/::student-unet/ --port 8000
      DISTILSD_API_KEY=secret distilsd serve --host 0.0.0.0 --workers 2 --torch-threads 4
      distilsd serve --model shapes-tiny --lora-dir loras/   # prompt "a hexagon <lora:hexagon:0.8>"
      distilsd serve --ray --replicas 2
      distilsd serve --ray --ray-address HEAD_IP:6379 --autoscale 1:8 --gpus-per-replica 1 --host 0.0.0.0
    """
    from distilsd.logging_utils import quiet_libraries
    from distilsd.serve.server import LOOPBACK_HOSTS, serve
    from distilsd.serve.service import ServeSettings

    settings = ServeSettings(
        models=list(models),
        ui=not no_ui,
        safety_checker=not no_safety_checker,
        cors_origins=list(cors_origins),
        # Absolute, so that a Ray replica (another working directory) finds the same folder.
        lora_dir=str(Path(lora_dir).expanduser().resolve()) if lora_dir else None,
        **options,
    )
    settings.validate()
    for flag, given in (
        ("--allow-pickle", settings.allow_pickle),
        ("--lora-skip-unknown", settings.lora_skip_unknown),
    ):
        if given and not lora_dir:
            from distilsd.errors import InputError

            raise InputError(f"{flag} applies to --lora-dir's files", hint="give --lora-dir DIR")
    ray_options = {
        "--replicas": replicas,
        "--autoscale": autoscale,
        "--gpus-per-replica": gpus_per_replica,
        "--cpus-per-replica": cpus_per_replica,
    }
    ray_settings = None
    if use_ray:
        from distilsd.errors import InputError

        if replicas is not None and autoscale is not None:
            raise InputError("--replicas and --autoscale exclude each other", hint="give one of them")
        ray_settings = _ray_settings(replicas, autoscale, ray_address, gpus_per_replica, cpus_per_replica)
    else:
        given = [name for name, value in ray_options.items() if value is not None]
        if given:
            from distilsd.errors import InputError

            raise InputError(f"{given[0]} needs --ray", hint=f"distilsd serve --ray {given[0]} ...")
    if settings.host not in LOOPBACK_HOSTS and not settings.api_key:
        click.secho(
            f"warning: serving on {settings.host} without --api-key: anyone who can reach it can use it",
            err=True,
            fg="yellow",
        )
    quiet_libraries()
    click.echo(f"loading {len(settings.models)} model(s)...", err=True)

    def ready(url: str) -> None:
        click.echo(
            f"serving on {url}  (UI: {url}/ui/, API docs: {url}/docs)"
            if settings.ui
            else f"serving on {url}  (API docs: {url}/docs)"
        )

    if ray_settings is not None:
        from distilsd.serve.ray import serve_on_ray

        where = (
            f"the Ray cluster at {ray_settings.address}"
            if ray_settings.address
            else "a local Ray on 127.0.0.1"
        )
        click.echo(
            f"deploying on {where}: {ray_settings.autoscale or ray_settings.replicas} replica(s)...", err=True
        )
        serve_on_ray(settings, ray_settings, on_ready=ready, log_level=log_level)
        return
    serve(settings, on_ready=ready, log_level=log_level)


def _ray_settings(replicas, autoscale, address, gpus_per_replica, cpus_per_replica):
    """RaySettings from the flags, checked before Ray is imported (its import takes seconds)."""
    import importlib.util

    from distilsd.errors import MissingDependencyError

    # Checked here so that a missing Ray is one line, whatever else is wrong.
    if importlib.util.find_spec("ray") is None:
        raise MissingDependencyError("ray[serve]", "ray", "distilsd serve --ray")
    from distilsd.serve.ray import RaySettings

    ray_settings = RaySettings(
        replicas=1 if replicas is None else replicas,
        autoscale=autoscale,
        address=address or None,
        gpus_per_replica=gpus_per_replica or 0.0,
        cpus_per_replica=1.0 if cpus_per_replica is None else cpus_per_replica,
    )
    ray_settings.validate()
    return ray_settings


@click.command("serve-loadtest", context_settings={"show_default": True})
@click.option("-m", "--model", default=DEFAULT_MODEL, help="Model the server loads.")
@click.option(
    "-n", "--requests", "num_requests", default=100, type=click.IntRange(1, 1000), help="Requests to send."
)
@click.option(
    "-c", "--concurrency", default=16, type=click.IntRange(1, 64), help="Requests in flight at once."
)
@click.option("--steps", default=20, type=click.IntRange(1, 150), help="Denoising steps per request.")
@click.option(
    "--size", default=None, type=int, show_default="model's native size", help="Width and height in pixels."
)
@click.option("--workers", default=1, type=int, help="Server workers.")
@click.option(
    "--torch-threads", default=None, type=int, show_default="torch's default", help="Server torch threads."
)
@click.option("--queue-size", default=16, type=int, help="Server queue size.")
@click.option(
    "--time-limit",
    default=600.0,
    type=FiniteFloat(1, 3600),
    help="Stop sending and report after this many seconds.",
)
@click.option(
    "--ray-replicas",
    default=None,
    type=click.IntRange(1, 16),
    help="Then run the same load against `distilsd serve --ray` with this many replicas (a local Ray) and compare.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def loadtest_command(as_json, ray_replicas, **options):
    """Fire requests at a fresh `distilsd serve` on 127.0.0.1 and report throughput, latency, status counts and memory.

    The server runs in a subprocess on a free loopback port; nothing leaves this machine.
    Passes (exit 0) when no answer is 5xx, every answer is 200 or 429, and the server's
    memory grew by less than 10% from after warm-up to the end. With --ray-replicas the
    same load then goes to a Ray Serve deployment (each replica's memory is reported), and
    both must pass.
    """
    import json

    from distilsd.serve.loadtest import format_comparison, format_report, run_loadtest

    if ray_replicas:
        _ray_settings(ray_replicas, None, None, None, None)  # Ray installed, before the first run
    reports = [run_loadtest(**options)]
    if ray_replicas:
        reports.append(run_loadtest(**options, ray_replicas=ray_replicas))
    if as_json:
        payload = {"single": reports[0], "ray": reports[1]} if ray_replicas else reports[0]
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo("\n\n".join(format_report(report) for report in reports))
        if ray_replicas:
            click.echo("\n" + format_comparison(reports))
    if not all(report["passed"] for report in reports):
        raise SystemExit(1)
