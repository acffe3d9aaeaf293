"""The service behind the web UI and the API: loaded models, a bounded job queue, workers.

Each model is loaded once, at start. A request becomes a :class:`Job` in a bounded
queue; a fixed number of worker threads run jobs through diffusers (``pipeline(...)``),
each image with its own CPU generator seeded ``seed + k`` exactly as
:func:`distilsd.generate.generate_images` does, so an image served here equals the one
``distilsd generate`` writes for the same settings. Progress comes from diffusers'
``callback_on_step_end``, which is also where a cancelled or overdue job stops.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distilsd import __version__
from distilsd.errors import DistilSDError, InputError
from distilsd.generate.metadata import a1111_parameters, png_with_parameters
from distilsd.models import DEFAULT_MODEL, LoadedPipeline, default_guidance, split_base_unet
from distilsd.schedulers import SCHEDULERS, make_scheduler, scheduler_label

MIN_SIZE = 64
MAX_SEED = 2**63 - 1
MAX_INIT_IMAGE_SIZE = 4096  # pixels per side of an uploaded init image or mask


@dataclass
class ServeSettings:
    """Everything ``distilsd serve`` is configured with; limits apply to the UI and the API alike."""

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])  # the first is the default
    device: str = "auto"
    dtype: str = "fp32"
    safety_checker: bool = True
    workers: int = 1  # torch on the CPU already uses every core for one image
    torch_threads: int | None = (
        None  # torch's intra-op threads (None: torch's default); cores / workers on a CPU
    )
    queue_size: int = 16  # jobs waiting (not counting running ones) before 429
    timeout_s: float = 300.0  # per request, queue wait included
    max_size: int = 1024  # pixels per side
    max_steps: int = 150
    max_images: int = 8  # images per request (batch_size x n_iter)
    max_prompt_length: int = 1000  # characters, prompt and negative prompt each
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    ui: bool = True
    host: str = "127.0.0.1"
    port: int = 7860

    def validate(self) -> None:
        for name in ("workers", "queue_size", "max_steps", "max_images", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise InputError(f"--torch-threads {self.torch_threads} must be >= 1")
        if self.timeout_s <= 0:
            raise InputError(f"--timeout {self.timeout_s} must be > 0")
        if self.max_size < MIN_SIZE or self.max_size % 8:
            raise InputError(f"--max-size {self.max_size} must be a multiple of 8 and >= {MIN_SIZE}")
        if not self.models:
            raise InputError("no model to serve", hint="give --model")


class RequestError(InputError):
    """An invalid request; ``field`` is the name of the offending field as the client sent it."""

    def __init__(self, field: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.field = field


class QueueFullError(DistilSDError):
    """The job queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__("the server is busy: the job queue is full", hint=f"retry in {retry_after} s")
        self.retry_after = retry_after


class ServiceUnavailableError(DistilSDError):
    """The server is shutting down and takes no new jobs."""


class JobTimeoutError(DistilSDError):
    """A job did not finish within the per-request time limit."""


class JobCancelledError(DistilSDError):
    """A job was cancelled (its client went away)."""


class _Abort(Exception):
    # Raised inside diffusers' step callback to stop the denoising loop at once.
    pass


@dataclass
class GenerationRequest:
    """One request, in diffusers' vocabulary, whichever API or UI it came from.

    ``field_names`` maps these attribute names to the names the client used (the A1111
    API says ``steps`` for ``num_inference_steps``), so errors name the client's field.
    """

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 25
    guidance_scale: float | None = None  # None: the model's default (generate.default_guidance)
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int | None = None  # None: random; image k uses seed + k
    scheduler: str | None = None  # short name from SCHEDULERS; None: the model's own
    model: str | None = None  # a served model's name; None: the default
    batch_size: int = 1  # images per pipeline call
    n_iter: int = 1  # pipeline calls
    init_image: Any = None  # PIL RGB image: image-to-image
    mask_image: Any = None  # PIL L image: inpainting (white = repaint)
    strength: float = 0.75
    field_names: dict[str, str] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def task(self) -> str:
        if self.init_image is None:
            return "text2image"
        return "inpaint" if self.mask_image is not None else "image2image"

    def name_of(self, attribute: str) -> str:
        return self.field_names.get(attribute, attribute)


@dataclass
class GeneratedImage:
    png: bytes  # PNG with the A1111 ``parameters`` text chunk
    seed: int
    parameters: str
    nsfw: bool = False


class Job:
    """A request on its way through the queue; thread-safe to read from any thread."""

    def __init__(self, request: GenerationRequest, model: str, timeout_s: float):
        self.id = uuid.uuid4().hex
        self.request = request
        self.model = model
        self.status = "queued"  # queued -> running -> done | failed | cancelled
        self.step = 0
        self.total_steps = request.num_inference_steps * request.n_iter
        self.timestamp = time.strftime("%Y%m%d%H%M%S")
        self.created = time.monotonic()
        self.deadline = self.created + timeout_s
        self.started: float | None = None
        self.finished: float | None = None
        self.images: list[GeneratedImage] = []
        self.seeds: list[int] = []
        self.width = 0
        self.height = 0
        self.scheduler = ""
        self.sampler = ""
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def progress(self) -> float:
        if self.done:
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def run_seconds(self) -> float | None:
        """Seconds spent generating (not waiting in the queue)."""
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from the worker thread) once the job is finished; at once if it is."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def result(self) -> list[GeneratedImage]:
        """The images, or the job's error raised."""
        self.wait()
        if self.error is not None:
            raise self.error
        return self.images

    def _finish(self, status: str, error: BaseException | None = None) -> None:
        with self._lock:
            self.status = status
            self.error = error
            self.finished = time.monotonic()
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``BASE`` or ``BASE::UNET`` -> (base, unet or None)."""
    return split_base_unet(spec)


def load_models(settings: ServeSettings) -> dict[str, LoadedPipeline]:
    """Load every model of ``settings`` once; keys are the names clients use (first = default)."""
    from distilsd.generate.loading import load_pipeline

    pipelines: dict[str, LoadedPipeline] = {}
    for spec in settings.models:
        base, unet = parse_model_spec(spec)
        loaded = load_pipeline(
            base,
            unet=unet,
            device=settings.device,
            dtype=settings.dtype,
            safety_checker=settings.safety_checker,
        )
        name, k = loaded.name, 2
        while name in pipelines:  # the same model twice (e.g. with other U-Nets) keeps distinct names
            name, k = f"{loaded.name}-{k}", k + 1
        pipelines[name] = loaded
    return pipelines


class Service:
    """Loaded models, a bounded queue and worker threads, shared by the UI and the API."""

    def __init__(self, settings: ServeSettings, pipelines: dict[str, LoadedPipeline] | None = None):
        settings.validate()
        self.settings = settings
        self.pipelines = pipelines if pipelines is not None else load_models(settings)
        if not self.pipelines:
            raise InputError("no model to serve")
        self.default_model = next(iter(self.pipelines))
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._workers: list[threading.Thread] = []
        self._thread_state = threading.local()  # per-worker copies of what is not thread-safe
        self._accepting = True
        self._stopping = False
        self._mean_run_s = 5.0  # running mean of job times, for Retry-After
        self.counts = {"done": 0, "failed": 0, "cancelled": 0, "timeout": 0, "rejected": 0}
        self.images_generated = 0

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads (idempotent)."""
        with self._cond:
            if self._workers:
                return
            self._accepting, self._stopping = True, False
            if self.settings.torch_threads:
                import torch

                torch.set_num_threads(self.settings.torch_threads)
            for k in range(self.settings.workers):
                thread = threading.Thread(target=self._work, name=f"distilsd-worker-{k}", daemon=True)
                thread.start()
                self._workers.append(thread)

    def stop_accepting(self) -> None:
        """New jobs are refused (503) from now on; queued and running ones still finish."""
        with self._cond:
            self._accepting = False

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let the workers finish every queued and running job, then stop them."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
            workers, self._workers = self._workers, []
        for thread in workers:
            thread.join(timeout)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def healthy(self) -> bool:
        """Accepting jobs, with every worker thread alive (a replica manager restarts one that is not)."""
        with self._cond:
            workers = list(self._workers)
        return self._accepting and bool(workers) and all(thread.is_alive() for thread in workers)

    # -- jobs ------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> str:
        """Check ``request`` against the limits; return the model name it will run on."""
        limits, name = self.settings, request.name_of
        for attribute in ("prompt", "negative_prompt"):
            text = getattr(request, attribute)
            if len(text) > limits.max_prompt_length:
                raise RequestError(
                    name(attribute),
                    f"{name(attribute)} is {len(text)} characters long; the limit is {limits.max_prompt_length}",
                )
        if not 1 <= request.num_inference_steps <= limits.max_steps:
            raise RequestError(
                name("num_inference_steps"),
                f"{name('num_inference_steps')} {request.num_inference_steps} must be between 1 and {limits.max_steps}",
            )
        if request.guidance_scale is not None and (
            not 0 <= request.guidance_scale <= 100 or math.isnan(request.guidance_scale)
        ):
            raise RequestError(
                name("guidance_scale"),
                f"{name('guidance_scale')} {request.guidance_scale} must be between 0 and 100",
            )
        for attribute in ("width", "height"):
            value = getattr(request, attribute)
            if value is None:
                continue
            if value % 8 or not MIN_SIZE <= value <= limits.max_size:
                raise RequestError(
                    name(attribute),
                    f"{name(attribute)} {value} must be a multiple of 8 between {MIN_SIZE} and {limits.max_size}",
                )
        for attribute in ("batch_size", "n_iter"):
            if getattr(request, attribute) < 1:
                raise RequestError(
                    name(attribute), f"{name(attribute)} {getattr(request, attribute)} must be >= 1"
                )
        if request.num_images > limits.max_images:
            what = name("batch_size") if request.n_iter == 1 else f"{name('batch_size')} x {name('n_iter')}"
            raise RequestError(
                name("batch_size"),
                f"{what} asks for {request.num_images} images; the limit is {limits.max_images} per request",
            )
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise RequestError(
                name("seed"),
                f"{name('seed')} {request.seed} must be between 0 and {MAX_SEED} (or -1: random)",
            )
        if request.scheduler is not None and request.scheduler not in SCHEDULERS:
            raise RequestError(
                name("scheduler"),
                f"unknown {name('scheduler')} '{request.scheduler}'",
                hint="choose one of: " + ", ".join(SCHEDULERS),
            )
        if request.init_image is not None:
            if not 0.0 < request.strength <= 1.0:
                raise RequestError(
                    name("strength"), f"{name('strength')} {request.strength} must be in (0, 1]"
                )
            for attribute in ("init_image", "mask_image"):
                image = getattr(request, attribute)
                if image is not None and max(image.size) > MAX_INIT_IMAGE_SIZE:
                    raise RequestError(
                        name(attribute),
                        f"{name(attribute)} is {image.size[0]}x{image.size[1]}; the limit is {MAX_INIT_IMAGE_SIZE} per side",
                    )
            if request.mask_image is not None and request.mask_image.size != request.init_image.size:
                raise RequestError(
                    name("mask_image"),
                    f"the {name('mask_image')} is {request.mask_image.size[0]}x{request.mask_image.size[1]} but the init image is "
                    f"{request.init_image.size[0]}x{request.init_image.size[1]}; refusing to stretch it",
                )
        model = request.model or self.default_model
        if model not in self.pipelines:
            raise RequestError(
                name("model"),
                f"model '{model}' is not served here",
                hint="served models: " + ", ".join(self.pipelines),
            )
        return model

    def submit(self, request: GenerationRequest) -> Job:
        """Validate ``request`` and queue it; raises QueueFullError (429) or ServiceUnavailableError (503)."""
        model = self.validate(request)
        if request.guidance_scale is None:
            request.guidance_scale = default_guidance(self.pipelines[model].source)
        job = Job(request, model, self.settings.timeout_s)
        with self._cond:
            if not self._accepting:
                raise ServiceUnavailableError(
                    "the server is shutting down and takes no new jobs", hint="retry on another instance"
                )
            if len(self._pending) >= self.settings.queue_size:
                self.counts["rejected"] += 1
                raise QueueFullError(self.retry_after())
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: a queued one leaves the queue at once, a running one stops at its next step."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.counts["cancelled"] += 1
                job._finish("cancelled", JobCancelledError("the job was cancelled"))
                return
        job._cancel.set()

    def retry_after(self) -> int:
        """Seconds after which a slot is likely free (for the Retry-After header)."""
        backlog = len(self._pending) + len(self._running)
        return max(1, math.ceil(self._mean_run_s * backlog / self.settings.workers))

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running_jobs(self) -> list[Job]:
        with self._cond:
            return list(self._running)

    # -- workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:  # stopping, and the queue is drained
                    return
                job = self._pending.popleft()
                job.status = "running"
                self._running.append(job)
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running.remove(job)

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        if job.started > job.deadline:
            self.counts["timeout"] += 1
            job._finish(
                "failed",
                JobTimeoutError(f"the job waited longer than the {self.settings.timeout_s:g} s time limit"),
            )
            return
        try:
            job.images = self._generate(job)
        except _Abort as abort:
            if str(abort) == "timeout":
                self.counts["timeout"] += 1
                limit = self.settings.timeout_s
                job._finish(
                    "failed",
                    JobTimeoutError(
                        f"the job did not finish within the {limit:g} s time limit",
                        hint="ask for fewer steps or images",
                    ),
                )
            else:
                self.counts["cancelled"] += 1
                job._finish("cancelled", JobCancelledError("the job was cancelled"))
            return
        except DistilSDError as exc:
            self.counts["failed"] += 1
            job._finish("failed", exc)
            return
        except Exception as exc:  # a bug or a torch error: reported as a 500, the worker lives on
            self.counts["failed"] += 1
            job._finish("failed", exc)
            return
        run_s = time.monotonic() - job.started
        self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * run_s
        self.counts["done"] += 1
        self.images_generated += len(job.images)
        job._finish("done")

    def _worker_tokenizer(self, loaded: LoadedPipeline):
        """This worker thread's own copy of the model's tokenizer.

        A fast tokenizer keeps its padding and truncation settings on the shared Rust object,
        and a pipeline call tokenizes twice with different padding ("max_length", then
        "longest" to warn about truncation): two threads sharing one tokenizer can encode a
        prompt with the other's padding and get a 3-token embedding instead of 77 tokens.
        """
        import copy

        copies = self._thread_state.__dict__.setdefault("tokenizers", {})
        key = id(loaded.pipeline.tokenizer)
        if key not in copies:
            copies[key] = copy.deepcopy(loaded.pipeline.tokenizer)
        return copies[key]

    def _pipeline_for(self, loaded: LoadedPipeline, request: GenerationRequest):
        """A fresh pipeline object over the loaded modules, so concurrent jobs share weights, not state.

        Schedulers and pipelines keep per-call state (timesteps, guidance scale), so every job
        gets its own; building them is cheap since the modules are shared, not copied.
        """
        from diffusers import (
            StableDiffusionImg2ImgPipeline,
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
        )

        base = loaded.pipeline
        components = dict(base.components)
        if components.get("tokenizer") is not None:
            components["tokenizer"] = self._worker_tokenizer(loaded)
        if request.scheduler is not None:
            components["scheduler"] = make_scheduler(request.scheduler, base.scheduler.config)
        else:
            components["scheduler"] = type(base.scheduler).from_config(base.scheduler.config)
        pipeline_class = {
            "text2image": StableDiffusionPipeline,
            "image2image": StableDiffusionImg2ImgPipeline,
            "inpaint": StableDiffusionInpaintPipeline,
        }[request.task]
        pipe = pipeline_class(
            **components, requires_safety_checker=components.get("safety_checker") is not None
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _generate(self, job: Job) -> list[GeneratedImage]:
        import torch
        from PIL import Image

        request = job.request
        loaded = self.pipelines[job.model]
        pipe = self._pipeline_for(loaded, request)
        default_width, default_height = loaded.default_size
        width, height = request.width, request.height
        init, mask = request.init_image, request.mask_image
        if init is not None:
            # Like `distilsd generate --init-image`: the output size defaults to the init image's.
            width = width or max(MIN_SIZE, min(self.settings.max_size, init.size[0] // 8 * 8))
            height = height or max(MIN_SIZE, min(self.settings.max_size, init.size[1] // 8 * 8))
            if init.size != (width, height):
                init = init.resize((width, height), Image.Resampling.LANCZOS)
                mask = mask.resize((width, height), Image.Resampling.NEAREST) if mask is not None else None
        width, height = width or default_width, height or default_height
        scheduler, sampler = scheduler_label(pipe.scheduler)
        base_seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        job.seeds = [base_seed + k for k in range(request.num_images)]
        job.width, job.height, job.scheduler, job.sampler = width, height, scheduler, sampler

        def on_step_end(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
            if job._cancel.is_set():
                raise _Abort("cancelled")
            if time.monotonic() > job.deadline:
                raise _Abort("timeout")
            # The number of steps actually run (image-to-image runs strength x steps).
            job.total_steps = pipeline.num_timesteps * request.n_iter
            job.step += 1
            return callback_kwargs

        images: list[GeneratedImage] = []
        for start in range(0, request.num_images, request.batch_size):
            seeds = job.seeds[start : start + request.batch_size]
            call: dict[str, Any] = {
                "prompt": [request.prompt] * len(seeds),
                "negative_prompt": [request.negative_prompt] * len(seeds),
                "num_inference_steps": request.num_inference_steps,
                "guidance_scale": request.guidance_scale,
                "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                "callback_on_step_end": on_step_end,
            }
            if init is None:
                call.update(height=height, width=width)
            else:
                call.update(image=[init] * len(seeds), strength=request.strength)
                if mask is not None:
                    call.update(mask_image=[mask] * len(seeds), height=height, width=width)
            with torch.inference_mode():
                output = pipe(**call)
            flags = getattr(output, "nsfw_content_detected", None) or [False] * len(seeds)
            for image, seed, nsfw in zip(output.images, seeds, flags, strict=True):
                parameters = a1111_parameters(
                    request.prompt, request.negative_prompt, steps=request.num_inference_steps, sampler=sampler,
                    cfg_scale=request.guidance_scale, seed=seed, width=width, height=height, model=loaded.name,
                    version=f"distilsd {__version__}", denoising_strength=request.strength if init is not None else None,
                    extra={"Mask": "yes"} if mask is not None else None,
                )  # fmt: skip
                images.append(
                    GeneratedImage(png_with_parameters(image, parameters), seed, parameters, bool(nsfw))
                )
        return images
