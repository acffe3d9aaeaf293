"""The service behind the web UI and the API: loaded models, a bounded job queue, workers.

Each model is loaded once, at start. A request becomes a :class:`Job` in a bounded
queue; a fixed number of worker threads run jobs through diffusers (``pipeline(...)``),
each image with its own CPU generator seeded ``seed + k`` exactly as
:func:`distilsd.generate.generate_images` does, so an image served here equals the one
``distilsd generate`` writes for the same settings. Progress comes from diffusers'
``callback_on_step_end``, which is also where a cancelled or overdue job stops.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distilsd import __version__
from distilsd.errors import DistilSDError, InputError, RequestError  # noqa: F401 (RequestError: served from here too)
from distilsd.generate import DEFAULT_STEPS
from distilsd.generate.core import pipeline_arguments
from distilsd.generate.metadata import a1111_parameters, png_with_parameters
from distilsd.generate.prompts import MAX_SEED, truncation_warnings
from distilsd.models import DEFAULT_MODEL, LoadedPipeline, default_guidance, pipeline_class, split_base_unet
from distilsd.schedulers import (
    SCHEDULERS,
    SIGMA_SCHEDULES,
    FewStepDefaults,
    apply_few_step_defaults,
    few_step_defaults,
    make_scheduler,
    scheduler_label,
    sigma_schedule_of,
)
from distilsd.serve.loras import (
    MAX_LOADED_LORAS,
    LoRAFile,
    LoRALibrary,
    LoRATag,
    adapter_mix,
    check_words_apart,
    gate_for,
    lora_hashes,
    parse_lora_tags,
    takes_loras,
)

log = logging.getLogger(__name__)

MIN_SIZE = 64
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
    lora_dir: str | None = None  # every LoRA file in it is served by its stem (<lora:NAME:WEIGHT>)
    allow_pickle: bool = False  # serve pickled LoRA files (.ckpt, .pt) of lora_dir too
    lora_skip_unknown: bool = False  # load a LoRA's modules the model has, skip the rest (else a 400)
    max_loaded_loras: int = (
        MAX_LOADED_LORAS  # LoRA adapters kept loaded per model (least recently used unloaded)
    )

    def validate(self) -> None:
        for name in (
            "workers",
            "queue_size",
            "max_steps",
            "max_images",
            "max_prompt_length",
            "max_loaded_loras",
        ):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise InputError(f"--torch-threads {self.torch_threads} must be >= 1")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port {self.port} must be between 0 and 65535 (0: a free one)")
        if self.timeout_s <= 0:
            raise InputError(f"--timeout {self.timeout_s} must be > 0")
        if self.max_size < MIN_SIZE or self.max_size % 8:
            raise InputError(f"--max-size {self.max_size} must be a multiple of 8 and >= {MIN_SIZE}")
        if not self.models:
            raise InputError("no model to serve", hint="give --model")
        if self.lora_dir is not None:
            from pathlib import Path

            if not Path(self.lora_dir).expanduser().is_dir():
                raise InputError(f"--lora-dir {self.lora_dir} is not a folder")


# Measured seconds a denoising step of one image takes, per loaded pipeline and (width, height).
STEP_SECONDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


HIRES_LATENT_MODES = {  # AUTOMATIC1111's latent upscalers -> torch.nn.functional.interpolate arguments
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
HIRES_IMAGE_UPSCALERS = {"None": "LANCZOS", "Lanczos": "LANCZOS", "Nearest": "NEAREST"}  # PIL resampling


@dataclass
class HiresFix:
    """AUTOMATIC1111's hires fix: upscale the first pass, then denoise it again as image-to-image.

    The target size is ``scale`` x the first pass, or ``resize_x`` / ``resize_y`` (0: follow the
    aspect ratio; both set: A1111's crop to fill). ``upscaler`` is a key of HIRES_LATENT_MODES
    (the latents are upscaled) or of HIRES_IMAGE_UPSCALERS (the decoded image is resized).
    """

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    second_pass_steps: int = 0  # 0: as many as the first pass
    denoising_strength: float = 0.7

    def target_size(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(upscaled width, height, crop width, height) in pixels, multiples of 8, as A1111 computes them."""
        if self.resize_x == 0 and self.resize_y == 0:
            up_w, up_h = int(width * self.scale), int(height * self.scale)
            return up_w // 8 * 8, up_h // 8 * 8, up_w // 8 * 8, up_h // 8 * 8
        if self.resize_y == 0:
            up_w, up_h = self.resize_x, self.resize_x * height // width
        elif self.resize_x == 0:
            up_w, up_h = self.resize_y * width // height, self.resize_y
        elif width / height < self.resize_x / self.resize_y:
            up_w, up_h = self.resize_x, self.resize_x * height // width
        else:
            up_w, up_h = self.resize_y * width // height, self.resize_y
        crop_w = min(up_w, self.resize_x or up_w)
        crop_h = min(up_h, self.resize_y or up_h)
        return up_w // 8 * 8, up_h // 8 * 8, crop_w // 8 * 8, crop_h // 8 * 8


def slerp(val: float, low, high):
    """AUTOMATIC1111's spherical interpolation of two noises (``modules/processing.py``), kept as is.

    The norms run over dim 1 of a (C, H, W) noise, as A1111 computes them, so that a
    variation seed mixes the noises exactly as A1111 does.
    """
    import torch

    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(
        1
    ) * high


@dataclass
class GenerationRequest:
    """One request, in diffusers' vocabulary, whichever API or UI it came from.

    ``field_names`` maps these attribute names to the names the client used (the A1111
    API says ``steps`` for ``num_inference_steps``), so errors name the client's field.
    """

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int | None = None  # None: the model's default (Service.model_defaults)
    guidance_scale: float | None = None  # None: the model's default (generate.default_guidance)
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int | None = None  # None: random; image k uses seed + k
    scheduler: str | None = None  # short name from SCHEDULERS; None: the model's own
    sigmas: str | None = None  # key of SIGMA_SCHEDULES (karras, ...); None: the scheduler's own
    model: str | None = None  # a served model's name; None: the default
    batch_size: int = 1  # images per pipeline call
    n_iter: int = 1  # pipeline calls
    init_image: Any = None  # PIL RGB image: image-to-image
    mask_image: Any = None  # PIL L image: inpainting (white = repaint)
    strength: float = 0.75
    subseed: int | None = None  # variation seed of image k: subseed + k (None: random when used)
    subseed_strength: float = 0.0  # 0: the seed's noise alone; 1: the subseed's
    eta: float | None = None  # DDIM's eta (None: 0)
    hires: HiresFix | None = None  # text to image only
    mask_blur: int = 0  # Gaussian blur radius of the mask, pixels (inpainting)
    mask_invert: bool = False  # repaint the black area instead of the white one
    fill_masked: bool = False  # fill the masked area from its surroundings before inpainting (A1111's "fill")
    mask_crop_padding: int | None = None  # inpaint the masked area + this margin only (A1111's)
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
        self.subseeds: list[int] = []
        self.warnings: list[str] = []  # e.g. a prompt cut to the text encoder's window
        self.prompt = request.prompt  # the text encoded: the prompt without its <lora:...> tags
        self.loras: list[tuple[LoRAFile, LoRATag]] = []  # the LoRAs the prompt's tags asked for
        self.width = 0
        self.height = 0
        self.scheduler = ""
        self.sampler = ""
        self.error: BaseException | None = None
        self.interrupted = False  # stopped early by /interrupt: the images are partly denoised
        self._cancel = threading.Event()
        self._stop: str | None = None  # "interrupt" (the whole job) or "skip" (the current batch)
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
        # An LCM model's own steps and guidance (read once: two small JSON files a model).
        self.few_step: dict[str, FewStepDefaults | None] = {
            name: few_step_defaults(loaded.source) for name, loaded in self.pipelines.items()
        }
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._workers: list[threading.Thread] = []
        self._thread_state = threading.local()  # per-worker copies of what is not thread-safe
        self._accepting = True
        self._stopping = False
        self._mean_run_s = 5.0  # running mean of job times, for Retry-After
        self._hashes: dict[str, str] = {}
        self._hash_lock = threading.Lock()
        self.counts = {"done": 0, "failed": 0, "cancelled": 0, "timeout": 0, "rejected": 0}
        self.images_generated = 0
        self.loras = LoRALibrary(settings.lora_dir, settings.allow_pickle) if settings.lora_dir else None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Time each model's steps (for the time estimates), then start the worker threads (idempotent)."""
        if not self._workers:
            self.measure_models()
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
        if (
            request.num_inference_steps is not None
            and not 1 <= request.num_inference_steps <= limits.max_steps
        ):
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
        if request.sigmas is not None and request.sigmas not in SIGMA_SCHEDULES:
            raise RequestError(
                name("sigmas"),
                f"unknown {name('sigmas')} '{request.sigmas}'",
                hint="choose one of: " + ", ".join(SIGMA_SCHEDULES),
            )
        if not 0.0 <= request.subseed_strength <= 1.0:
            raise RequestError(
                name("subseed_strength"),
                f"{name('subseed_strength')} {request.subseed_strength} must be between 0 and 1",
            )
        if request.subseed is not None and not 0 <= request.subseed <= MAX_SEED:
            raise RequestError(
                name("subseed"),
                f"{name('subseed')} {request.subseed} must be between 0 and {MAX_SEED} (or -1: random)",
            )
        if request.eta is not None and not 0.0 <= request.eta <= 1.0:
            raise RequestError(name("eta"), f"{name('eta')} {request.eta} must be between 0 and 1")
        if request.hires is not None:
            self._validate_hires(request)
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
        if request.subseed_strength > 0 and request.init_image is not None:
            raise RequestError(
                name("subseed_strength"), f"{name('subseed_strength')} applies to text to image only here"
            )
        _, loras = self.prompt_loras(request, model)  # a missing or unfitting LoRA is a 400 now
        few_step = self.few_step_of(model, loras)
        request.num_inference_steps, request.guidance_scale, request.scheduler = self.sampling_defaults(
            model, request.num_inference_steps, request.guidance_scale, request.scheduler, few_step
        )
        if request.num_inference_steps > limits.max_steps:  # an LCM model's (or LCM-LoRA's) own steps
            owner = "the prompt's LCM-LoRA" if few_step is not None and few_step.lora else model
            raise RequestError(
                name("num_inference_steps"),
                f"{owner}'s default of {request.num_inference_steps} steps is above this server's limit of {limits.max_steps}",
                hint=f"ask for {name('num_inference_steps')} <= {limits.max_steps}",
            )
        self._scheduler_for(self.pipelines[model], request)  # an impossible scheduler is a 400 now, not later
        self._check_time(request, model)
        return model

    def model_defaults(
        self,
        model: str,
        steps: int | None = None,
        guidance: float | None = None,
        scheduler: str | None = None,
    ) -> tuple[int, float]:
        """``(steps, guidance)``: those given, else ``model``'s defaults, as ``generate``'s.

        25 steps and the model's guidance, or an LCM model's own (4 LCM steps); a ``scheduler``
        other than lcm/tcd on an LCM model is warned about.
        """
        return self.sampling_defaults(model, steps, guidance, scheduler, self.few_step[model])[:2]

    def few_step_of(
        self, model: str, loras: list[tuple[LoRAFile, LoRATag]] | tuple = ()
    ) -> FewStepDefaults | None:
        """The few-step defaults of ``model`` with a prompt's ``loras``: an LCM-LoRA's among them
        (whatever its weight), else an LCM model's own, else None; ``generate --lora``'s rule."""
        if not loras:
            return self.few_step[model]  # read once, at start
        return few_step_defaults(self.pipelines[model].source, [lora.path for lora, _ in loras])

    def sampling_defaults(
        self,
        model: str,
        steps: int | None,
        guidance: float | None,
        scheduler: str | None,
        few_step: FewStepDefaults | None,
    ) -> tuple[int, float, str | None]:
        """``(steps, guidance, scheduler)``: those given, else ``few_step``'s, else 25 steps, the
        model's guidance and its own scheduler (None); an LCM-LoRA's scheduler is lcm."""
        steps, guidance, scheduler = apply_few_step_defaults(few_step, steps, guidance, scheduler)
        return (
            DEFAULT_STEPS if steps is None else steps,
            default_guidance(self.pipelines[model].source) if guidance is None else guidance,
            scheduler,
        )

    def prompt_loras(
        self, request: GenerationRequest, model: str
    ) -> tuple[str, list[tuple[LoRAFile, LoRATag]]]:
        """(the text to encode, the LoRAs its ``<lora:NAME:WEIGHT>`` tags ask for), each checked against ``model``."""
        field_name = request.name_of("prompt")
        prompt, tags = parse_lora_tags(request.prompt, field_name)
        negative_field = request.name_of("negative_prompt")
        _, negative_tags = parse_lora_tags(request.negative_prompt, negative_field)
        if negative_tags:
            raise RequestError(
                negative_field, f"<lora:...> tags go in the {field_name}, not the {negative_field}"
            )
        if not tags:
            return prompt, []
        if self.loras is None:
            raise RequestError(
                field_name,
                f"the {field_name} asks for LoRA '{tags[0].name}', but this server serves no LoRAs",
                hint="start it with --lora-dir DIR",
            )
        loaded = self.pipelines[model]
        if not takes_loras(loaded.pipeline):
            raise RequestError(
                field_name,
                f"model '{model}' is an export with fixed weights: it takes no LoRAs",
                hint="fuse the LoRA into the export: distilsd export MODEL --lora PATH[:SCALE]",
            )
        gate = gate_for(loaded.pipeline)
        used = []
        for tag in tags:
            lora = self.loras.find(tag.name, field_name)
            try:
                gate.check(lora, self.settings.allow_pickle, self.settings.lora_skip_unknown)
            except RequestError as exc:
                raise RequestError(
                    field_name, f"LoRA '{tag.name}' on model '{model}': {exc.message}", exc.hint
                ) from None
            used.append((lora, tag))
        check_words_apart(used, field_name)
        return prompt, used

    def _validate_hires(self, request: GenerationRequest) -> None:
        hires, name, limits = request.hires, request.name_of, self.settings
        if request.init_image is not None:
            raise RequestError(name("hires"), f"{name('hires')} applies to text to image only")
        if hires.upscaler not in HIRES_LATENT_MODES and hires.upscaler not in HIRES_IMAGE_UPSCALERS:
            raise RequestError(
                name("hires.upscaler"),
                f"{name('hires.upscaler')} '{hires.upscaler}' is not available here (no upscaling models)",
                hint="choose one of: " + ", ".join([*HIRES_LATENT_MODES, *HIRES_IMAGE_UPSCALERS]),
            )
        if not 1.0 <= hires.scale <= 8.0 or math.isnan(hires.scale):
            raise RequestError(
                name("hires.scale"), f"{name('hires.scale')} {hires.scale} must be between 1 and 8"
            )
        if not 0 <= hires.second_pass_steps <= limits.max_steps:
            raise RequestError(
                name("hires.second_pass_steps"),
                f"{name('hires.second_pass_steps')} {hires.second_pass_steps} must be between 0 and {limits.max_steps}",
            )
        if not 0.0 < hires.denoising_strength <= 1.0:
            raise RequestError(
                name("hires.denoising_strength"),
                f"{name('hires.denoising_strength')} {hires.denoising_strength} must be in (0, 1]",
            )
        for attribute in ("resize_x", "resize_y"):
            value = getattr(hires, attribute)
            if value != 0 and not MIN_SIZE <= value <= limits.max_size:
                raise RequestError(
                    name(f"hires.{attribute}"),
                    f"{name(f'hires.{attribute}')} {value} must be 0 or between {MIN_SIZE} and {limits.max_size}",
                )
        width, height = self._output_size(request, request.model or self.default_model)
        up_w, up_h, _, _ = hires.target_size(width, height)
        if not (MIN_SIZE <= up_w <= limits.max_size and MIN_SIZE <= up_h <= limits.max_size):
            raise RequestError(
                name("hires.scale"),
                f"the hires fix would make {up_w}x{up_h} images; sizes are limited to {MIN_SIZE}..{limits.max_size} pixels",
            )

    def _output_size(self, request: GenerationRequest, model: str) -> tuple[int, int]:
        """(width, height) of the images ``request`` makes (before a hires fix)."""
        loaded = self.pipelines.get(model)
        default_width, default_height = loaded.default_size if loaded else (512, 512)
        width, height = request.width, request.height
        if request.init_image is not None:
            # Like `distilsd generate --init-image`: the output size defaults to the init image's.
            init = request.init_image
            width = width or max(MIN_SIZE, min(self.settings.max_size, init.size[0] // 8 * 8))
            height = height or max(MIN_SIZE, min(self.settings.max_size, init.size[1] // 8 * 8))
        return width or default_width, height or default_height

    # -- time estimates --------------------------------------------------------------------

    def step_seconds(self, model: str, width: int, height: int) -> float | None:
        """Estimated seconds of one denoising step of one image (guidance included) at this size.

        From the measurement of this model nearest in size (at start, and of every job since),
        scaled by the number of pixels: attention grows faster than that, so this is a lower bound.
        """
        measured = self._timings(model)
        if not measured:
            return None
        pixels = width * height
        (mw, mh), seconds = min(
            measured.items(), key=lambda item: abs(math.log(item[0][0] * item[0][1] / pixels))
        )
        return seconds * pixels / (mw * mh)

    def estimate_seconds(self, request: GenerationRequest, model: str) -> float | None:
        """Estimated generation time of ``request`` (queue wait not included); None before any measurement."""
        width, height = self._output_size(request, model)
        per_step = self.step_seconds(model, width, height)
        if per_step is None:
            return None
        steps = request.num_inference_steps
        if request.init_image is not None:
            steps = max(1, int(steps * request.strength))
        total = per_step * steps * request.num_images
        if request.hires is not None:
            up_w, up_h, _, _ = request.hires.target_size(width, height)
            hires_steps = int(
                (request.hires.second_pass_steps or request.num_inference_steps)
                * request.hires.denoising_strength
            )
            total += (self.step_seconds(model, up_w, up_h) or 0.0) * hires_steps * request.num_images
        return total

    def _check_time(self, request: GenerationRequest, model: str) -> None:
        estimate = self.estimate_seconds(request, model)
        if estimate is None or estimate <= self.settings.timeout_s:
            return
        name = request.name_of
        width, height = self._output_size(request, model)
        raise RequestError(
            name("num_inference_steps"),
            f"this request would take about {estimate:.0f} s ({request.num_inference_steps} {name('num_inference_steps')} x "
            f"{request.num_images} image(s) at {width}x{height} on {model}, measured "
            f"{self.step_seconds(model, width, height):.3g} s a step); the time limit is {self.settings.timeout_s:g} s",
            hint=f"ask for fewer {name('num_inference_steps')} or images, or a smaller size "
            f"(the model's native size is {self.pipelines[model].default_size[0]}x{self.pipelines[model].default_size[1]})",
        )

    def _timings(self, model: str) -> dict[tuple[int, int], float]:
        """Seconds a step an image by (width, height) of ``model``'s pipeline, shared by the services over it."""
        return STEP_SECONDS.setdefault(self.pipelines[model].pipeline, {})

    def _record_step(self, model: str, width: int, height: int, seconds_per_image: float) -> None:
        timings = self._timings(model)
        previous = timings.get((width, height))
        timings[(width, height)] = (
            seconds_per_image if previous is None else 0.7 * previous + 0.3 * seconds_per_image
        )

    def measure_models(self) -> None:
        """Time a denoising step of one image at each model's native size (for the time estimates)."""
        for name in self.pipelines:
            if self._timings(name):  # measured already (by a job, or a service over the same pipeline)
                continue
            request = GenerationRequest(
                "",
                num_inference_steps=2,
                seed=0,
                model=name,
                guidance_scale=self.model_defaults(name)[1],
            )
            try:
                # The first call also pays torch's first-use costs: only the second one counts.
                for _ in range(2):
                    self._timings(name).clear()
                    self._generate(Job(request, name, timeout_s=math.inf), measure_only=True)
            except Exception as exc:  # an exotic backend: no estimate; the per-step deadline still applies
                log.warning(
                    "could not time %s's steps (%s: %s); no time estimates for it",
                    name,
                    type(exc).__name__,
                    exc,
                )

    # -- A1111's global state ---------------------------------------------------------------

    def set_default_model(self, model: str) -> None:
        """Make ``model`` the one requests without a model run on (A1111's sd_model_checkpoint)."""
        if model not in self.pipelines:
            raise RequestError(
                "sd_model_checkpoint",
                f"model '{model}' is not served here",
                hint="served models: " + ", ".join(self.pipelines),
            )
        self.default_model = model

    def interrupt(self, skip: bool = False) -> int:
        """Stop the running jobs at their next step, keeping the images so far (``skip``: only their
        current batch; the next batch still runs). Returns the number of jobs told to stop."""
        running = self.running_jobs
        for job in running:
            if job._stop != "interrupt":
                job._stop = "skip" if skip else "interrupt"
        return len(running)

    def model_hash(self, model: str) -> str:
        """SHA-256 of the model's weights (every torch module's tensors, by name), computed once.

        LoRA adapters and token embeddings loaded into the model do not count: the hash stays
        the checkpoint's.
        """
        with self._hash_lock:
            if model not in self._hashes:
                pipeline = self.pipelines[model].pipeline
                if takes_loras(pipeline):
                    gate = gate_for(pipeline)
                    with gate.cond:  # no worker adds adapters while the tensors are read
                        self._hashes[model] = weights_sha256(pipeline, gate.unchanged_tensors())
                else:
                    self._hashes[model] = weights_sha256(pipeline)
            return self._hashes[model]

    def submit(self, request: GenerationRequest) -> Job:
        """Validate ``request`` and queue it; raises QueueFullError (429) or ServiceUnavailableError (503)."""
        model = self.validate(request)
        job = Job(request, model, self.settings.timeout_s)
        job.prompt, job.loras = self.prompt_loras(request, model)
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
        # A job is finished (its waiter answered) a moment before its worker takes it off the list:
        # a finished job is not running, so /metrics and progress read right in between.
        with self._cond:
            return [job for job in self._running if job.finished is None]

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

        # A LoRA's token embeddings put a tokenizer of their own on the model while its mix is
        # active (serve/loras.py): copies of the two tokenizers used last are kept (by the
        # tokenizer copied, held so that its id is not reused), least recently used first.
        copies = self._thread_state.__dict__.setdefault("tokenizers", {}).setdefault(id(loaded.pipeline), {})
        source = loaded.pipeline.tokenizer
        held = copies.pop(id(source), None) or (source, copy.deepcopy(source))
        copies[id(source)] = held
        while len(copies) > 2:
            del copies[next(iter(copies))]
        return held[1]

    def _pipeline_for(self, loaded: LoadedPipeline, request: GenerationRequest, task: str | None = None):
        """A fresh pipeline object over the loaded modules, so concurrent jobs share weights, not state.

        Schedulers and pipelines keep per-call state (timesteps, guidance scale), so every job
        gets its own; building them is cheap since the modules are shared, not copied.
        """
        base = loaded.pipeline
        components = dict(base.components)
        if components.get("tokenizer") is not None:
            components["tokenizer"] = self._worker_tokenizer(loaded)
        components["scheduler"] = self._scheduler_for(loaded, request)
        pipe = pipeline_class(task or request.task)(
            **components, requires_safety_checker=components.get("safety_checker") is not None
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _scheduler_for(self, loaded: LoadedPipeline, request: GenerationRequest):
        """The request's scheduler (and noise schedule) built from the model's scheduler config."""
        from distilsd.schedulers import scheduler_name_of

        config = loaded.pipeline.scheduler.config
        if request.scheduler is None and request.sigmas in (None, "automatic"):
            return type(loaded.pipeline.scheduler).from_config(config)
        scheduler = request.scheduler or scheduler_name_of(loaded.pipeline.scheduler)
        field = request.name_of("sigmas" if request.scheduler is None else "scheduler")
        if scheduler not in SCHEDULERS:
            raise RequestError(
                field,
                f"the model's own scheduler ({scheduler}) has no {request.sigmas} noise schedule",
                hint="choose a sampler too",
            )
        try:
            return make_scheduler(scheduler, config, sigmas=request.sigmas)
        except InputError as exc:
            raise RequestError(field, f"{field}: {exc.message}", exc.hint) from None

    def _generate(self, job: Job, measure_only: bool = False) -> list[GeneratedImage]:
        """Run ``job``'s pipeline calls with its LoRAs active (and no others); see :mod:`.loras`."""
        loaded = self.pipelines[job.model]
        if not takes_loras(loaded.pipeline):
            return self._run_pipelines(job, measure_only)

        def should_stop() -> None:  # while waiting for the model's adapters to be free
            if job._cancel.is_set():
                raise _Abort("cancelled")
            if time.monotonic() > job.deadline:
                raise _Abort("timeout")

        files = {lora.key: lora for lora, _ in job.loras}
        settings = self.settings
        with gate_for(loaded.pipeline).use(
            adapter_mix(job.loras), files, settings.allow_pickle, should_stop, settings.lora_skip_unknown,
            settings.max_loaded_loras,
        ):  # fmt: skip
            return self._run_pipelines(job, measure_only)

    def _run_pipelines(self, job: Job, measure_only: bool = False) -> list[GeneratedImage]:
        """Run ``job``'s pipeline calls; ``measure_only``: one call, latents only, to time its steps."""
        import torch
        from PIL import Image

        request = job.request
        loaded = self.pipelines[job.model]
        pipe = self._pipeline_for(loaded, request)
        width, height = self._output_size(request, job.model)
        init, mask = request.init_image, request.mask_image
        if init is not None and init.size != (width, height):
            init = init.resize((width, height), Image.Resampling.LANCZOS)
            mask = mask.resize((width, height), Image.Resampling.NEAREST) if mask is not None else None
        if mask is not None:
            init, mask = prepare_inpainting(init, mask, request)
        scheduler, sampler = scheduler_label(pipe.scheduler)
        schedule = sigma_schedule_of(pipe.scheduler)
        base_seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        job.seeds = [base_seed + k for k in range(request.num_images)]
        base_subseed = request.subseed if request.subseed is not None else secrets.randbelow(2**32)
        job.subseeds = [base_subseed + k for k in range(request.num_images)]
        job.width, job.height, job.scheduler, job.sampler = width, height, scheduler, sampler
        job.warnings = truncation_warnings(
            getattr(pipe, "tokenizer", None), [job.prompt, request.negative_prompt]
        )
        hires = request.hires
        hires_size = hires.target_size(width, height) if hires is not None else None
        hires_steps = (hires.second_pass_steps or request.num_inference_steps) if hires is not None else 0
        hires_run = int(hires_steps * hires.denoising_strength) if hires is not None else 0
        timing = {"last": 0.0, "size": (width, height), "images": 1}

        def on_step_end(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
            if job._cancel.is_set():
                raise _Abort("cancelled")
            if time.monotonic() > job.deadline:
                raise _Abort("timeout")
            now = time.monotonic()
            if step > 0:  # the first step's time includes encoding the prompt
                seconds = (now - timing["last"]) / timing["images"]
                self._record_step(job.model, *timing["size"], seconds)
            timing["last"] = now
            if job._stop is not None:
                pipeline._interrupt = True  # diffusers skips the remaining steps, then decodes
            # The number of steps actually run (image-to-image runs strength x steps).
            if timing["size"] == (width, height):
                job.total_steps = (pipeline.num_timesteps + hires_run) * request.n_iter
            job.step += 1
            return callback_kwargs

        def run(pipeline, call: dict[str, Any], size: tuple[int, int], images: int):
            timing.update(last=time.monotonic(), size=size, images=images)
            with torch.inference_mode():
                return pipeline(**call, callback_on_step_end=on_step_end)

        job.total_steps = (request.num_inference_steps + hires_run) * request.n_iter
        images: list[GeneratedImage] = []
        for start in range(0, request.num_images, request.batch_size):
            seeds = job.seeds[start : start + request.batch_size]
            subseeds = job.subseeds[start : start + request.batch_size]
            call = pipeline_arguments(
                [job.prompt] * len(seeds), [request.negative_prompt] * len(seeds), seeds,
                num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                width=width, height=height, init_image=init, mask_image=mask, strength=request.strength,
            )  # fmt: skip
            if request.eta is not None:
                call["eta"] = request.eta  # used by DDIM; the schedulers without eta never see it
            if mask is not None and request.mask_crop_padding is not None:
                # diffusers crops a single image and mask (each image of the batch shares them anyway).
                call.update(padding_mask_crop=request.mask_crop_padding, image=init, mask_image=mask)
            if request.subseed_strength > 0:
                call["latents"] = variation_noise(
                    pipe, call["generator"], subseeds, request.subseed_strength, width, height
                )
            if measure_only:
                run(pipe, {**call, "output_type": "latent"}, (width, height), len(seeds))
                return []
            if hires is None:
                output = run(pipe, call, (width, height), len(seeds))
                pictures = output.images
                flags = getattr(output, "nsfw_content_detected", None) or [False] * len(seeds)
            else:
                latents = run(pipe, {**call, "output_type": "latent"}, (width, height), len(seeds)).images
                if job._stop is not None:  # stopped in the first pass: its images, no second pass
                    pictures, flags = decode_latents(pipe, latents)
                else:
                    second = self._pipeline_for(loaded, request, task="image2image")
                    upscaled = upscale_first_pass(pipe, latents, hires, hires_size)
                    call = pipeline_arguments(
                        [job.prompt] * len(seeds), [request.negative_prompt] * len(seeds), seeds,
                        num_inference_steps=hires_steps, guidance_scale=request.guidance_scale,
                        width=hires_size[2], height=hires_size[3], init_image=upscaled, strength=hires.denoising_strength,
                    )  # fmt: skip
                    call["image"] = upscaled  # one upscaled first pass per image, not one init image for all
                    if request.eta is not None:
                        call["eta"] = request.eta
                    output = run(second, call, hires_size[2:], len(seeds))
                    pictures = output.images
                    flags = getattr(output, "nsfw_content_detected", None) or [False] * len(seeds)
            extra = {"Mask": "yes"} if mask is not None else {}
            if job.loras and self.loras is not None:
                # A1111 keeps the tags in the prompt and names each LoRA's file hash.
                extra["Lora hashes"] = lora_hashes(self.loras, job.loras)
            if schedule != "automatic":
                extra["Schedule type"] = schedule.capitalize()
            if request.eta is not None:
                extra["Eta"] = f"{request.eta:g}"
            if hires is not None:
                extra.update(
                    {
                        "Hires upscale": f"{hires.scale:g}",
                        "Hires steps": str(hires_steps),
                        "Hires upscaler": hires.upscaler,
                    }
                )
                if hires.resize_x or hires.resize_y:
                    extra["Hires resize"] = f"{hires.resize_x}x{hires.resize_y}"
            for k, (image, seed, nsfw) in enumerate(zip(pictures, seeds, flags, strict=True)):
                image_extra = dict(extra)
                if request.subseed_strength > 0:
                    image_extra.update(
                        {
                            "Variation seed": str(subseeds[k]),
                            "Variation seed strength": f"{request.subseed_strength:g}",
                        }
                    )
                strength = (
                    request.strength if init is not None else (hires.denoising_strength if hires else None)
                )
                parameters = a1111_parameters(
                    request.prompt, request.negative_prompt, steps=request.num_inference_steps, sampler=sampler,
                    cfg_scale=request.guidance_scale, seed=seed, width=width, height=height, model=loaded.name,
                    version=f"distilsd {__version__}", denoising_strength=strength, extra=image_extra or None,
                )  # fmt: skip
                images.append(
                    GeneratedImage(png_with_parameters(image, parameters), seed, parameters, bool(nsfw))
                )
            if job._stop == "interrupt":
                job.interrupted = True
                break
            job._stop = None  # a skip stops the current batch only
        return images


def prepare_inpainting(init, mask, request: GenerationRequest):
    """The init image and mask as A1111 prepares them: inverted, blurred, the masked area filled."""
    from PIL import Image, ImageFilter, ImageOps

    if request.mask_invert:
        mask = ImageOps.invert(mask)
    if request.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
    if request.fill_masked:
        # A1111's masking.fill: the unmasked pixels blurred ever less, stacked over the masked area.
        masked = Image.new("RGBa", init.size)
        masked.paste(init.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
        filled = Image.new("RGBA", init.size)
        for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
            blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
            for _ in range(repeats):
                filled.alpha_composite(blurred)
        init = filled.convert("RGB")
    return init, mask


def variation_noise(pipe, generators: list, subseeds: list[int], strength: float, width: int, height: int):
    """Initial latents mixing each image's seed noise with its variation seed's, as A1111 does.

    The seed noise is drawn from the image's own generator (which the pipeline then uses on,
    e.g. for an ancestral sampler's noise), exactly where diffusers would have drawn it.
    """
    import torch

    factor = pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, height // factor, width // factor)
    noises = []
    for generator, subseed in zip(generators, subseeds, strict=True):
        noise = torch.randn(shape, generator=generator)
        subnoise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(subseed))
        noises.append(slerp(strength, noise, subnoise))
    return torch.stack(noises).to(pipe.unet.dtype)


def decode_latents(pipe, latents) -> tuple[list, list[bool]]:
    """PIL images of ``latents`` (the safety checker applied), as the end of a pipeline call makes them."""
    import torch

    with torch.inference_mode():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        decoded, flags = pipe.run_safety_checker(decoded, decoded.device, decoded.dtype)
    flags = list(flags) if flags is not None else [False] * len(decoded)
    denormalize = [not flag for flag in flags]
    return pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=denormalize), flags


def upscale_first_pass(pipe, latents, hires: HiresFix, size: tuple[int, int, int, int]):
    """The hires fix's upscale: the latents (latent upscalers) or the decoded images, then the centre crop."""
    import torch
    from PIL import Image

    up_w, up_h, crop_w, crop_h = size
    factor = pipe.vae_scale_factor
    if hires.upscaler in HIRES_LATENT_MODES:
        mode, antialias = HIRES_LATENT_MODES[hires.upscaler]
        upscaled = torch.nn.functional.interpolate(
            latents.float(), size=(up_h // factor, up_w // factor), mode=mode, antialias=antialias
        ).to(latents.dtype)
        cut_h, cut_w = (up_h - crop_h) // factor, (up_w - crop_w) // factor
        return upscaled[
            :,
            :,
            cut_h // 2 : upscaled.shape[2] - (cut_h + 1) // 2,
            cut_w // 2 : upscaled.shape[3] - (cut_w + 1) // 2,
        ]
    resample = getattr(Image.Resampling, HIRES_IMAGE_UPSCALERS[hires.upscaler])
    pictures, _ = decode_latents(pipe, latents)
    left, top = (up_w - crop_w) // 2, (up_h - crop_h) // 2
    return [
        picture.resize((up_w, up_h), resample).crop((left, top, left + crop_w, top + crop_h))
        for picture in pictures
    ]


def weights_sha256(pipeline, replaced: dict[str, Any] | None = None) -> str:
    """SHA-256 over every torch module's tensors of ``pipeline`` (names, dtypes, shapes, bytes), in a fixed order.

    ``replaced``: tensors read instead of the pipeline's, by ``component.state_dict_name``.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for component_name in sorted(pipeline.components):
        module = pipeline.components[component_name]
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor_name, tensor in sorted(module.state_dict().items()):
            if ".lora_" in tensor_name:  # a LoRA adapter loaded by a request, not the model's
                continue
            tensor_name = tensor_name.replace(".base_layer.", ".")  # the layer a peft adapter wraps
            tensor = (replaced or {}).get(f"{component_name}.{tensor_name}", tensor)
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{component_name}.{tensor_name}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
