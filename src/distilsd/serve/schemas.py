"""Request and response schemas of the JSON API (pydantic), built with the server's limits.

The limits are configurable, so the request models are made per app by :func:`make_schemas`;
their ``Field(le=...)`` bounds then show in the OpenAPI docs and a request over a limit is
refused with a 422 that names the field. The AUTOMATIC1111 models follow
``modules/api/models.py`` of stable-diffusion-webui (the subset that applies): unknown
fields are ignored there, as A1111 does, so existing clients work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distilsd.serve.service import MAX_SEED, MIN_SIZE, ServeSettings


class ErrorBody(BaseModel):
    error: str = Field(description="Error class, e.g. InputError, ValidationError, QueueFullError.")
    detail: str = Field(description="What is wrong and, where there is one, what to do (the CLI's text).")
    field: str | None = Field(None, description="The request field at fault, when there is one.")


class ImageOut(BaseModel):
    image: str = Field(
        description="The PNG, base64-encoded, with its parameters in the 'parameters' text chunk."
    )
    seed: int
    parameters: str = Field(description="Generation parameters in AUTOMATIC1111's text format.")
    nsfw: bool = Field(False, description="The model's safety checker flagged (and blacked out) the image.")


class Txt2ImgResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    images: list[ImageOut]
    model: str
    scheduler: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    queue_seconds: float = Field(description="Time spent waiting in the queue.")
    run_seconds: float = Field(description="Time spent generating.")
    warnings: list[str] = Field(
        default_factory=list,
        description="E.g. a prompt longer than the text encoder's window, and what was cut.",
    )


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class A1111ImagesResponse(BaseModel):
    images: list[str] | None = Field(None, description="The generated images, base64-encoded PNGs.")
    parameters: dict[str, Any] = Field(description="The request, echoed.")
    info: str = Field(description="A JSON string: seeds, sampler, size, infotexts, ...")


class ProgressResponse(BaseModel):
    progress: float = Field(description="The progress with a range of 0 to 1")
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


@dataclass
class Schemas:
    Txt2ImgRequest: type[BaseModel]
    A1111Txt2ImgRequest: type[BaseModel]
    A1111Img2ImgRequest: type[BaseModel]


# What AUTOMATIC1111 samples with when a request leaves steps / cfg_scale out; an LCM model or a
# prompt's LCM-LoRA (few-step defaults) takes its own instead, as `distilsd generate` does
# (a1111.a1111_defaults).
A1111_DEFAULT_STEPS = 50
A1111_DEFAULT_CFG_SCALE = 7.0

PROMPT_HELP = (
    "The prompt; <lora:NAME:WEIGHT> tags (AUTOMATIC1111's syntax) apply the server's LoRAs "
    "(GET /sdapi/v1/loras) and are cut from the text that is encoded."
)


def make_schemas(settings: ServeSettings) -> Schemas:
    """Request models whose bounds are ``settings``' limits."""
    max_size, max_steps, max_images, max_chars = (
        settings.max_size,
        settings.max_steps,
        settings.max_images,
        settings.max_prompt_length,
    )

    class Txt2ImgRequest(BaseModel):
        """distilsd's own text-to-image request, in diffusers' vocabulary."""

        # Our own schema: a misspelt field is an error, not silently ignored.
        model_config = ConfigDict(extra="forbid", protected_namespaces=())

        prompt: str = Field(min_length=1, max_length=max_chars, description=PROMPT_HELP)
        negative_prompt: str = Field("", max_length=max_chars)
        num_inference_steps: int | None = Field(
            None, ge=1, le=max_steps, description="Default: the model's (25; an LCM model's own, e.g. 4)."
        )
        guidance_scale: float | None = Field(
            None,
            ge=0,
            le=100,
            allow_inf_nan=False,
            description="1 turns classifier-free guidance off. Default: the model's (7.5; 4.5 for the built-in shapes models and their exports).",
        )
        width: int | None = Field(
            None, ge=MIN_SIZE, le=max_size, multiple_of=8, description="Default: the model's native size."
        )
        height: int | None = Field(
            None, ge=MIN_SIZE, le=max_size, multiple_of=8, description="Default: the model's native size."
        )
        seed: int | None = Field(
            None,
            ge=-1,
            le=MAX_SEED,
            description="Seed of the first image; image k uses seed + k. None or -1: random.",
        )
        scheduler: str | None = Field(
            None,
            description="Short scheduler name (GET /sdapi/v1/samplers, aliases). Default: the model's own.",
        )
        model: str | None = Field(
            None, description="A served model's name (GET /sdapi/v1/sd-models). Default: the first one."
        )
        num_images: int = Field(1, ge=1, le=max_images)

    class A1111Txt2ImgRequest(BaseModel):
        """AUTOMATIC1111's StableDiffusionProcessingTxt2Img request.

        Every A1111 field is declared: those distilsd honours, and those it cannot (face
        restoration, tiling, scripts, ...), which are refused with a 400 naming them unless
        they hold A1111's do-nothing value. Fields A1111 does not know are ignored, as A1111 does.
        """

        model_config = ConfigDict(extra="ignore", protected_namespaces=())

        prompt: str = Field("", max_length=max_chars, description=PROMPT_HELP)
        negative_prompt: str = Field("", max_length=max_chars)
        styles: list[str] | None = Field(None, description="Refused unless empty: no saved styles here.")
        seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random.")
        subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="Variation seed; -1: random.")
        subseed_strength: float = Field(0.0, ge=0, le=1, description="0: the seed's noise alone.")
        seed_resize_from_h: int | None = Field(None, description="Refused unless 0 or -1.")
        seed_resize_from_w: int | None = Field(None, description="Refused unless 0 or -1.")
        sampler_name: str | None = Field(
            None,
            description="An A1111 sampler name (GET /sdapi/v1/samplers), optionally with a ' Karras' or "
            "' Exponential' suffix.",
        )
        sampler_index: str | None = Field(
            None, description="Old name of sampler_name. Neither: the model's own scheduler."
        )
        scheduler: str | None = Field(
            None,
            description="Noise schedule (GET /sdapi/v1/schedulers): automatic, karras, exponential, beta.",
        )
        eta: float | None = Field(
            None, ge=0, le=1, description="DDIM's eta; ancestral samplers accept only 1 (their own noise)."
        )
        s_churn: float | None = Field(None, description="Refused unless 0.")
        s_tmax: float | None = Field(None, description="Refused unless 0 (A1111's 'infinite').")
        s_tmin: float | None = Field(None, description="Refused unless 0.")
        s_noise: float | None = Field(None, description="Refused unless 1.")
        s_min_uncond: float | None = Field(None, description="Refused unless 0.")
        restore_faces: bool | None = Field(None, description="Refused if true: no face restoration model.")
        tiling: bool | None = Field(None, description="Refused if true.")
        do_not_save_samples: bool = Field(False, description="distilsd's server never writes images.")
        do_not_save_grid: bool = Field(False, description="distilsd's server never writes grids.")
        enable_hr: bool = Field(False, description="Hires fix: upscale the first pass, denoise it again.")
        hr_scale: float = Field(2.0, description="Hires fix: upscale factor (when hr_resize_x/y are 0).")
        hr_upscaler: str | None = Field(
            None,
            description="Latent, Latent (antialiased|bicubic|nearest|nearest-exact), None, Lanczos, Nearest.",
        )
        hr_second_pass_steps: int = Field(0, ge=0, description="0: as many as steps.")
        hr_resize_x: int = Field(
            0, ge=0, description="Hires fix target width (0: from the other / hr_scale)."
        )
        hr_resize_y: int = Field(0, ge=0, description="Hires fix target height.")
        hr_checkpoint_name: str | None = Field(None, description="Refused unless unset: same checkpoint.")
        hr_sampler_name: str | None = Field(None, description="Refused unless unset: same sampler.")
        hr_scheduler: str | None = Field(None, description="Refused unless unset: same scheduler.")
        hr_prompt: str | None = Field(None, description="Refused unless empty or the prompt.")
        hr_negative_prompt: str | None = Field(
            None, description="Refused unless empty or the negative prompt."
        )
        firstphase_width: int | None = Field(None, description="Old hires fix field; refused unless 0.")
        firstphase_height: int | None = Field(None, description="Old hires fix field; refused unless 0.")
        refiner_checkpoint: str | None = Field(None, description="Refused if set: no refiner.")
        refiner_switch_at: float | None = None
        firstpass_image: str | None = Field(None, description="Refused if set.")
        script_name: str | None = Field(None, description="Refused if set: no scripts here.")
        script_args: list[Any] | None = Field(None, description="Refused unless empty.")
        alwayson_scripts: dict[str, Any] | None = Field(None, description="Refused unless empty.")
        infotext: str | None = Field(None, description="Refused if set.")
        comments: dict[str, Any] | None = None
        disable_extra_networks: bool = False
        force_task_id: str | None = None
        override_settings_restore_afterwards: bool = True
        batch_size: int = Field(1, ge=1, le=max_images)
        n_iter: int = Field(1, ge=1, le=max_images)
        steps: int | None = Field(
            None,
            ge=1,
            le=max_steps,
            description=f"Default: AUTOMATIC1111's {A1111_DEFAULT_STEPS}; on an LCM model its own (e.g. 4).",
        )
        cfg_scale: float | None = Field(
            None,
            ge=0,
            le=100,
            allow_inf_nan=False,
            description=f"Default: AUTOMATIC1111's {A1111_DEFAULT_CFG_SCALE:g}; on an LCM model its own.",
        )
        width: int | None = Field(
            None, ge=MIN_SIZE, le=max_size, multiple_of=8, description="Default: the model's native size."
        )
        height: int | None = Field(
            None, ge=MIN_SIZE, le=max_size, multiple_of=8, description="Default: the model's native size."
        )
        denoising_strength: float | None = Field(
            None, gt=0, le=1, description="Of the hires fix's second pass."
        )
        override_settings: dict[str, Any] | None = Field(
            None,
            description="sd_model_checkpoint applies to this request; other options are refused unless they "
            "hold their current value (GET /sdapi/v1/options).",
        )
        send_images: bool = True
        save_images: bool = Field(False, description="Refused if true: the server never writes images.")

    class A1111Img2ImgRequest(A1111Txt2ImgRequest):
        """AUTOMATIC1111's StableDiffusionProcessingImg2Img request (the fields that apply)."""

        init_images: list[str] = Field(min_length=1, description="Base64 images; the first one is used.")
        mask: str | None = Field(
            None, description="Base64 mask, white = repaint, same size as the init image."
        )
        denoising_strength: float = Field(0.75, gt=0, le=1)
        include_init_images: bool = Field(False, description="Echo init_images in `parameters`.")
        resize_mode: int = Field(0, description="0 (just resize) only.")
        image_cfg_scale: float | None = Field(
            None, description="Instruct-pix2pix only: unused here, as in A1111."
        )
        mask_blur: int = Field(4, ge=0, le=64, description="Gaussian blur radius of the mask, in pixels.")
        mask_blur_x: int | None = Field(None, description="Refused unless equal to mask_blur.")
        mask_blur_y: int | None = Field(None, description="Refused unless equal to mask_blur.")
        mask_round: bool = Field(True, description="Refused if false: diffusers binarises the mask.")
        inpainting_fill: int = Field(
            0,
            description="0: fill the masked area from its surroundings first; 1: the original; 2, 3: refused.",
        )
        inpaint_full_res: bool = Field(
            True,
            description="Inpaint only the masked area (cropped, resized, pasted back; diffusers' padding_mask_crop).",
        )
        inpaint_full_res_padding: int = Field(0, ge=0, le=1024, description="Pixels around the masked area.")
        inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: repaint the black area.")
        initial_noise_multiplier: float | None = Field(None, description="Refused unless 1.")
        latent_mask: str | None = Field(None, description="Refused if set.")

    return Schemas(Txt2ImgRequest, A1111Txt2ImgRequest, A1111Img2ImgRequest)
