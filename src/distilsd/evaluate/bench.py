"""Speed and memory of SD models, per component (``distilsd bench``).

For every configuration (model x dtype x backend) one worker process holds the model;
the parent drives all workers in turn: for each round, every configuration runs every
component at every resolution once, so slow drift in machine speed hits all alike. The
first ``warmup`` rounds are discarded; the report gives medians of the other ``repeats``.
With ``max_workers`` only that many models are in memory at once: configurations run in
consecutive groups, ordered by dtype and backend first, so the ones a speed-up compares
(same dtype and backend) are interleaved with each other when a group holds all models.

Measured per configuration and resolution:

- ``text_encoder``: one CLIP text encoder call on ``batch`` x 77 tokens;
- ``unet``: one U-Net step on ``batch`` latents (batch 2 = one image with classifier-free guidance);
- ``vae_decode``: decoding one image's latents;
- ``pipeline``: one whole image (text encoding, ``steps`` PNDM steps with guidance, decoding).

From the components an end-to-end estimate per image (text encoder + steps x U-Net step +
VAE decode) is derived beside the measured whole image (``pipeline``), and images per minute.

Besides the models x dtypes x backends grid, ``rows`` (``--row``) name single configurations
that may also differ in steps, guidance (``cfg``: batch 2 per U-Net step; ``none``: batch 1;
``embedded``: batch 1 with the guidance scale as an input, as an LCM student samples with
diffusers' ``LCMScheduler``; an architecture name gets a random ``time_cond_proj_dim`` U-Net),
decoder (the ``full`` VAE or a ``tiny`` one, :mod:`distilsd.tiny_vae`), DeepCache and token
merging (``tome=R``, :mod:`distilsd.token_merging`), e.g.
``"sd-v1 steps=50"`` against ``"bk-tiny steps=25 decoder=tiny backend=openvino-int8"``. Peak RAM is the worker's resident set size,
sampled every 10 ms while its measured calls ran (weights, activations and the worker's
Python/torch runtime; one process per configuration so models do not share the number);
peak GPU memory is ``torch.cuda.max_memory_allocated``. Parameters are counted on the built
models; U-Net MACs (batch 1, FlopCounterMode on the meta device) come from
:func:`distilsd.compress.analysis.measure_macs`.

Models are pipeline folders / hub ids / built-in names (real weights), or architecture
only, with random weights: ``sd-v1``, ``sd-v2`` (shipped configs) and students of them,
``sd-v1:bk-tiny`` (``bk-tiny`` alone means ``sd-v1:bk-tiny``).

A backend (:mod:`distilsd.evaluate.bench_backends`) turns a model's components into runners of
one call each: pytorch, openvino, openvino-int8, onnx.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distilsd.errors import DistilSDError, InputError, MissingDependencyError, ModelLoadError
from distilsd.evaluate.bench_backends import BACKENDS, ModelComponents, release_freed_memory
from distilsd.logging_utils import get_verbosity
from distilsd.schedulers import FewStepDefaults

logger = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "unet", "vae_decode", "pipeline")
RSS_SAMPLE_SECONDS = 0.01
# How worker processes start. spawn (the default): a fresh interpreter per configuration, which
# imports torch, diffusers and transformers itself (~8 s on a 2-core CPU), so its peak RAM is a
# standalone process's. forkserver: workers fork from one process that imported them once
# (WORKER_PRELOAD; importing them starts no threads and touches no GPU, so forking after them
# is safe): the imports are paid once per distilsd process, but a forked worker's resident set
# leaves out the library pages it never touched itself (~0.3 GiB of torch's), so its peak RAM
# reads lower than a standalone process's.
WORKER_START_METHODS = ("spawn", "forkserver")
DEFAULT_WORKER_START = "spawn"
WORKER_PRELOAD = ["torch", "diffusers", "transformers"]


# --------------------------------------------------------------------------- what to measure


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: real weights (``source``) or an architecture with random weights."""

    name: str  # as given on the command line
    architecture: str | None = None  # sd-v1 / sd-v2 for random-weight models
    layout: str | None = None  # a compress preset (bk-base, ...) applied to the architecture
    source: str | None = None  # pipeline folder, hub id or built-in name

    @property
    def random_weights(self) -> bool:
        return self.architecture is not None


def parse_model(name: str) -> ModelSpec:
    """``sd-v1``, ``sd-v1:bk-tiny``, ``bk-tiny`` (= ``sd-v1:bk-tiny``), or a real model."""
    from distilsd.models import parse_architecture

    text = name.strip()
    parsed = parse_architecture(text)
    if parsed is not None:
        return ModelSpec(text, architecture=parsed[0], layout=parsed[1])
    return ModelSpec(text, source=text)


DEFAULT_BENCH_STEPS = 25  # generate's, for a model that is not an LCM
DEFAULT_BENCH_BATCH = 2  # one image with classifier-free guidance


def lcm_defaults(spec: ModelSpec) -> FewStepDefaults | None:
    """The steps an LCM model (a real folder or built-in, not an architecture) samples with; None for others."""
    if spec.source is None:
        return None
    from distilsd.schedulers import few_step_defaults

    return few_step_defaults(spec.source)


# classifier-free guidance (U-Net batch 2), none (batch 1), or embedded: an LCM student's
# guidance-scale embedding (batch 1, LCMScheduler).
GUIDANCE_MODES = ("cfg", "none", "embedded")
LCM_GUIDANCE_EMBEDDING = 256  # time_cond_proj_dim of diffusers' LCM students (SD v1.5, SDXL)
ROW_KEYS = ("dtype", "backend", "steps", "guidance", "decoder", "deepcache", "tome")


@dataclass(frozen=True)
class Configuration:
    model: ModelSpec
    dtype: str
    backend: str
    # Set by a --row; None: the grid's --steps / --batch-size, the full VAE, no DeepCache.
    steps: int | None = None
    guidance: str | None = None
    decoder: str = "full"  # full | tiny | a tiny VAE folder
    deepcache: int | None = None
    tome: float | None = None  # token merging ratio (distilsd.token_merging)

    @property
    def label(self) -> str:
        extras = [
            f"{key}={value}"
            for key, value in (
                ("steps", self.steps),
                ("guidance", self.guidance),
                ("decoder", None if self.decoder == "full" else self.decoder),
                ("deepcache", self.deepcache),
                ("tome", self.tome),
            )
            if value is not None
        ]
        return " ".join([self.model.name, self.dtype, self.backend, *extras])

    def batch_size(self, settings: BenchSettings) -> int:
        return settings.batch_size if self.guidance is None else (2 if self.guidance == "cfg" else 1)

    def num_steps(self, settings: BenchSettings) -> int:
        return self.steps or settings.steps


def parse_row(text: str, settings: BenchSettings) -> Configuration:
    """``"bk-tiny steps=25 decoder=tiny backend=openvino-int8"``: one configuration."""
    model, *options = text.split()
    lcm = lcm_defaults(parse_model(model))
    values: dict[str, str] = {
        "dtype": settings.dtypes[0],
        "backend": settings.backends[0],
        # An LCM model samples with its guidance as an embedding (one U-Net batch), as generate runs it.
        "guidance": "cfg" if lcm is None else "embedded",
    }
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ROW_KEYS:
            raise InputError(
                f"--row '{text}': '{option}' is not key=value with a key of {', '.join(ROW_KEYS)}",
                hint='e.g. --row "bk-tiny steps=25 guidance=cfg decoder=tiny backend=openvino-int8"',
            )
        values[key] = value
    numbers = {}
    for key in ("steps", "deepcache"):
        if key in values:
            if not values[key].isdigit() or int(values[key]) < 1:
                raise InputError(f"--row '{text}': {key} must be a whole number >= 1")
            numbers[key] = int(values[key])
    tome = None
    if "tome" in values:
        from distilsd.token_merging import MAX_RATIO

        try:
            tome = float(values["tome"])
        except ValueError:
            tome = -1.0
        if not 0 < tome <= MAX_RATIO:
            raise InputError(f"--row '{text}': tome must be a number in (0, {MAX_RATIO}]")
    if values["guidance"] not in GUIDANCE_MODES:
        raise InputError(f"--row '{text}': guidance must be one of {', '.join(GUIDANCE_MODES)}")
    configuration = Configuration(
        parse_model(model), values["dtype"], values["backend"], numbers.get("steps", settings.steps_for(lcm)),
        values["guidance"], values.get("decoder", "full"), numbers.get("deepcache"), tome,
    )  # fmt: skip
    for key, value in (("deepcache", configuration.deepcache), ("tome", configuration.tome)):
        if value and configuration.backend != "pytorch":
            raise InputError(
                f"--row '{text}': {key} needs backend=pytorch (an export runs the U-Net as one graph)"
            )
    return configuration


@dataclass
class BenchSettings:
    models: list[str]
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    backends: list[str] = field(default_factory=lambda: ["pytorch"])
    resolutions: list[int] = field(default_factory=lambda: [512])
    components: list[str] = field(default_factory=lambda: ["unet"])
    # U-Net and text encoder batch: 2 = one image with classifier-free guidance. None: 2, and for
    # an LCM model 1 with its guidance as an embedding (guidance=embedded), as generate runs it.
    batch_size: int | None = None
    # For the end-to-end estimate and the pipeline component. None: 25, or an LCM model's own.
    steps: int | None = None
    warmup: int = 1
    repeats: int = 3
    baseline: str | None = None  # default: the first model
    device: str = "auto"
    threads: int | None = None  # torch threads per worker; None: torch's default
    max_workers: int | None = None  # models held in memory at once; None: all configurations
    rows: list[str] = field(default_factory=list)  # single configurations (parse_row), after the grid
    worker_start: str | None = None  # WORKER_START_METHODS; None: DEFAULT_WORKER_START
    # Whether --steps / --batch-size were given (else an LCM model takes its own); set from them.
    steps_given: bool = field(init=False, default=False)
    batch_size_given: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.steps_given, self.batch_size_given = self.steps is not None, self.batch_size is not None
        self.steps = DEFAULT_BENCH_STEPS if self.steps is None else self.steps
        self.batch_size = DEFAULT_BENCH_BATCH if self.batch_size is None else self.batch_size

    def steps_for(self, lcm: FewStepDefaults | None) -> int:
        """The steps of a configuration that does not set its own: --steps, else an LCM model's."""
        return lcm.num_inference_steps if lcm is not None and not self.steps_given else self.steps

    def grid_configuration(self, spec: ModelSpec, dtype: str, backend: str) -> Configuration:
        """One configuration of the models x dtypes x backends grid: an LCM model with its own steps
        and embedded guidance unless --steps / --batch-size say otherwise."""
        lcm = lcm_defaults(spec)
        if lcm is None:
            return Configuration(spec, dtype, backend)
        steps = None if self.steps_given else lcm.num_inference_steps
        return Configuration(spec, dtype, backend, steps, None if self.batch_size_given else "embedded")

    def validate(self) -> list[Configuration]:
        from distilsd.models import DTYPES, architecture_configs

        if not self.models and not self.rows:
            raise InputError(
                "no model to benchmark", hint="give --model (e.g. sd-v1, bk-tiny, a pipeline folder) or --row"
            )
        specs = [parse_model(name) for name in self.models]
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise InputError("a model is given twice")
        rows = [parse_row(text, self) for text in self.rows]
        for dtype in {*self.dtypes, *(row.dtype for row in rows)}:
            if dtype not in DTYPES:
                raise InputError(f"unknown dtype '{dtype}'", hint="use " + ", ".join(DTYPES))
        for backend in {*self.backends, *(row.backend for row in rows)}:
            if backend not in BACKENDS:
                raise InputError(f"unknown backend '{backend}'", hint="available: " + ", ".join(BACKENDS))
        for component in self.components:
            if component not in COMPONENTS:
                raise InputError(f"unknown component '{component}'", hint="use " + ", ".join(COMPONENTS))
        for resolution in self.resolutions:
            if resolution % 8 or not 64 <= resolution <= 2048:
                raise InputError(f"--resolution {resolution} must be a multiple of 8 in 64..2048")
        if self.batch_size < 1 or self.steps < 1 or self.warmup < 0 or self.repeats < 1:
            raise InputError("--batch-size, --steps and --repeats must be >= 1 and --warmup >= 0")
        if self.worker_start is not None and self.worker_start not in WORKER_START_METHODS:
            raise InputError(
                f"unknown worker start '{self.worker_start}'", hint="use " + ", ".join(WORKER_START_METHODS)
            )
        all_names = list(dict.fromkeys([*names, *(row.model.name for row in rows)]))
        if self.baseline is None:
            self.baseline = all_names[0]
        elif self.baseline not in all_names:
            raise InputError(
                f"the baseline '{self.baseline}' is not one of the models",
                hint="models: " + ", ".join(all_names),
            )
        for spec in [*specs, *(row.model for row in rows)]:
            if spec.random_weights:
                architecture_configs(spec.name)  # checks the layout against the architecture
        if self.max_workers is not None and self.max_workers < 1:
            raise InputError(f"--max-workers {self.max_workers} must be >= 1")
        # dtype-major: with --max-workers, configurations that are compared with each other
        # (same dtype and backend) share a group, and so are interleaved with each other.
        configurations = [
            self.grid_configuration(spec, dtype, backend)
            for dtype in self.dtypes
            for backend in self.backends
            for spec in specs
        ] + rows
        labels = [c.label for c in configurations]
        if len(set(labels)) != len(labels):
            raise InputError(
                "a configuration is given twice: "
                + ", ".join(sorted({x for x in labels if labels.count(x) > 1}))
            )
        return configurations


# --------------------------------------------------------------------------- models and backends


def build_components(
    spec: ModelSpec,
    dtype: str,
    device: str,
    components: list[str],
    decoder: str = "full",
    guidance_embedded: bool = False,
) -> ModelComponents:
    """Load (real weights) or build (random weights) what ``components`` need.

    ``decoder`` other than ``full`` adds a tiny VAE (``tiny``: the model's own, random for an
    architecture; or a folder) as the decoder that ``vae_decode`` and ``pipeline`` run.
    ``guidance_embedded`` makes an LCM student: a U-Net without a guidance-scale embedding gets a
    random one (speed only), and the pipeline diffusers' ``LCMScheduler``.
    """
    from distilsd.models import (
        BUILTIN_MODELS,
        load_torch_pipeline,
        random_pipeline,
        resolve_device,
        resolve_dtype,
    )

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if spec.source is not None:
        pipe = load_torch_pipeline(spec.source, dtype=dtype, device=device, safety_checker=False).pipeline
    else:
        # Built in fp32 (diffusers' init), then cast: random weights, real shapes and dtype.
        pipe = random_pipeline(
            spec.name,
            text_encoder=bool({"text_encoder", "pipeline"} & set(components)),
            vae=bool({"vae_decode", "pipeline"} & set(components)) or decoder != "full",
        ).to(torch_device, torch_dtype)
        release_freed_memory()  # the fp32 copies cast away above, so RSS measures what is kept
    if guidance_embedded:
        _make_lcm_student(pipe, spec, torch_device, torch_dtype)
    full_vae = pipe.vae
    if decoder != "full":
        from distilsd.models import builtin_folder
        from distilsd.tiny_vae import attach_tiny_vae

        folder = None if spec.random_weights else spec.source
        model_folder = (
            builtin_folder(folder) if folder in BUILTIN_MODELS else (Path(folder) if folder else None)
        )
        attach_tiny_vae(pipe, decoder, model_folder=model_folder, random_weights=spec.random_weights)
    return ModelComponents(
        pipe.unet,
        pipe.text_encoder,
        pipe.vae,
        pipe if "pipeline" in components else None,
        torch_device,
        torch_dtype,
        int(pipe.vae_scale_factor),
        full_vae=full_vae,
    )


def _make_lcm_student(pipe, spec: ModelSpec, device, dtype) -> None:
    """Give ``pipe`` an LCM student's guidance-embedding U-Net input (random weights) and sampler."""
    import torch
    from diffusers import LCMScheduler, UNet2DConditionModel

    if pipe.unet.config.get("time_cond_proj_dim") is None:
        if not spec.random_weights:
            # Speed is what is measured: an LCM student of this architecture runs the same
            # layers plus one small projection, whatever its weights.
            logger.warning(
                "%s's U-Net has no guidance embedding (it is not an LCM student): a random one is "
                "added for guidance=embedded (speed only; its images mean nothing)", spec.name,
            )  # fmt: skip
        with torch.random.fork_rng():
            torch.manual_seed(0)
            unet = UNet2DConditionModel.from_config(
                {**pipe.unet.config, "time_cond_proj_dim": LCM_GUIDANCE_EMBEDDING}
            ).to(device, dtype)
        unet.load_state_dict(pipe.unet.state_dict(), strict=False)  # all but the new cond_proj
        pipe.register_modules(unet=unet.eval())
    if not isinstance(pipe.scheduler, LCMScheduler):
        pipe.register_modules(scheduler=LCMScheduler.from_config(pipe.scheduler.config))


# --------------------------------------------------------------------------- worker process


class _PeakRSS:
    """Samples this process's resident set size while a key is active; keeps the peak per key."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.active: str | None = None
        self.peaks: dict[str, int] = {}
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            key = self.active
            if key is not None:
                rss = self.process.memory_info().rss
                if rss > self.peaks.get(key, 0):
                    self.peaks[key] = rss
            time.sleep(RSS_SAMPLE_SECONDS)


def _worker_context(method: str | None):
    """The multiprocessing context workers start in (see WORKER_START_METHODS); spawn where the
    platform has no forkserver (Windows)."""
    method = method or DEFAULT_WORKER_START
    if method == "spawn" or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)  # no effect once the server runs
    return context


def _worker_main(
    connection,
    configuration: Configuration,
    settings: BenchSettings,
    verbosity: int = logging.WARNING,
    environment: dict[str, str] | None = None,
    scratch: str | None = None,
) -> None:
    """Build one configuration's model, then run components on request until told to stop.

    ``scratch`` is a folder the parent made and removes when the worker has ended: the worker's
    temporary files (an exported backend's models, about 0.5 GB for bk-tiny) go there, so they are removed
    even when the worker is killed, which skips its own clean-up.
    """
    if environment is not None:
        # The forkserver holds the environment of its start; a worker runs in its parent's now
        # (DISTILSD_CACHE, for one, says where exports are cached).
        os.environ.clear()
        os.environ.update(environment)
    if scratch is not None:
        tempfile.tempdir = scratch
    try:
        import torch

        from distilsd.logging_utils import quiet_libraries, set_verbosity

        set_verbosity(verbosity)  # a worker logs at its parent's level
        quiet_libraries()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        started = time.perf_counter()
        model = build_components(
            configuration.model,
            configuration.dtype,
            settings.device,
            settings.components,
            configuration.decoder,
            configuration.guidance == "embedded",
        )
        if configuration.deepcache and configuration.deepcache > 1:
            from distilsd.deepcache import enable_deepcache

            enable_deepcache(model.unet, configuration.deepcache)
        if configuration.tome:
            from distilsd.token_merging import enable_token_merging

            enable_token_merging(model.unet, configuration.tome)
        build_seconds = time.perf_counter() - started
        # Sizes first: an exported backend drops the PyTorch modules once it has exported them.
        info: dict[str, Any] = {
            "build_seconds": build_seconds,
            "device": str(model.device),
            "torch_threads": torch.get_num_threads(),
            "params": {
                name: sum(p.numel() for p in module.parameters())
                for name, module in (
                    ("unet", model.unet),
                    ("text_encoder", model.text_encoder),
                    ("vae", model.vae),
                )
                if module is not None
            },
            "weights_bytes": sum(
                p.numel() * p.element_size()
                for module in (model.unet, model.text_encoder, model.vae)
                if module is not None
                for p in module.parameters()
            ),
        }
        try:
            from distilsd.compress.analysis import measure_macs

            info["unet_macs"] = {
                str(r): measure_macs(dict(model.unet.config), r, r, 1, model.vae_scale_factor)[:2]
                for r in settings.resolutions
            }
        except Exception:  # MACs are informative only; never fail the benchmark over them
            info["unet_macs"] = {}
        runners = BACKENDS[configuration.backend](
            model, configuration.batch_size(settings), configuration.num_steps(settings), settings.resolutions
        )
        info["components"] = sorted(runners)
        rss = _PeakRSS()
        connection.send(("ready", info))
        while True:
            message = connection.recv()
            if message[0] == "stop":
                break
            if message[0] == "run":
                _, component, resolution, measured = message
                key = str(resolution)
                if measured:
                    rss.active = key
                    if model.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(model.device)
                started = time.perf_counter()
                runners[component](resolution)
                seconds = time.perf_counter() - started
                rss.active = None
                gpu_peak = (
                    torch.cuda.max_memory_allocated(model.device)
                    if measured and model.device.type == "cuda"
                    else None
                )
                connection.send(("done", seconds, gpu_peak))
            elif message[0] == "memory":
                connection.send(("memory", dict(rss.peaks)))
        rss.running = False
    except DistilSDError as exc:
        connection.send(("error", type(exc).__name__, exc.message, exc.hint))
    except Exception as exc:  # reported to the parent, which fails with the message
        connection.send(
            (
                "error",
                "ModelLoadError",
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                None,
            )
        )
    finally:
        connection.close()


class WorkerDied(ModelLoadError):
    """A worker process ended without answering (killed: usually out of memory)."""


class Worker:
    """The parent's handle on one configuration's worker process."""

    def __init__(self, configuration: Configuration, settings: BenchSettings) -> None:
        context = _worker_context(settings.worker_start)
        self.configuration = configuration
        self.scratch = tempfile.mkdtemp(prefix="distilsd-bench-")
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main,
            args=(child, configuration, settings, get_verbosity(), dict(os.environ), self.scratch),
            daemon=True,
        )
        self.process.start()
        child.close()
        self.info: dict[str, Any] = self._expect("ready")[0]

    def _died(self) -> WorkerDied:
        self.process.join(timeout=5)
        self._remove_scratch()
        return WorkerDied(
            f"the benchmark worker for {self.configuration.label} died (exit code {self.process.exitcode})",
            hint="exit code -9 usually means it ran out of memory: benchmark fewer models or dtypes at once",
        )

    def _send(self, message: tuple) -> None:
        try:
            self.connection.send(message)
        except (BrokenPipeError, ConnectionError):
            raise self._died() from None

    def _expect(self, kind: str) -> tuple:
        try:
            message = self.connection.recv()
        except (EOFError, ConnectionError):
            raise self._died() from None
        if message[0] == "error":
            _, kind_name, text, hint = message
            error_class = {"InputError": InputError, "MissingDependencyError": ModelLoadError}.get(
                kind_name, ModelLoadError
            )
            raise error_class(f"{self.configuration.label}: {text}", hint=hint)
        assert message[0] == kind, message
        return message[1:]

    def run(self, component: str, resolution: int, measured: bool) -> tuple[float, int | None]:
        self._send(("run", component, resolution, measured))
        return self._expect("done")

    def peak_rss(self) -> dict[str, int]:
        self._send(("memory",))
        return self._expect("memory")[0]

    def stop(self) -> None:
        try:
            self.connection.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        if not self.process.is_alive():  # a worker still running may still write there
            shutil.rmtree(self.scratch, ignore_errors=True)


# --------------------------------------------------------------------------- the run


def run_benchmark(
    settings: BenchSettings,
    progress: Callable[[str], None] | None = None,
    on_group_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every configuration interleaved; return per-call times and a summary per row.

    ``on_group_done`` gets the results so far (``"complete": False``) after each group of
    workers, so a long run that is stopped keeps what it measured.
    """
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise MissingDependencyError("psutil", "eval", "distilsd bench (peak memory)") from None
    configurations = settings.validate()
    say = progress or (lambda text: None)
    times: dict[tuple[str, str, str, int, str], list[float]] = {}
    gpu_peaks: dict[tuple[str, str, str, int], int] = {}
    rss: dict[Configuration, dict[str, int]] = {}
    infos: dict[Configuration, dict[str, Any]] = {}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    group_size = settings.max_workers or len(configurations)
    groups = [configurations[i : i + group_size] for i in range(0, len(configurations), group_size)]
    total_rounds = settings.warmup + settings.repeats
    # A worker that dies (out of memory, mostly) costs its own configuration, not the
    # group's: it is reported in "failed" and the others go on being measured.
    failed: dict[str, str] = {}

    def drop(worker: Worker, error: WorkerDied) -> None:
        failed[worker.configuration.label] = error.message
        say(f"{error.message}; going on without it")
        worker.stop()
        workers.remove(worker)

    for group_index, group in enumerate(groups):
        prefix = f"group {group_index + 1}/{len(groups)}: " if len(groups) > 1 else ""
        workers: list[Worker] = []
        try:
            for configuration in group:
                say(f"{prefix}building {configuration.label}")
                try:
                    workers.append(Worker(configuration, settings))
                except WorkerDied as error:
                    failed[configuration.label] = error.message
                    say(f"{error.message}; going on without it")
            for round_index in range(total_rounds):
                measured = round_index >= settings.warmup
                say(f"{prefix}round {round_index + 1}/{total_rounds}" + ("" if measured else " (warm-up)"))
                for worker in list(workers):
                    try:
                        _measure_round(worker, settings, measured, times, gpu_peaks)
                    except WorkerDied as error:
                        drop(worker, error)
            for worker in list(workers):
                try:
                    rss[worker.configuration] = worker.peak_rss()
                    infos[worker.configuration] = worker.info
                except WorkerDied as error:
                    drop(worker, error)
        finally:
            for worker in workers:
                worker.stop()
        if on_group_done is not None and group_index < len(groups) - 1:
            done = [c for g in groups[: group_index + 1] for c in g if c in infos]
            partial = _summarize(settings, done, groups[: group_index + 1], times, gpu_peaks, rss, infos)
            on_group_done(
                {**partial, "failed": dict(failed), "load_average_before": load_before, "complete": False}
            )
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    measured_configurations = [c for c in configurations if c in infos]
    results = _summarize(settings, measured_configurations, groups, times, gpu_peaks, rss, infos)
    return {
        **results,
        "failed": failed,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "complete": True,
    }


def _measure_round(worker: Worker, settings: BenchSettings, measured: bool, times, gpu_peaks) -> None:
    """One call of every component at every resolution on ``worker``; keeps measured times."""
    c = worker.configuration
    for resolution in settings.resolutions:
        for component in settings.components:
            if component not in worker.info["components"]:
                continue
            seconds, gpu_peak = worker.run(component, resolution, measured)
            if measured:
                times.setdefault((c.label, resolution, component), []).append(seconds)
                if gpu_peak is not None:
                    key = (c.label, resolution)
                    gpu_peaks[key] = max(gpu_peaks.get(key, 0), gpu_peak)


def _summarize(settings, configurations, groups, times, gpu_peaks, rss, infos) -> dict[str, Any]:
    """Medians, memory, MACs and speed-ups per (configuration, resolution) row."""
    rows = []
    for configuration in configurations:
        c, info = configuration, infos[configuration]
        for resolution in settings.resolutions:
            medians = {
                component: statistics.median(times[(c.label, resolution, component)])
                for component in settings.components
                if (c.label, resolution, component) in times
            }
            macs = info["unet_macs"].get(str(resolution))
            row: dict[str, Any] = {
                "model": c.model.name,
                "weights": "random" if c.model.random_weights else "real",
                "dtype": c.dtype,
                "backend": c.backend,
                "label": c.label,
                "resolution": resolution,
                "batch_size": c.batch_size(settings),
                "steps": c.num_steps(settings),
                "guidance": c.guidance or ("cfg" if settings.batch_size > 1 else "none"),
                "decoder": c.decoder,
                "deepcache": c.deepcache,
                "tome": c.tome,
                "median_seconds": medians,
                "times_seconds": {comp: times[(c.label, resolution, comp)] for comp in medians},
                "peak_ram_gib": rss[configuration].get(str(resolution), 0) / 2**30 or None,
                "peak_gpu_gib": gpu_peaks[(c.label, resolution)] / 2**30
                if (c.label, resolution) in gpu_peaks
                else None,
                "unet_params": info["params"].get("unet"),
                "params": info["params"],
                "unet_gmacs": macs[0] / 1e9 if macs else None,
                "unet_attention_gmacs": macs[1] / 1e9 if macs else None,
                "device": info["device"],
                "torch_threads": info["torch_threads"],
                "build_seconds": info["build_seconds"],
            }
            if {"text_encoder", "unet", "vae_decode"} <= set(medians):
                estimate = medians["text_encoder"] + row["steps"] * medians["unet"] + medians["vae_decode"]
                row["end_to_end_estimate_seconds"] = estimate
            if "pipeline" in medians:
                row["end_to_end_seconds"] = medians["pipeline"]
            seconds_per_image = row.get("end_to_end_seconds", row.get("end_to_end_estimate_seconds"))
            row["images_per_minute"] = 60.0 / seconds_per_image if seconds_per_image else None
            rows.append(row)

    # Speed-up against the baseline model on the first dtype and backend at the same
    # resolution: sd-v1 on PyTorch fp32 is the reference a compressed or exported model is
    # measured against, so OpenVINO or int8 rows show their gain over it, not over themselves.
    baseline = baseline_configuration(settings, configurations)
    baseline_rows = {
        r["resolution"]: r for r in rows if baseline is not None and r["label"] == baseline.label
    }
    for row in rows:
        base = baseline_rows.get(row["resolution"])
        row["speedup_vs_baseline"] = {
            comp: base["median_seconds"][comp] / value
            for comp, value in row["median_seconds"].items()
            if base and comp in base["median_seconds"] and value > 0
        }
    return {"rows": rows, "groups": [[c.label for c in group] for group in groups]}


# --------------------------------------------------------------------------- reports


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def baseline_configuration(settings: BenchSettings, configurations) -> Configuration | None:
    """The first configuration of the baseline model (the grid's first dtype and backend, else its first row)."""
    return next((c for c in configurations if c.model.name == settings.baseline), None)


def differs_by_row(settings: BenchSettings) -> bool:
    """Whether configurations differ in steps or guidance (rows, or an LCM model's own): columns of their own."""
    return bool(settings.rows) or any(
        c.steps is not None or c.guidance is not None for c in settings.validate()
    )


def baseline_label(settings: BenchSettings) -> str:
    """``sd-v1``, or ``sd-v1 pytorch fp32`` when several backends or dtypes are compared."""
    if differs_by_row(settings):
        baseline = baseline_configuration(settings, settings.validate())
        return baseline.label if baseline else settings.baseline
    if len(settings.backends) == 1 and len(settings.dtypes) == 1:
        return settings.baseline
    return f"{settings.baseline} {settings.backends[0]} {settings.dtypes[0]}"


def markdown_table(results: dict[str, Any], settings: BenchSettings) -> str:
    """One row per model x dtype x backend x resolution; medians in seconds."""
    components = [c for c in ("text_encoder", "unet", "vae_decode", "pipeline") if c in settings.components]
    per_row = differs_by_row(settings)  # steps, guidance and decoder differ by row: columns of their own
    titles = {
        "text_encoder": "text enc. (s)",
        "unet": "U-Net step (s)",
        "vae_decode": "VAE decode (s)",
        "pipeline": "whole image, measured (s)" if per_row else f"image, {settings.steps} steps (s)",
    }
    header = ["model", "dtype", "backend", "px"]
    if per_row:
        header += ["steps", "guidance", "decoder", "deepcache", "tome"]
    for component in components:
        header.append(titles[component])
        # Rows carry long labels: the baseline is named once, under the table.
        header.append("vs baseline" if per_row else f"vs {baseline_label(settings)}")
    has_estimate = any("end_to_end_estimate_seconds" in row for row in results["rows"])
    if has_estimate:
        header.append("sum of parts (s/image)" if per_row else f"est. s/image ({settings.steps} steps)")
    header += ["images/min", "peak RAM (GiB)"]
    if any(row["peak_gpu_gib"] for row in results["rows"]):
        header.append("peak GPU (GiB)")
    header += ["U-Net params (M)", "U-Net GMACs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in results["rows"]:
        cells = [row["model"], row["dtype"], row["backend"], str(row["resolution"])]
        if per_row:
            cells += [str(row["steps"]), row["guidance"], row["decoder"], str(row["deepcache"] or "-"),
                      f"{row['tome']:g}" if row.get("tome") else "-"]  # fmt: skip
        for component in components:
            cells.append(_seconds(row["median_seconds"].get(component)))
            speedup = row["speedup_vs_baseline"].get(component)
            cells.append(f"{speedup:.2f}x" if speedup else "-")
        if has_estimate:
            cells.append(_seconds(row.get("end_to_end_estimate_seconds")))
        cells.append(f"{row['images_per_minute']:.2f}" if row["images_per_minute"] else "-")
        cells.append(f"{row['peak_ram_gib']:.2f}" if row["peak_ram_gib"] else "-")
        if "peak GPU (GiB)" in header:
            cells.append(f"{row['peak_gpu_gib']:.2f}" if row["peak_gpu_gib"] else "-")
        cells.append(f"{row['unet_params'] / 1e6:.1f}" if row["unet_params"] else "-")
        cells.append(f"{row['unet_gmacs']:.1f}" if row["unet_gmacs"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if per_row:
        lines += ["", f"Baseline: {baseline_label(settings)}."]
    if results.get("failed"):
        lines.append("")
        lines.append(
            "Not measured (the worker died, usually out of memory): " + ", ".join(results["failed"]) + "."
        )
    return "\n".join(lines) + "\n"


def bar_chart(
    results: dict[str, Any], settings: BenchSettings, path: Path, component: str = "unet"
) -> Path | None:
    """Grouped bars: median seconds of ``component`` per model, grouped by resolution x dtype x backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "eval", "the benchmark chart") from None

    rows = [row for row in results["rows"] if component in row["median_seconds"]]
    if not rows:
        return None
    models = list(dict.fromkeys(row["model"] for row in rows))
    groups = list(dict.fromkeys((row["resolution"], row["dtype"], row["backend"]) for row in rows))
    value = {
        (row["model"], row["resolution"], row["dtype"], row["backend"]): row["median_seconds"][component]
        for row in rows
    }
    width = 0.8 / len(models)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5))
    for index, model in enumerate(models):
        xs = [g + (index - (len(models) - 1) / 2) * width for g in range(len(groups))]
        ys = [value.get((model, *group), math.nan) for group in groups]
        bars = axes.bar(xs, ys, width, label=model)
        axes.bar_label(
            bars, labels=[_seconds(y) if not math.isnan(y) else "" for y in ys], fontsize=7, padding=1
        )
    axes.set_xticks(range(len(groups)), [f"{r} px\n{d} {b}" for r, d, b in groups])
    axes.set_ylabel(f"median seconds per {component.replace('_', ' ')} call")
    axes.set_title(
        f"{component.replace('_', ' ')}: batch {settings.batch_size}, median of {settings.repeats} after {settings.warmup} warm-up"
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_reports(
    results: dict[str, Any], settings: BenchSettings, output_dir: str | Path, chart: bool = True
) -> dict[str, Path]:
    """``bench.json`` (results record), ``bench.md`` and ``bench.png`` in ``output_dir``."""
    from distilsd.evaluate.records import make_record, write_record

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, settings)
    paths = {"json": write_record(output_dir / "bench.json", make_record("bench", asdict(settings), results))}
    (output_dir / "bench.md").write_text(table, encoding="utf-8")
    paths["markdown"] = output_dir / "bench.md"
    if chart:
        component = "unet" if "unet" in settings.components else settings.components[0]
        written = bar_chart(results, settings, output_dir / "bench.png", component)
        if written:
            paths["chart"] = written
    return paths
