"""The AUTOMATIC1111-compatible API (``/sdapi/v1/*``), as A1111's clients (``webuiapi``, scripts) use it.

Requests become the service's :class:`~distilsd.serve.service.GenerationRequest`; errors name
the client's A1111 field. An A1111 field that distilsd cannot honour (face restoration,
scripts, a refiner, ...) is refused with a 400 naming it unless it holds A1111's
do-nothing value, so a script never gets silently different images. Options
(``/sdapi/v1/options``) are process-wide, as in A1111: ``sd_model_checkpoint`` switches the
model later requests run on.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.
import asyncio
import base64
import io
import json
import logging
import math
import threading
from typing import Any

from distilsd import __version__
from distilsd.generate.metadata import parse_a1111_parameters, png_with_parameters
from distilsd.schedulers import SCHEDULERS, SIGMA_SCHEDULES
from distilsd.serve.requests import decode_image, run_job, strip_data_url
from distilsd.serve.service import (
    HIRES_LATENT_MODES,
    MAX_INIT_IMAGE_SIZE,
    GenerationRequest,
    HiresFix,
    Job,
    RequestError,
    Service,
)

log = logging.getLogger(__name__)

# Old A1111 sampler names carry the noise schedule as a suffix ("DPM++ 2M Karras").
SAMPLER_SUFFIXES = {" karras": "karras", " exponential": "exponential"}
SCHEDULE_LABELS = {"automatic": "Automatic", "karras": "Karras", "exponential": "Exponential", "beta": "Beta"}
# A1111 samplers diffusers has no equivalent of, with the nearest one distilsd serves.
NO_EQUIVALENT = {
    "dpm++ 2s a": "diffusers has no ancestral single-step DPM-Solver++; the nearest are 'DPM++ 2S' and 'Euler a'",
    "dpm2": "diffusers' KDPM2 is not served; try 'Heun' (also two U-Net calls a step)",
    "dpm2 a": "diffusers' KDPM2 ancestral is not served; try 'Euler a'",
    "dpm fast": "k-diffusion's DPM fast has no diffusers equivalent; try 'DPM++ 2M'",
    "dpm adaptive": "k-diffusion's DPM adaptive has no diffusers equivalent; try 'DPM++ 2M'",
    "restart": "the Restart sampler has no diffusers equivalent; try 'DPM++ 2M Karras'",
}
EXTRAS_UPSCALERS = {"None": None, "Lanczos": "LANCZOS", "Nearest": "NEAREST"}  # PIL resampling; None: as is

A1111_FIELDS = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "scheduler": "sampler_name",
    "sigmas": "scheduler",
    "model": "sd_model_checkpoint",
    "hires": "enable_hr",
    "hires.scale": "hr_scale",
    "hires.upscaler": "hr_upscaler",
    "hires.second_pass_steps": "hr_second_pass_steps",
    "hires.denoising_strength": "denoising_strength",
    "hires.resize_x": "hr_resize_x",
    "hires.resize_y": "hr_resize_y",
}
A1111_IMG2IMG_FIELDS = {
    **A1111_FIELDS,
    "strength": "denoising_strength",
    "init_image": "init_images",
    "mask_image": "mask",
}


def sampler_to_scheduler(name: str, field: str) -> tuple[str, str | None]:
    """An A1111 sampler name (or a short scheduler name) -> (short scheduler name, noise schedule or None)."""
    wanted, schedule = name.strip().lower(), None
    for suffix, suffix_schedule in SAMPLER_SUFFIXES.items():
        if wanted.endswith(suffix):
            wanted, schedule = wanted[: -len(suffix)], suffix_schedule
    for spec in SCHEDULERS.values():
        if wanted in (spec.name, spec.a1111_name.lower()):
            return spec.name, schedule
    if wanted in NO_EQUIVALENT:
        raise RequestError(field, f"{field} '{name}' is not available here", hint=NO_EQUIVALENT[wanted])
    raise RequestError(
        field,
        f"unknown {field} '{name}'",
        hint="served samplers (GET /sdapi/v1/samplers): "
        + ", ".join(spec.a1111_name for spec in SCHEDULERS.values()),
    )


def schedule_of(name: str | None, field: str = "scheduler") -> str | None:
    """A1111's ``scheduler`` field ("Karras", "automatic", ...) -> a key of SIGMA_SCHEDULES, or None."""
    if name is None or name.strip() == "":
        return None
    wanted = name.strip().lower()
    if wanted not in SIGMA_SCHEDULES:
        raise RequestError(
            field,
            f"{field} '{name}' is not available here",
            hint="served schedulers (GET /sdapi/v1/schedulers): " + ", ".join(SIGMA_SCHEDULES),
        )
    return wanted


def _is_neutral(value: Any, neutral: tuple) -> bool:
    # `is` for booleans, so that 0 does not pass for False nor 1 for True.
    return any(value is n if isinstance(n, bool) or isinstance(value, bool) else value == n for n in neutral)


# Fields distilsd cannot honour -> (the values that do nothing in A1111, why it cannot).
UNSUPPORTED_FIELDS: dict[str, tuple[tuple, str]] = {
    "restore_faces": ((None, False), "no face restoration model here"),
    "tiling": ((None, False), "seamless tiling is not implemented"),
    "seed_resize_from_h": ((None, 0, -1), "resizing the seed is not implemented"),
    "seed_resize_from_w": ((None, 0, -1), "resizing the seed is not implemented"),
    "s_churn": ((None, 0, 0.0), "diffusers' pipelines do not pass s_churn to the sampler"),
    "s_tmax": ((None, 0, 0.0, math.inf), "diffusers' pipelines do not pass s_tmax to the sampler"),
    "s_tmin": ((None, 0, 0.0), "diffusers' pipelines do not pass s_tmin to the sampler"),
    "s_noise": ((None, 1, 1.0), "diffusers' pipelines do not pass s_noise to the sampler"),
    "s_min_uncond": ((None, 0, 0.0), "negative-guidance skipping is not implemented"),
    "hr_checkpoint_name": ((None, "", "Use same checkpoint"), "the hires pass runs on the same model"),
    "hr_sampler_name": ((None, "", "Use same sampler"), "the hires pass runs with the same sampler"),
    "hr_scheduler": ((None, "", "Use same scheduler"), "the hires pass runs with the same scheduler"),
    "firstphase_width": ((None, 0), "an old hires fix field; use hr_scale or hr_resize_x/y"),
    "firstphase_height": ((None, 0), "an old hires fix field; use hr_scale or hr_resize_x/y"),
    "refiner_checkpoint": ((None, "", "None"), "no refiner here"),
    "firstpass_image": ((None, ""), "a given first pass is not implemented"),
    "script_name": ((None, ""), "no scripts here"),
    "script_args": ((None, []), "no scripts here"),
    "infotext": ((None, ""), "reading parameters from an infotext is not implemented"),
    "styles": ((None, []), "no saved styles here (GET /sdapi/v1/prompt-styles)"),
    "save_images": ((None, False), "the server writes no files; the images come back in the answer"),
}
UNSUPPORTED_IMG2IMG_FIELDS: dict[str, tuple[tuple, str]] = {
    "resize_mode": ((0,), "only 0 (just resize) is implemented"),
    "initial_noise_multiplier": ((None, 1, 1.0), "diffusers' pipelines have no noise multiplier"),
    "latent_mask": ((None, ""), "a separate latent mask is not implemented"),
    "mask_round": ((True,), "diffusers binarises the mask"),
}


def refuse_unsupported(body: Any, img2img: bool) -> None:
    """A 400 naming the first A1111 field whose value distilsd cannot honour."""
    table = {**UNSUPPORTED_FIELDS, **(UNSUPPORTED_IMG2IMG_FIELDS if img2img else {})}
    for field, (neutral, why) in table.items():
        value = getattr(body, field, None)
        if not _is_neutral(value, neutral):
            raise RequestError(field, f"{field} {json.dumps(value)} cannot be honoured: {why}")
    for field, same_as in (("hr_prompt", body.prompt), ("hr_negative_prompt", body.negative_prompt)):
        value = getattr(body, field)
        if value not in (None, "", same_as):
            raise RequestError(
                field, f"{field} cannot be honoured: the hires pass uses the prompts of the first"
            )
    for name, entry in (body.alwayson_scripts or {}).items():
        # Clients send {"args": []} or {"args": [False]} for an extension they do not use.
        if not isinstance(entry, dict) or entry.get("args") not in (None, [], [False]):
            raise RequestError(
                f"alwayson_scripts.{name}", f"alwayson_scripts.{name} cannot be honoured: no extensions here"
            )
    if img2img:
        for field in ("mask_blur_x", "mask_blur_y"):
            value = getattr(body, field)
            if value is not None and value != body.mask_blur:
                raise RequestError(
                    field, f"{field} {value} cannot be honoured: the mask is blurred alike in x and y"
                )
        if body.inpainting_fill not in (0, 1):
            raise RequestError(
                "inpainting_fill",
                f"inpainting_fill {body.inpainting_fill} cannot be honoured: only 0 (fill) and 1 (original) are implemented",
            )


def check_eta(eta: float | None, scheduler: str | None) -> None:
    """eta changes DDIM (passed on); an ancestral sampler's noise is fixed, so only its own eta 1 is accepted."""
    if eta is None or scheduler is None:
        return
    if scheduler in ("euler-a", "dpm++-sde", "dpm++-sde-k") and eta != 1:
        raise RequestError(
            "eta", f"eta {eta:g} cannot be honoured: diffusers' {scheduler} adds its full noise (eta 1)"
        )


class A1111Options:
    """A1111's options, process-wide: the ones distilsd honours, and whatever clients stored.

    ``sd_model_checkpoint`` is the service's default model. Keys distilsd does not know are
    stored and echoed (clients read back what they wrote) and reported as not honoured.
    """

    def __init__(self, service: Service):
        self.service = service
        self._lock = threading.Lock()
        # The values that describe what distilsd does; changing them is not honoured.
        self.fixed: dict[str, Any] = {
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "eta_noise_seed_delta": 0,
            "eta_ddim": 0.0,
            "eta_ancestral": 1.0,
            "randn_source": "CPU",
            "samples_format": "png",
            "samples_save": False,
            "save_images_add_number": False,
            "enable_pnginfo": True,
            "sd_checkpoint_cache": 0,
            "sd_vae_checkpoint_cache": 0,
            "interrogate_clip_num_beams": 1,
            "show_progress_every_n_steps": -1,
            "live_previews_enable": False,
        }
        self.stored: dict[str, Any] = {}

    def current(self) -> dict[str, Any]:
        """Every option and its value; the checkpoint hash is computed on first use."""
        model = self.service.default_model
        with self._lock:
            stored = dict(self.stored)
        return {
            **self.fixed,
            **stored,
            "sd_model_checkpoint": model,
            "sd_checkpoint_hash": self.service.model_hash(model),
        }

    def resolve_model(self, value: Any, field: str) -> str:
        """A model title, ``title [hash]``, or a hash -> the served model's name."""
        if isinstance(value, str):
            title = value.split(" [")[0].strip()
            if title in self.service.pipelines:
                return title
            for name in self.service.pipelines:
                if value.strip().lower() in (
                    self.service.model_hash(name),
                    self.service.model_hash(name)[:10],
                ):
                    return name
        raise RequestError(
            field,
            f"{field} {json.dumps(value)} is not a model served here",
            hint="served models (GET /sdapi/v1/sd-models): " + ", ".join(self.service.pipelines),
        )

    def update(self, values: dict[str, Any]) -> dict[str, str]:
        """Apply ``values``; returns the keys that were stored but not honoured, each with the reason."""
        not_honoured: dict[str, str] = {}
        if "sd_model_checkpoint" in values:
            self.service.set_default_model(
                self.resolve_model(values["sd_model_checkpoint"], "sd_model_checkpoint")
            )
        with self._lock:
            for key, value in values.items():
                if key in ("sd_model_checkpoint", "sd_checkpoint_hash"):
                    continue
                if key in self.fixed:
                    if value != self.fixed[key]:
                        not_honoured[key] = f"distilsd always uses {json.dumps(self.fixed[key])}"
                    continue
                self.stored[key] = value
                not_honoured[key] = "not an option distilsd uses; stored and echoed only"
        if not_honoured:
            log.warning("options not honoured: %s", ", ".join(sorted(not_honoured)))
        return not_honoured

    def check_override(self, override: dict[str, Any] | None) -> str | None:
        """The model of a request's ``override_settings``; other keys must hold their current value."""
        override = override or {}
        model = None
        for key, value in override.items():
            field = f"override_settings.{key}"
            if key == "sd_model_checkpoint":
                model = self.resolve_model(value, field)
            elif key in self.fixed and value == self.fixed[key]:
                continue
            elif key in self.fixed:
                raise RequestError(
                    field,
                    f"{field} {json.dumps(value)} cannot be honoured: distilsd always uses {json.dumps(self.fixed[key])}",
                )
            else:
                raise RequestError(field, f"{field} cannot be honoured: not an option distilsd uses")
        return model


def a1111_defaults(
    service: Service, model: str | None, steps: int | None, cfg_scale: float | None, loras: list | tuple = ()
) -> tuple[int | None, float | None]:
    """``(steps, cfg_scale)`` of a request: those given, else AUTOMATIC1111's 50 and 7.

    On an LCM model, or with an LCM-LoRA among the prompt's ``loras`` (``Service.prompt_loras``),
    the unset ones stay None, so that the service gives them the model's (or LoRA's) own (4 LCM
    steps and its guidance), as ``generate`` and the ``/v1`` API do: A1111's 50 steps would
    integrate a consistency model as an ordinary diffusion model, at 12x the steps.
    """
    from distilsd.serve.schemas import A1111_DEFAULT_CFG_SCALE, A1111_DEFAULT_STEPS

    if service.few_step_of(model or service.default_model, loras) is not None:
        return steps, cfg_scale
    return (
        A1111_DEFAULT_STEPS if steps is None else steps,
        A1111_DEFAULT_CFG_SCALE if cfg_scale is None else cfg_scale,
    )


def a1111_generation_request(
    service: Service, options: A1111Options, body: Any, img2img: bool
) -> GenerationRequest:
    refuse_unsupported(body, img2img)
    sampler = body.sampler_name or body.sampler_index
    field = "sampler_name" if body.sampler_name else "sampler_index"
    scheduler, suffix_schedule = sampler_to_scheduler(sampler, field) if sampler else (None, None)
    schedule = schedule_of(body.scheduler)
    if schedule in (None, "automatic"):  # 1.9+ sends "automatic" next to an old-style suffixed name
        schedule = suffix_schedule or schedule
    check_eta(body.eta, scheduler)
    hires = None
    if body.enable_hr and not img2img:
        hires = HiresFix(
            scale=body.hr_scale,
            resize_x=body.hr_resize_x,
            resize_y=body.hr_resize_y,
            upscaler=body.hr_upscaler or "Latent",
            second_pass_steps=body.hr_second_pass_steps,
            denoising_strength=body.denoising_strength if body.denoising_strength is not None else 0.7,
        )
    model = options.check_override(body.override_settings)
    request = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=body.width,
        height=body.height,
        seed=None if body.seed == -1 else body.seed,
        scheduler=scheduler,
        sigmas=schedule,
        model=model,
        batch_size=body.batch_size,
        n_iter=body.n_iter,
        subseed=None if body.subseed == -1 else body.subseed,
        subseed_strength=body.subseed_strength,
        eta=body.eta if scheduler == "ddim" else None,
        hires=hires,
        field_names=A1111_IMG2IMG_FIELDS if img2img else A1111_FIELDS,
    )
    _, loras = service.prompt_loras(request, model or service.default_model)  # an LCM-LoRA's own defaults
    request.num_inference_steps, request.guidance_scale = a1111_defaults(
        service, model, body.steps, body.cfg_scale, loras
    )
    if img2img:
        request.init_image = decode_image(body.init_images[0], "init_images", "RGB")
        request.mask_image = decode_image(body.mask, "mask", "L") if body.mask else None
        request.strength = body.denoising_strength
        if request.mask_image is not None:
            request.mask_blur = body.mask_blur
            request.mask_invert = bool(body.inpainting_mask_invert)
            request.fill_masked = body.inpainting_fill == 0
            request.mask_crop_padding = body.inpaint_full_res_padding if body.inpaint_full_res else None
    return request


def a1111_info(job: Job, body: Any, options: A1111Options) -> str:
    """The ``info`` JSON string of an A1111 answer (Processed.js(), the fields that apply)."""
    request, n = job.request, len(job.images)
    model_hash = options.service.model_hash(job.model)
    return json.dumps(
        {
            "prompt": request.prompt,
            "all_prompts": [request.prompt] * n,
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * n,
            "seed": job.seeds[0] if job.seeds else -1,
            "all_seeds": job.seeds[:n],
            "subseed": job.subseeds[0] if job.subseeds else -1,
            "all_subseeds": job.subseeds[:n],
            "subseed_strength": request.subseed_strength,
            "width": job.width,
            "height": job.height,
            "sampler_name": job.sampler,
            "cfg_scale": request.guidance_scale,
            "steps": request.num_inference_steps,
            "batch_size": request.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": job.model,
            "sd_model_hash": model_hash[:10],
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": request.strength
            if request.init_image is not None
            else getattr(body, "denoising_strength", None),
            "extra_generation_params": lora_generation_params(job, options.service),
            "index_of_first_image": 0,
            "infotexts": [image.parameters for image in job.images],
            "styles": body.styles or [],
            "job_timestamp": job.timestamp,
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "interrupted": job.interrupted,
            "version": f"distilsd {__version__}",
        }
    )


def lora_generation_params(job: Job, service: Service) -> dict[str, str]:
    """A1111's ``extra_generation_params`` of a job: ``Lora hashes`` when its prompt used LoRAs."""
    if not job.loras or service.loras is None:
        return {}
    from distilsd.serve.loras import lora_hashes

    return {"Lora hashes": lora_hashes(service.loras, job.loras)}


def png_info(image_b64: str) -> dict[str, Any]:
    """A1111's /png-info: the ``parameters`` chunk, the other text chunks, and the parsed fields."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(strip_data_url(image_b64), validate=True)
        image = Image.open(io.BytesIO(raw))
        if max(image.size) > MAX_INIT_IMAGE_SIZE:
            raise RequestError(
                "image",
                f"image is {image.size[0]}x{image.size[1]}; the limit is {MAX_INIT_IMAGE_SIZE} per side",
            )
        chunks = dict(getattr(image, "text", {}) or image.info)
    except (ValueError, UnidentifiedImageError, OSError) as exc:
        raise RequestError("image", f"image cannot be read as an image ({type(exc).__name__})") from None
    text = chunks.pop("parameters", None)
    items = {key: value for key, value in chunks.items() if isinstance(value, str)}
    if text is None:
        return {"info": "", "items": items, "parameters": {}}
    parsed = parse_a1111_parameters(text)
    parameters: dict[str, Any] = {
        "Prompt": parsed.pop("prompt"),
        "Negative prompt": parsed.pop("negative_prompt"),
    }
    parameters.update(parsed)
    width, _, height = parameters.get("Size", "").partition("x")
    if width.isdigit() and height.isdigit():
        parameters["Size-1"], parameters["Size-2"] = width, height
    return {"info": text, "items": items, "parameters": parameters}


def extras_upscale(body: Any) -> dict[str, Any]:
    """A1111's /extra-single-image with the upscalers that need no model (Lanczos, Nearest, None)."""
    from PIL import Image

    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, field):
            raise RequestError(
                field, f"{field} {getattr(body, field):g} cannot be honoured: no face restoration model here"
            )
    for field in ("upscaler_1", "upscaler_2"):
        if getattr(body, field) not in EXTRAS_UPSCALERS:
            raise RequestError(
                field,
                f"{field} '{getattr(body, field)}' is not available here (no upscaling models)",
                hint="choose one of: " + ", ".join(EXTRAS_UPSCALERS),
            )
    source = decode_image(body.image, "image", "RGBA")
    parameters = None
    if body.resize_mode == 1:
        width, height = body.upscaling_resize_w, body.upscaling_resize_h
        scale = max(width / source.width, height / source.height)
    else:
        scale = body.upscaling_resize
        width, height = int(source.width * scale), int(source.height * scale)
    target = (int(source.width * scale), int(source.height * scale))
    if max(target) > MAX_INIT_IMAGE_SIZE or max(width, height) > MAX_INIT_IMAGE_SIZE:
        raise RequestError(
            "upscaling_resize",
            f"the result would be {target[0]}x{target[1]}; the limit is {MAX_INIT_IMAGE_SIZE} per side",
        )

    def upscale(name: str):
        resample = EXTRAS_UPSCALERS[name]
        if resample is None or scale == 1:
            return source
        return source.resize(target, getattr(Image.Resampling, resample))

    result = upscale(body.upscaler_1)
    if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0:
        second = upscale(body.upscaler_2)
        if second.size != result.size:
            second = second.resize(result.size, Image.Resampling.LANCZOS)
        result = Image.blend(result, second, body.extras_upscaler_2_visibility)
    if body.resize_mode == 1 and body.upscaling_crop and result.size != (width, height):
        cropped = Image.new("RGBA", (width, height))
        cropped.paste(result, box=(width // 2 - result.width // 2, height // 2 - result.height // 2))
        result = cropped
    info = f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {body.upscaler_1}"
    if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0:
        info += f", Postprocess upscaler 2: {body.upscaler_2}"
    parameters = info
    png = png_with_parameters(
        result if source.mode == "RGBA" and _has_alpha(source) else result.convert("RGB"), parameters
    )
    return {"html_info": info, "image": base64.b64encode(png).decode()}


def _has_alpha(image) -> bool:
    return image.getextrema()[3][0] < 255


def memory_report() -> dict[str, Any]:
    """A1111's /memory: system RAM and, when there is one, the CUDA device's memory."""
    import psutil

    ram = psutil.virtual_memory()
    report: dict[str, Any] = {
        "ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total}
    }
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            report["cuda"] = {
                "system": {"free": free, "used": total - free, "total": total},
                "active": {
                    "current": stats.get("active_bytes.all.current", 0),
                    "peak": stats.get("active_bytes.all.peak", 0),
                },
                "allocated": {
                    "current": stats.get("allocated_bytes.all.current", 0),
                    "peak": stats.get("allocated_bytes.all.peak", 0),
                },
                "reserved": {
                    "current": stats.get("reserved_bytes.all.current", 0),
                    "peak": stats.get("reserved_bytes.all.peak", 0),
                },
            }
        else:
            report["cuda"] = {"error": "no CUDA device"}
    except Exception as exc:  # a broken driver is a report, not a failure
        report["cuda"] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def add_a1111_routes(app: Any, service: Service, settings: Any, schemas: Any, errors: dict) -> A1111Options:
    """Register every ``/sdapi/v1`` endpoint on ``app``; returns the process-wide options."""
    from fastapi import Query, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field

    from distilsd.serve.schemas import A1111ImagesResponse, ProgressResponse, SamplerItem, SDModelItem

    options = A1111Options(service)
    app.state.a1111_options = options
    tags = ["AUTOMATIC1111"]

    class PngInfoRequest(BaseModel):
        image: str = Field(description="A base64 PNG (or a data: URL).")

    class ExtrasRequest(BaseModel):
        image: str = Field(description="A base64 image (or a data: URL).")
        resize_mode: int = Field(
            0, ge=0, le=1, description="0: by upscaling_resize; 1: to upscaling_resize_w x _h."
        )
        show_extras_results: bool = True
        gfpgan_visibility: float = Field(0, ge=0, le=1, description="Refused unless 0.")
        codeformer_visibility: float = Field(0, ge=0, le=1, description="Refused unless 0.")
        codeformer_weight: float = Field(0, ge=0, le=1)
        upscaling_resize: float = Field(2, gt=0, le=8)
        upscaling_resize_w: int = Field(512, ge=1, le=MAX_INIT_IMAGE_SIZE)
        upscaling_resize_h: int = Field(512, ge=1, le=MAX_INIT_IMAGE_SIZE)
        upscaling_crop: bool = True
        upscaler_1: str = Field("None", description="None, Lanczos or Nearest.")
        upscaler_2: str = Field("None", description="None, Lanczos or Nearest.")
        extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
        upscale_first: bool = False

    class InterrogateRequest(BaseModel):
        image: str = ""
        model: str = "clip"

    async def images(body: Any, request: Request, img2img: bool) -> A1111ImagesResponse:
        job = await run_job(service, request, a1111_generation_request(service, options, body, img2img))
        loop = asyncio.get_running_loop()
        info = await loop.run_in_executor(None, a1111_info, job, body, options)
        encoded = [base64.b64encode(i.png).decode() for i in job.images] if body.send_images else []
        exclude = (
            set() if not img2img else ({"mask"} if body.include_init_images else {"init_images", "mask"})
        )
        parameters = body.model_dump(exclude=exclude)
        # What ran, as A1111 echoes its filled-in defaults (an LCM model's or LCM-LoRA's own steps,
        # guidance and, left unset, the sampler: an LCM-LoRA's is LCM, not the model's own).
        parameters.update(steps=job.request.num_inference_steps, cfg_scale=job.request.guidance_scale)
        if not (body.sampler_name or body.sampler_index):
            parameters["sampler_name"] = job.sampler
        return A1111ImagesResponse(images=encoded, parameters=parameters, info=info)

    @app.post("/sdapi/v1/txt2img", response_model=A1111ImagesResponse, responses=errors, tags=tags)
    async def sdapi_txt2img(body: schemas.A1111Txt2ImgRequest, request: Request):  # type: ignore[name-defined]
        """Text to image (with `enable_hr`: the hires fix): `images` (base64 PNGs), `parameters`, `info` (JSON string)."""
        return await images(body, request, img2img=False)

    @app.post("/sdapi/v1/img2img", response_model=A1111ImagesResponse, responses=errors, tags=tags)
    async def sdapi_img2img(body: schemas.A1111Img2ImgRequest, request: Request):  # type: ignore[name-defined]
        """Image to image (with `mask`: inpainting); the first of `init_images` is used."""
        return await images(body, request, img2img=True)

    @app.get("/sdapi/v1/options", tags=tags)
    async def get_options():
        """The options: `sd_model_checkpoint` (the default model), its `sd_checkpoint_hash`, and the rest."""
        return await asyncio.get_running_loop().run_in_executor(None, options.current)

    @app.post("/sdapi/v1/options", responses=errors, tags=tags)
    async def set_options(values: dict[str, Any]):
        """Set options; `sd_model_checkpoint` switches the model later requests run on. The answer lists
        the keys that were stored but not honoured."""
        not_honoured = options.update(values)
        return {"updated": values, "not_honoured": not_honoured}

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], tags=tags)
    async def sd_models():
        """The served models; a `title` is what `sd_model_checkpoint` takes. `sha256` is of the weights."""

        def listing():
            items = []
            for name, loaded in service.pipelines.items():
                sha256 = service.model_hash(name)
                items.append(
                    SDModelItem(
                        title=name, model_name=name, hash=sha256[:10], sha256=sha256, filename=loaded.source
                    )
                )
            return items

        return await asyncio.get_running_loop().run_in_executor(None, listing)

    @app.post("/sdapi/v1/refresh-checkpoints", tags=tags)
    async def refresh_checkpoints():
        """The models are loaded at start (`--model`); there is no folder to rescan. Answers the served list."""
        return {"models": list(service.pipelines)}

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem], tags=tags)
    async def samplers():
        """The samplers `sampler_name` accepts (aliases: distilsd's short scheduler names)."""
        return [
            SamplerItem(name=spec.a1111_name, aliases=[spec.name], options={}) for spec in SCHEDULERS.values()
        ]

    @app.get("/sdapi/v1/schedulers", tags=tags)
    async def schedulers():
        """The noise schedules `scheduler` accepts (diffusers' use_*_sigmas options)."""
        return [
            {
                "name": name,
                "label": SCHEDULE_LABELS[name],
                "aliases": None,
                "default_rho": -1,
                "need_inner_model": False,
            }
            for name in SIGMA_SCHEDULES
        ]

    @app.get("/sdapi/v1/upscalers", tags=tags)
    async def upscalers():
        """Upscalers that need no model: for `extra-single-image` and `hr_upscaler`."""
        return [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in EXTRAS_UPSCALERS
        ]

    @app.get("/sdapi/v1/latent-upscale-modes", tags=tags)
    async def latent_upscale_modes():
        """The latent upscalers `hr_upscaler` accepts."""
        return [{"name": name} for name in HIRES_LATENT_MODES]

    @app.get("/sdapi/v1/loras", tags=tags)
    async def loras():
        """The LoRAs of `--lora-dir`, as A1111 lists them: `name` (what `<lora:NAME:WEIGHT>` takes in a prompt),
        `alias`, `path` and the file's `metadata`. Empty without `--lora-dir`."""
        return service.loras.listing() if service.loras is not None else []

    @app.post("/sdapi/v1/refresh-loras", tags=tags)
    async def refresh_loras():
        """Rescan `--lora-dir` for LoRA files added or removed since the start (answers nothing, as A1111)."""
        if service.loras is not None:
            await asyncio.get_running_loop().run_in_executor(None, service.loras.refresh)
        return None

    @app.get("/sdapi/v1/embeddings", tags=tags)
    async def embeddings():
        """Textual-inversion embeddings served: none yet."""
        return {"loaded": {}, "skipped": {}}

    for path, description in (
        ("sd-vae", "Extra VAEs: none (each model uses its own)."),
        ("hypernetworks", "Hypernetworks: none."),
        ("face-restorers", "Face restoration models: none."),
        ("realesrgan-models", "Real-ESRGAN models: none."),
        ("prompt-styles", "Saved styles: none."),
        ("sd-modules", "Extra text encoders / modules: none."),
    ):
        app.add_api_route(
            f"/sdapi/v1/{path}", _empty_list, methods=["GET"], tags=tags, description=description
        )

    @app.get("/sdapi/v1/scripts", tags=tags)
    async def scripts():
        """Scripts and extensions: none."""
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/cmd-flags", tags=tags)
    async def cmd_flags():
        """The server's settings, under A1111's flag names where there is one."""
        return {
            "api": True,
            "nowebui": not settings.ui,
            "listen": settings.host not in ("127.0.0.1", "localhost", "::1"),
            "server_name": settings.host,
            "port": settings.port,
            "api_auth": bool(settings.api_key),
            "cors_allow_origins": ",".join(settings.cors_origins) or None,
            "ckpt": service.default_model,
            "models": list(service.pipelines),
            "device": settings.device,
            "dtype": settings.dtype,
            "disable_safe_unpickle": False,
            "workers": settings.workers,
            "queue_size": settings.queue_size,
            "timeout": settings.timeout_s,
            "max_size": settings.max_size,
            "max_steps": settings.max_steps,
            "max_images": settings.max_images,
        }

    @app.get("/sdapi/v1/memory", tags=tags)
    async def memory():
        """RAM and (when there is one) CUDA memory, in bytes."""
        return memory_report()

    @app.post("/sdapi/v1/png-info", responses=errors, tags=tags)
    async def sdapi_png_info(body: PngInfoRequest):
        """The `parameters` text of a PNG (`info`), its other text chunks (`items`) and the parsed fields."""
        return png_info(body.image)

    @app.post("/sdapi/v1/extra-single-image", responses=errors, tags=tags)
    async def extra_single_image(body: ExtrasRequest):
        """Upscale one image with Lanczos or Nearest (as A1111 without upscaling models)."""
        return await asyncio.get_running_loop().run_in_executor(None, extras_upscale, body)

    @app.post("/sdapi/v1/interrogate", responses={501: {"model": schemas_error_model()}}, tags=tags)
    async def interrogate(body: InterrogateRequest):
        """Not available: captioning needs a CLIP interrogator or DeepBooru model, which distilsd does not serve."""
        return JSONResponse(
            {
                "error": "NotImplemented",
                "detail": f"interrogate ({body.model}) needs a captioning model (CLIP interrogator / DeepBooru); "
                "distilsd serves none",
                "field": "model",
            },
            status_code=501,
        )

    @app.post("/sdapi/v1/interrupt", tags=tags)
    async def interrupt():
        """Stop the running jobs at their next step; they answer with the images so far (`info.interrupted`)."""
        return {"interrupted": service.interrupt()}

    @app.post("/sdapi/v1/skip", tags=tags)
    async def skip():
        """Stop the running jobs' current batch at its next step; the next batch (n_iter) still runs."""
        return {"skipped": service.interrupt(skip=True)}

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse, tags=tags)
    async def progress(skip_current_image: bool = Query(False)):
        """Progress of the oldest running job (A1111 has one job at a time; distilsd may run several)."""
        import time

        running = service.running_jobs
        state = {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": len(running) + service.queue_depth,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        if not running:
            return ProgressResponse(progress=0, eta_relative=0, state=state)
        job = min(running, key=lambda j: j.started or 0.0)
        state.update(
            job=f"job {job.id[:8]}",
            job_timestamp=job.timestamp,
            sampling_step=job.step,
            sampling_steps=job.total_steps,
            interrupted=job._stop == "interrupt",
            skipped=job._stop == "skip",
        )
        elapsed = time.monotonic() - (job.started or time.monotonic())
        eta = elapsed / job.progress - elapsed if job.progress > 0 else 0.0
        return ProgressResponse(
            progress=job.progress,
            eta_relative=eta,
            state=state,
            textinfo=f"step {job.step}/{job.total_steps}",
        )

    return options


async def _empty_list() -> list:
    return []


def schemas_error_model():
    from distilsd.serve.schemas import ErrorBody

    return ErrorBody
