"""The schedulers ``distilsd generate --scheduler`` accepts, by short name.

Each entry is a diffusers scheduler class built from the model's own scheduler config
(``from_config``), so the model's beta schedule and prediction type are kept, plus the
name AUTOMATIC1111 uses for the same sampler (written into PNG metadata and served by the
A1111-compatible API).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from distilsd.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    a1111_name: str
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerSpec] = {
    spec.name: spec
    for spec in [
        SchedulerSpec(
            "pndm", "PNDMScheduler", "PLMS", "PNDM/PLMS, the SD v1 default", {"skip_prk_steps": True}
        ),
        SchedulerSpec("ddim", "DDIMScheduler", "DDIM", "DDIM (deterministic, eta 0)"),
        SchedulerSpec(
            "dpm++",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M",
            "DPM-Solver++ multistep (2M)",
            {"algorithm_type": "dpmsolver++"},
        ),
        SchedulerSpec(
            "dpm++-sde",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M SDE",
            "DPM-Solver++ multistep, SDE variant",
            {"algorithm_type": "sde-dpmsolver++"},
        ),
        SchedulerSpec(
            "dpm++-sde-k",
            "DPMSolverSDEScheduler",
            "DPM++ SDE",
            "DPM-Solver++ SDE, k-diffusion's sample_dpmpp_sde (needs torchsde)",
        ),
        SchedulerSpec(
            "dpm++-2s",
            "DPMSolverSinglestepScheduler",
            "DPM++ 2S",
            "DPM-Solver++ singlestep (2S)",
            {"algorithm_type": "dpmsolver++"},
        ),
        SchedulerSpec("euler", "EulerDiscreteScheduler", "Euler", "Euler"),
        SchedulerSpec("euler-a", "EulerAncestralDiscreteScheduler", "Euler a", "Euler ancestral"),
        SchedulerSpec("lms", "LMSDiscreteScheduler", "LMS", "linear multistep"),
        SchedulerSpec("heun", "HeunDiscreteScheduler", "Heun", "Heun (2 U-Net calls per step)"),
        SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC", "UniPC multistep"),
        SchedulerSpec(
            "lcm", "LCMScheduler", "LCM", "latent consistency (for LCM / LCM-LoRA models, 1-8 steps)"
        ),
        SchedulerSpec(
            "tcd", "TCDScheduler", "TCD", "trajectory consistency (for LCM / TCD models, 1-8 steps)"
        ),
    ]
}

# The schedulers a consistency-distilled model (distilsd distill --method lcm) samples with.
FEW_STEP_SCHEDULERS = ("lcm", "tcd")
_FEW_STEP_CLASSES = ("LCMScheduler", "TCDScheduler")

DEFAULT_SCHEDULER = "pndm"

# Noise schedules (AUTOMATIC1111 1.9+'s "scheduler" field, the old sampler-name suffixes):
# the sigma spacing of a k-diffusion-style scheduler, through diffusers' use_*_sigmas flags.
SIGMA_SCHEDULES: dict[str, str | None] = {
    "automatic": None,  # the scheduler's own spacing
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}


def scheduler_spec(name: str) -> SchedulerSpec:
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise InputError(
            f"unknown scheduler '{name}'",
            hint="choose one of: " + ", ".join(SCHEDULERS),
        ) from None


def make_scheduler(name: str, base_config: dict[str, Any], sigmas: str | None = None):
    """Build scheduler ``name`` from a model's scheduler config (keeps its betas and prediction type).

    ``sigmas`` is a key of :data:`SIGMA_SCHEDULES` ("karras", ...); None or "automatic"
    keeps the scheduler's own spacing.
    """
    import diffusers

    spec = scheduler_spec(name)
    scheduler_class = getattr(diffusers, spec.class_name)
    kwargs = dict(spec.kwargs)
    if sigmas is not None:
        if sigmas not in SIGMA_SCHEDULES:
            raise InputError(
                f"unknown noise schedule '{sigmas}'", hint="choose one of: " + ", ".join(SIGMA_SCHEDULES)
            )
        flag = SIGMA_SCHEDULES[sigmas]
        if flag is not None:
            if not _accepts(scheduler_class, flag):
                raise InputError(
                    f"scheduler '{name}' has no {sigmas} noise schedule",
                    hint="schedulers with one: " + ", ".join(schedulers_accepting(flag)),
                )
            kwargs[flag] = True
    if base_config.get("rescale_betas_zero_snr") and not _accepts(scheduler_class, "rescale_betas_zero_snr"):
        # from_config would drop the flag silently and sample with other betas than the
        # model was trained on (the Shapes model's zero-terminal-SNR schedule).
        supported = schedulers_accepting("rescale_betas_zero_snr")
        raise InputError(
            f"scheduler '{name}' cannot follow this model's zero-terminal-SNR noise schedule",
            hint="choose one of: " + ", ".join(supported),
        )
    return scheduler_class.from_config(base_config, **kwargs)


def schedulers_accepting(argument: str) -> list[str]:
    """Short names of the schedulers whose constructor takes ``argument``."""
    import diffusers

    return [s.name for s in SCHEDULERS.values() if _accepts(getattr(diffusers, s.class_name), argument)]


def _accepts(scheduler_class, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(scheduler_class.__init__).parameters


def scheduler_name_of(scheduler) -> str:
    """The short name of a scheduler instance (``"custom:<Class>"`` when it is not one of ours)."""
    class_name = type(scheduler).__name__
    config = dict(scheduler.config)
    for spec in SCHEDULERS.values():
        if spec.class_name == class_name and all(config.get(k) == v for k, v in spec.kwargs.items()):
            return spec.name
    return f"custom:{class_name}"


def scheduler_label(scheduler) -> tuple[str, str]:
    """(short name, AUTOMATIC1111 sampler name) of a scheduler instance."""
    name = scheduler_name_of(scheduler)
    sampler = SCHEDULERS[name].a1111_name if name in SCHEDULERS else type(scheduler).__name__
    return name, sampler


def sigma_schedule_of(scheduler) -> str:
    """The key of :data:`SIGMA_SCHEDULES` a scheduler instance samples with ("automatic": its own)."""
    config = dict(scheduler.config)
    for schedule, flag in SIGMA_SCHEDULES.items():
        if flag is not None and config.get(flag):
            return schedule
    return "automatic"


@dataclass(frozen=True)
class FewStepDefaults:
    """How a consistency-distilled model samples unless told otherwise (from its run folder)."""

    num_inference_steps: int
    guidance_scale: float | None  # None: the model's usual default
    what: str  # "the LCM model runs/x" / "the LCM-LoRA runs/y", for messages
    lora: bool  # an LCM-LoRA: the base model's scheduler must be replaced by lcm


def _read_json(path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def few_step_defaults(model: str, loras: list | tuple = ()) -> FewStepDefaults | None:
    """The sampling defaults of an LCM model folder or an LCM-LoRA among ``loras``; None for others.

    An LCM pipeline folder says so by its LCMScheduler / TCDScheduler (and the
    ``distill_info.json`` of ``distilsd distill --method lcm`` gives steps and guidance); an
    LCM-LoRA by its ``lora_info.json``. Reads two small JSON files, no weights.
    """
    from pathlib import Path

    from distilsd.lora.files import LoRASpec, parse_lora_spec
    from distilsd.lora.names import LORA_INFO

    for spec in loras:
        path = Path((spec if isinstance(spec, LoRASpec) else parse_lora_spec(str(spec))).path)
        folder = path if path.is_dir() else path.parent
        info = _read_json(folder / LORA_INFO)
        if info.get("method") == "lcm":
            return FewStepDefaults(
                int(info.get("num_inference_steps", 4)),
                float(info.get("guidance_scale", 1.0)),
                f"the LCM-LoRA {path}",
                True,
            )
    from distilsd.shapes.model import SHIPPED_DIR, SHIPPED_MODELS

    # A built-in name means the built-in (as distilsd.models resolves it); its shipped folder
    # holds the same scheduler/ and distill_info.json as the pipeline assembled from it.
    folder = SHIPPED_DIR / model if model in SHIPPED_MODELS else Path(model)
    if not folder.is_dir():
        return None
    info = _read_json(folder / "distill_info.json")
    scheduler_class = _read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name")
    if info.get("method") != "lcm" and scheduler_class not in _FEW_STEP_CLASSES:
        return None
    guidance = info.get("guidance_scale")
    return FewStepDefaults(
        int(info.get("num_inference_steps", 4)),
        float(guidance) if guidance is not None else None,
        f"the LCM model {model}",
        False,
    )


def apply_few_step_defaults(
    few_step: FewStepDefaults | None,
    num_inference_steps: int | None,
    guidance_scale: float | None,
    scheduler: str | None,
) -> tuple[int | None, float | None, str | None]:
    """``(steps, guidance, scheduler)`` with the unset ones taken from an LCM model's ``few_step`` defaults.

    What is still None falls to the caller's usual default (``generate``: 25 steps and the
    model's guidance). Logs :func:`few_step_scheduler_warning` for a scheduler asked for that
    would integrate a consistency model as an ordinary diffusion model. One rule for
    ``generate``, ``serve`` and ``shapes eval``.
    """
    if few_step is None:
        return num_inference_steps, guidance_scale, scheduler
    if num_inference_steps is None:
        num_inference_steps = few_step.num_inference_steps
    if guidance_scale is None and few_step.guidance_scale is not None:
        guidance_scale = few_step.guidance_scale
    if scheduler is None and few_step.lora:
        scheduler = "lcm"  # the base model's own scheduler cannot sample an LCM-LoRA
    warning = few_step_scheduler_warning(few_step, scheduler) if scheduler is not None else None
    if warning:
        logger.warning(warning)
    return num_inference_steps, guidance_scale, scheduler


def few_step_scheduler_warning(defaults: FewStepDefaults, scheduler: str) -> str | None:
    """Why ``scheduler`` is the wrong choice for a consistency-distilled model (None when it is right)."""
    if scheduler in FEW_STEP_SCHEDULERS:
        return None
    return (
        f"{defaults.what} was distilled to jump to the end of the teacher's trajectory in 1-8 "
        f"LCM steps; --scheduler {scheduler} integrates it as an ordinary diffusion model, which "
        "gives blurred, washed-out images. Use --scheduler lcm (or tcd)"
    )
