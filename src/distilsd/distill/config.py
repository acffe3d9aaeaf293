"""The training configuration: typed dataclasses, YAML files and ``key=value`` overrides.

One schema serves ``distilsd distill`` and ``distilsd train``. A YAML file gives the base
values, dotted ``key=value`` overrides and command-line flags replace single fields, unknown
keys are errors (all of them reported at once), and the resolved config is written into
every run folder so that a run can be repeated and a resume can be checked against it.

A multi-stage recipe (the OFA schedule) is the same config with a ``stages`` list: each
entry is a partial config (for example another ``teacher`` and ``max_steps``) applied on
top of the base values, and each stage starts from the student the previous one produced.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilsd.errors import InputError


@dataclass
class DataConfig:
    """Where the image-caption pairs come from and how images are prepared."""

    # An image folder with metadata.jsonl, a Hugging Face dataset (hub name or local path),
    # or webdataset tar shards (a folder of .tar files, a glob, or "shards-{00000..00099}.tar").
    source: str = ""
    format: str = "auto"  # auto | imagefolder | hf | webdataset
    image_column: str = "image"  # HF datasets: the image column; webdataset: the image extension(s)
    caption_column: str = "text"  # metadata.jsonl key / HF column / webdataset extension
    split: str = "train"  # HF datasets only
    resolution: int = 512  # unless given: the model's own (load_config, models.native_resolution)
    crop: str = "center"  # center | random
    random_flip: bool = True
    # bilinear: BK-SDM's torchvision Resize(BILINEAR) + crop arithmetic; bicubic: distilsd's
    # rule before (PIL bicubic), for runs that must resume or compare with older ones.
    resize: str = "bilinear"
    # Rows with several captions (COCO: five): random picks one each time the row is used, as
    # BK-SDM's random.choice does (seeded by seed, epoch and row); first always takes the first.
    caption_choice: str = "random"
    max_samples: int | None = None  # use only the first N samples of the listing
    # Fraction of captions replaced by the empty prompt, so that classifier-free guidance has
    # an unconditional prediction to push away from (SD trained with 0.1). Models trained
    # without it only work at guidance 1.
    caption_dropout: float = 0.0
    num_workers: int = 0  # DataLoader workers that decode images
    cache_latents: bool = False  # encode images and captions once and store them on disk
    # Decoder-inversion steps for each training image's latent mean (0: the encoder's mean as
    # is). The encoder's mean does not decode back to the image exactly: a VAE that never saw
    # a shape rounds it off, and the U-Net then learns the rounded version. N Adam steps move
    # the mean until the decoder draws the image (cache.refine_latent_means). Rows marked
    # "prior": true are left as encoded. Meant for small sets (DreamBooth's instance images).
    refine_latents: int = 0
    # (train_text_encoder: the latents are read from the cache, captions encoded live)
    cache_dir: str | None = None  # default: $DISTILSD_CACHE/latents (~/.cache/distilsd/latents)
    cache_dtype: str = "fp32"  # fp32 | fp16 | bf16 (fp16 halves the disk use)
    cache_shard_size: int = 1024  # samples per safetensors shard


@dataclass
class LossConfig:
    """loss = l_task * task + l_out * output KD + l_feat * feature KD."""

    l_task: float = 1.0
    l_out: float = 1.0
    l_feat: float = 1.0
    # none: plain sum of per-layer MSEs (BK-SDM); teacher: each layer's MSE is divided by the
    # mean square of the teacher's feature, so every layer counts about the same and the sum
    # does not drown the task and output terms.
    feature_norm: str = "none"
    # (teacher module, student module) pairs; empty = the layout's pairs (arch) or pairs
    # derived by matching block outputs of equal shape (a student given by path).
    feature_pairs: list[list[str]] = field(default_factory=list)
    snr_gamma: float | None = None  # min-SNR weighting of the task term (5.0 is the paper's value)
    # Which noise levels a step trains on. uniform: every timestep alike (DDPM, BK-SDM).
    # logit_normal: t = sigmoid(N(logit_mean, logit_std)) * num_train_timesteps, SD3's way to
    # spend the steps on the levels that decide the image (logit_mean 0: the middle; 1: t~730).
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    noise_offset: float = 0.0
    prediction_type: str | None = None  # default: the model's scheduler (epsilon / v_prediction)
    # What the data's prior-preservation rows ("prior": true, DreamBooth's class images) learn.
    # noise: the task target, as any sample (DreamBooth). base: the model's own prediction with
    # its LoRA adapters off, on the same noisy latent and prompt, so those prompts are pulled
    # towards what the base model does there, not towards one more image of them.
    prior_target: str = "noise"


@dataclass
class OptimConfig:
    optimizer: str = "auto"  # auto (8-bit AdamW when bitsandbytes works on a GPU) | adamw | adamw8bit
    learning_rate: float = 5e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"  # constant | cosine | linear (all with warmup)
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    ema: bool = True
    ema_decay: float = 0.9999


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red car on a street"])
    every: int = 0  # steps between validation grids (0: only at the end, none if no prompts)
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 1234


@dataclass
class VAEConfig:
    """Training a VAE (``component: vae``): reconstruction L1 + kl_weight * KL, as SD's VAE minus
    its LPIPS and GAN terms (their networks need downloads)."""

    kl_weight: float = 1e-6
    mse_weight: float = 0.0  # + mse_weight * MSE (sd-vae-ft-mse's decoder fine-tune weighs MSE in)
    # + edge_weight * L1 of the neighbour differences (sharp edges; vae and tiny-vae decoders alike)
    edge_weight: float = 0.0
    # Train on random crops of this side (0: whole images). The VAE is convolutional, so crops
    # teach it the same local job at a fraction of the cost.
    crop_size: int = 0
    # Images whose latents set the scaling factor (1 / std, how SD's 0.18215 was chosen).
    scaling_samples: int = 1024
    # init: random only. The encoder's log-variance output starts at this value (std 0.05 at
    # -6) instead of 0 (std 1): with SD's tiny KL weight nothing pulls a wide posterior in
    # quickly, and its noise swamps the latent means for thousands of steps.
    initial_logvar: float | None = -6.0
    # Fine-tune the decoder only (init: teacher). The encoder, and so the latent space a U-Net
    # was trained in, stays as it is: the trick of SD's improved VAE decoders (sd-vae-ft-mse).
    train_decoder_only: bool = False
    # component: tiny-vae (AutoencoderTiny, TAESD's architecture): channels of every block, and
    # blocks per resolution level (empty: TAESD's 1, 3, 3, ...); encoder_weight weighs the
    # encoder's latent MSE against the decoder's image L1 (+ mse_weight * MSE).
    tiny_channels: int = 64
    tiny_blocks: list[int] = field(default_factory=list)
    encoder_weight: float = 1.0


# diffusers' LoRA training examples adapt the attention projections of the U-Net and the CLIP text encoder.
DEFAULT_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
DEFAULT_TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) instead of training the U-Net's own weights.

    With ``rank`` set, the U-Net (and with ``text_encoder`` the text encoder) stays frozen and
    only low-rank adapters on the ``targets`` modules train; the run folder receives diffusers'
    ``pytorch_lora_weights.safetensors`` instead of a pipeline.
    """

    rank: int | None = None  # None: no adapters (train the weights themselves)
    alpha: float | None = None  # scale = alpha / rank; default: the rank (scale 1)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    dropout: float = 0.0
    text_encoder: bool = False  # adapters on the text encoder too
    text_encoder_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_ENCODER_LORA_TARGETS))
    kohya: bool = False  # also write the kohya / AUTOMATIC1111 layout (lora_unet_...)
    # Words whose input token embeddings train with the adapters ("pivotal tuning"); the run
    # folder gets embeddings/<word>.safetensors (AUTOMATIC1111's layout).
    token_embeddings: list[str] = field(default_factory=list)
    token_embedding_lr: float | None = None  # None: the adapters' learning rate
    # Two phases (cloneofsimo's lora-pti): the first N steps train only the token embeddings
    # (textual inversion), the rest only the adapters, the embeddings then frozen. None: both
    # train together from the first step.
    token_embedding_steps: int | None = None


@dataclass
class LCMConfig:
    """Latent consistency distillation (``method: lcm``), diffusers' LCD example's settings.

    Guidance scales are in the pipelines' convention (``-g``): the student learns the
    teacher's classifier-free guidance at scales drawn from [guidance_min, guidance_max] and
    receives ``g - 1`` as an embedding (none for LoRA adapters: they learn the range's blend).
    """

    num_ddim_timesteps: int = 50  # N of the teacher's skipping-step DDIM solver (k = T / N)
    guidance_min: float = 6.0  # diffusers' w_min 5 (+1: the pipelines' guidance_scale)
    guidance_max: float = 16.0  # diffusers' w_max 15
    loss_type: str = "huber"  # huber (pseudo-Huber) | l2
    huber_c: float = 0.001
    timestep_scaling: float = 10.0  # boundary scalings c_skip, c_out at 10 t (LCMScheduler's)
    target_ema_decay: float = 0.95  # the target network follows the student at this rate
    time_cond_proj_dim: int = 256  # size of the guidance embedding added to the student
    inference_steps: int = 4  # the default steps of `distilsd generate` on the result


@dataclass
class TrainConfig:
    """One training run (or one stage of a multi-stage run)."""

    output_dir: str = ""
    # What is trained: the U-Net (with the text encoder too when train_text_encoder), or the VAE.
    component: str = "unet"
    train_text_encoder: bool = False  # train the text encoder with the U-Net (from-scratch models)
    # The pipeline that provides the VAE, text encoder, tokenizer and noise schedule, and whose
    # U-Net is fine-tuned or compressed. For `distill` it defaults to the teacher.
    model: str | None = None
    teacher: str | None = None  # teacher pipeline for KD; none = plain training
    # kd: task + output + feature KD (BK-SDM); lcm: latent consistency distillation (1-8 steps)
    method: str = "kd"
    arch: str | None = None  # compress preset (bk-base / bk-small / bk-tiny) or a layout spec file
    student: str | None = None  # start from this U-Net folder (diffusers format) instead
    init: str = "teacher"  # teacher: copy the model's weights; random: train from scratch
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lcm: LCMConfig = field(default_factory=LCMConfig)
    train_batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps
    mixed_precision: str = "fp32"  # fp32 (none) | fp16 | bf16
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the student
    # torch.compile's backend: inductor (generated kernels), or any backend torch._dynamo lists
    # (aot_eager traces the same graphs without generating code; openvino if installed).
    compile_backend: str = "inductor"
    allow_tf32: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str | None = None  # latest | a checkpoint folder
    overwrite: bool = False  # allow an output folder that holds something else
    allow_pickle: bool = False  # load models whose weights are only pickles (.bin): they can run code
    final_weights: str = "ema"  # ema | raw: which weights the output pipeline's unet/ holds
    nan_policy: str = "stop"  # stop | skip
    log_every: int = 1
    log_with: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])  # + wandb
    progress_bar: bool = True
    stages: list[dict[str, Any]] = field(default_factory=list)
    name: str = ""  # stage name (multi-stage runs)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("auto", "imagefolder", "hf", "webdataset"),
    "data.crop": ("center", "random"),
    "data.resize": ("bilinear", "bicubic"),
    "data.caption_choice": ("random", "first"),
    "data.cache_dtype": ("fp32", "fp16", "bf16"),
    "loss.feature_norm": ("none", "teacher"),
    "loss.prediction_type": ("epsilon", "v_prediction"),
    "loss.timestep_sampling": ("uniform", "logit_normal"),
    "loss.prior_target": ("noise", "base"),
    "optim.optimizer": ("auto", "adamw", "adamw8bit"),
    "optim.lr_scheduler": ("constant", "cosine", "linear"),
    "init": ("teacher", "random"),
    "method": ("kd", "lcm"),
    "lcm.loss_type": ("huber", "l2"),
    "component": ("unet", "vae", "tiny-vae"),
    "mixed_precision": ("fp32", "fp16", "bf16"),
    "final_weights": ("ema", "raw"),
    "nan_policy": ("stop", "skip"),
    "log_with": ("csv", "tensorboard", "wandb"),  # a list: each entry is checked
}

# Fields that may change between a checkpoint and its resume without changing the training
# trajectory (how long to run, where and how often to log or save, how to decode data).
RESUME_MAY_DIFFER = {
    "output_dir",
    "resume",
    "overwrite",
    "allow_pickle",
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "log_with",
    "progress_bar",
    "validation",
    "data.num_workers",
    # The latent cache is storage: turning it on, or storing it in float16 (latent statistics
    # rounded at ~1e-3 relative, far below the noise each step adds), may change on resume.
    "data.cache_latents",
    "data.cache_dtype",
    "data.cache_dir",
    "data.cache_shard_size",
    "final_weights",
    "lora.kohya",  # which file layouts the adapter is written in
    "nan_policy",
    "stages",
    "lcm.inference_steps",  # how the result samples by default, not how it trains
    # Per-process batch: N processes x b follow the same trajectory as one process x N*b;
    # the trainer checks the global batch instead.
    "train_batch_size",
    # How the same arithmetic is executed: compiling the student or recomputing activations in
    # the backward pass changes speed and memory, not the steps taken.
    "compile",
    "compile_backend",
    "gradient_checkpointing",
}


# key -> (low, low excluded, high or None, high excluded): values a run cannot use (AdamW
# refuses a negative learning rate with a traceback; numpy seeds stop at 2**32 - 1).
NUMBER_RANGES: list[tuple[str, float, bool, float | None, bool]] = [
    ("optim.learning_rate", 0.0, True, None, False),
    ("optim.adam_beta1", 0.0, False, 1.0, True),
    ("optim.adam_beta2", 0.0, False, 1.0, True),
    ("optim.weight_decay", 0.0, False, None, False),
    ("optim.adam_epsilon", 0.0, False, None, False),
    ("optim.max_grad_norm", 0.0, False, None, False),
    ("optim.lr_warmup_steps", 0, False, None, False),
    ("loss.l_task", 0.0, False, None, False),
    ("loss.l_out", 0.0, False, None, False),
    ("loss.l_feat", 0.0, False, None, False),
    ("loss.snr_gamma", 0.0, True, None, False),
    ("loss.noise_offset", 0.0, False, None, False),
    ("data.max_samples", 1, False, None, False),
    ("data.num_workers", 0, False, None, False),
    ("data.cache_shard_size", 1, False, None, False),
    ("validation.every", 0, False, None, False),
    ("validation.num_inference_steps", 1, False, None, False),
    ("validation.guidance_scale", 0.0, False, None, False),
    ("validation.seed", 0, False, 2**63 - 1, False),
    ("seed", 0, False, 2**32 - 1, False),
    ("vae.kl_weight", 0.0, False, None, False),
    ("vae.mse_weight", 0.0, False, None, False),
    ("vae.edge_weight", 0.0, False, None, False),
    ("vae.crop_size", 0, False, None, False),
    ("vae.scaling_samples", 1, False, None, False),
    ("lcm.num_ddim_timesteps", 1, False, None, False),
    ("lcm.guidance_min", 1.0, False, None, False),
    ("lcm.huber_c", 0.0, True, None, False),
    ("lcm.timestep_scaling", 0.0, True, None, False),
    ("lcm.target_ema_decay", 0.0, False, 1.0, True),
    ("lcm.time_cond_proj_dim", 4, False, None, False),
    ("lcm.inference_steps", 1, False, None, False),
]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Convert ``value`` (from YAML or a flag) to the field type ``tp``, or record an error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(value, args[0], key, errors)
    if origin is list:
        (item_type,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key}: expected a list, got {value!r}")
            return []
        return [_coerce(v, item_type, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        errors.append(f"{key}: expected true or false, got {value!r}")
        return False
    if tp in (int, float):
        try:
            number = tp(value) if not isinstance(value, str) else tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError, OverflowError):  # int(inf) overflows
            errors.append(f"{key}: expected a number, got {value!r}")
            return tp()
        if tp is float and not math.isfinite(number):
            errors.append(f"{key}: expected a finite number, got {value!r}")
            return tp()
        if tp is int and isinstance(value, float) and not value.is_integer():
            errors.append(f"{key}: expected a whole number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            errors.append(f"{key}: expected a string, got {value!r}")
            return ""
        return str(value)
    return value


def _apply(obj: Any, values: dict[str, Any], prefix: str, errors: list[str]) -> None:
    types_ = _field_types(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types_:
            errors.append(f"unknown key '{key}'")
            continue
        tp = types_[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                errors.append(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
                continue
            _apply(getattr(obj, name), value, f"{key}.", errors)
        else:
            found = len(errors)
            coerced = _coerce(value, tp, key, errors)
            if len(errors) == found:  # a bad value keeps the default, so it is reported once
                setattr(obj, name, coerced)


def _dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override '{dotted}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.learning_rate=1e-4", "data.crop=random"]`` -> a dotted-key dict (YAML-typed values)."""
    import yaml

    parsed: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InputError(
                f"override '{item}' is not of the form key=value", hint="e.g. optim.learning_rate=1e-4"
            )
        key, raw = item.split("=", 1)
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    return parsed


RECIPES_DIR = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    """The recipes shipped with distilsd (``--config NAME`` finds them)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(path: str | Path) -> Path:
    """A config file path, or the name of a shipped recipe (``bk-sdm-tiny``)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise InputError(
        f"config file not found: {path}",
        hint=f"give a YAML file or a shipped recipe: {', '.join(recipe_names())}",
    )


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, base: TrainConfig | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig` from defaults (or ``base``), a YAML file, then dotted overrides.

    Every unknown key and bad value is reported in one :class:`InputError`.
    """
    import yaml

    config = copy.deepcopy(base) if base is not None else TrainConfig()
    errors: list[str] = []
    ema_given = False  # optim.ema set by the file or an override (else LoRA runs default it off)
    resolution_given = False  # data.resolution set (else the model's own, where it can be read)
    if path is not None:
        path = resolve_recipe(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise InputError(f"config file {path} must hold a mapping of keys to values")
        ema_given = isinstance(values.get("optim"), dict) and "ema" in values["optim"]
        resolution_given = isinstance(values.get("data"), dict) and "resolution" in values["data"]
        _apply(config, values, "", errors)
    if overrides:
        nested = _dotted_to_nested({k: v for k, v in overrides.items() if v is not None})
        ema_given = ema_given or (isinstance(nested.get("optim"), dict) and "ema" in nested["optim"])
        resolution_given = resolution_given or (
            isinstance(nested.get("data"), dict) and "resolution" in nested["data"]
        )
        _apply(config, nested, "", errors)
    if (config.lora.rank is not None or config.method == "lcm") and not ema_given:
        # An adapter is a small delta trained for few steps: an EMA of it lags behind for no gain
        # (diffusers' LoRA examples keep none); LCM distillation has its own average, the target
        # network, and diffusers' LCD example saves the trained weights. Asked for, it is kept.
        config.optim.ema = False
    model = config.model or config.teacher
    if model and not resolution_given and config.data.resolution == 512:
        # A model made at another size (the Shapes models' 64 px, a local SD 2 768-v folder's 768) trains
        # at its own, as generate samples it; SD 1.x's 512 stays the default otherwise.
        from distilsd.models import native_resolution

        config.data.resolution = native_resolution(model)
    errors.extend(validate(config))
    if errors:
        raise InputError(
            "invalid training config: " + "; ".join(errors), hint="see `distilsd distill --help`"
        )
    return config


# Precision fields, in distilsd's one vocabulary (distilsd.models.PRECISIONS); older configs
# said float32/float16/bfloat16 (cache) and accelerate's "no" (mixed precision).
PRECISION_FIELDS = ("data.cache_dtype", "mixed_precision")
# The older spellings each still accepts (with a deprecation warning).
OLD_PRECISION_CHOICES = {"data.cache_dtype": ("float32", "float16", "bfloat16"), "mixed_precision": ("no",)}


def _normalize_precisions(config: TrainConfig) -> None:
    from distilsd.models import normalize_precision

    for key in PRECISION_FIELDS:
        section, _, name = key.rpartition(".")
        holder = getattr(config, section) if section else config
        value = getattr(holder, name)
        if value is not None and value not in CHOICES[key]:
            try:
                setattr(holder, name, normalize_precision(value, CHOICES[key], key))
            except InputError:
                pass  # reported with the other choice errors


def accelerate_mixed_precision(value: str) -> str:
    """accelerate's spelling of a ``mixed_precision`` value (``fp32`` is its ``no``)."""
    return "no" if value == "fp32" else value


def validate(config: TrainConfig) -> list[str]:
    """Errors in value ranges and choices (types were checked while reading)."""
    errors = []
    _normalize_precisions(config)
    flat = to_flat_dict(config)
    for key, choices in CHOICES.items():
        value = flat.get(key)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item not in choices:
                errors.append(f"{key}: '{item}' is not one of {', '.join(choices)}")
    for key in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "data.resolution",
        "log_every",
    ):
        if flat[key] < 1:
            errors.append(f"{key} must be at least 1 (got {flat[key]})")
    if config.data.resolution % 8:
        errors.append(f"data.resolution must be a multiple of 8 (got {config.data.resolution})")
    if not 0.0 <= config.data.caption_dropout < 1.0:
        errors.append(f"data.caption_dropout must be in [0, 1) (got {config.data.caption_dropout})")
    for key, low, low_open, high, high_open in NUMBER_RANGES:
        value = flat[key]
        if value is None:
            continue
        if (value <= low if low_open else value < low) or (
            high is not None and (value >= high if high_open else value > high)
        ):
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{')' if high_open or high is None else ']'}"
            errors.append(f"{key} must be in {bounds} (got {value})")
    if config.checkpoint_every < 0:
        errors.append("checkpoint_every must be 0 (only at the end) or more")
    if config.keep_checkpoints < 1:
        errors.append("keep_checkpoints must be at least 1")
    if config.loss.logit_std <= 0:
        errors.append(f"loss.logit_std must be more than 0 (got {config.loss.logit_std})")
    if not 0.0 <= config.optim.ema_decay < 1.0:
        errors.append("optim.ema_decay must be in [0, 1)")
    if config.component in ("vae", "tiny-vae"):
        if config.teacher:
            errors.append(f"component: {config.component} is trained without a teacher (drop teacher)")
        if config.train_text_encoder:
            errors.append(
                f"component: {config.component} cannot train the text encoder (set train_text_encoder: false)"
            )
        if config.component == "tiny-vae" and (config.vae.train_decoder_only or config.arch):
            errors.append("component: tiny-vae takes neither vae.train_decoder_only nor arch")
        if config.component == "tiny-vae" and config.vae.tiny_channels < 1:
            errors.append(f"vae.tiny_channels must be at least 1 (got {config.vae.tiny_channels})")
        if config.vae.train_decoder_only and config.init == "random":
            errors.append("vae.train_decoder_only fine-tunes a trained VAE's decoder; set init: teacher")
        if config.vae.crop_size and (
            config.vae.crop_size % 8 or config.vae.crop_size > config.data.resolution
        ):
            errors.append(
                f"vae.crop_size must be a multiple of 8 and at most data.resolution (got {config.vae.crop_size})"
            )
    if config.train_text_encoder and config.teacher:
        errors.append(
            "train_text_encoder: a teacher's text embeddings must stay fixed; train without a teacher"
        )
    if config.data.refine_latents < 0:
        errors.append(f"data.refine_latents must be 0 or more (got {config.data.refine_latents})")
    if config.data.refine_latents and config.component != "unet":
        errors.append("data.refine_latents refines the latents a U-Net learns; it is for component: unet")
    errors.extend(_lora_errors(config))
    errors.extend(_prior_target_errors(config))
    errors.extend(_lcm_errors(config))
    errors.extend(_compile_errors(config))
    for pair in config.loss.feature_pairs:
        if len(pair) != 2:
            errors.append(f"loss.feature_pairs: each entry is [teacher_module, student_module], got {pair!r}")
    for i, stage in enumerate(config.stages):
        if not isinstance(stage, dict):
            errors.append(f"stages[{i}] must be a mapping")
            continue
        stage_errors: list[str] = []
        _apply(
            copy.deepcopy(config),
            {k: v for k, v in stage.items() if k != "stages"},
            f"stages[{i}].",
            stage_errors,
        )
        if "stages" in stage:
            stage_errors.append(f"stages[{i}]: stages cannot be nested")
        errors.extend(stage_errors)
    return errors


def _compile_errors(config: TrainConfig) -> list[str]:
    if config.compile_backend == "inductor":
        return []
    import torch._dynamo

    if config.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        # Name the backends for use; debug ones (aot_eager, ...) are accepted but not listed.
        known = ", ".join(torch._dynamo.list_backends())
        return [
            f"compile_backend: unknown torch.compile backend '{config.compile_backend}' (known: {known}, and debug ones such as aot_eager)"
        ]
    return []


def _prior_target_errors(config: TrainConfig) -> list[str]:
    if config.loss.prior_target != "base":
        return []
    errors = []
    if config.lora.rank is None:
        errors.append(
            "loss.prior_target: base is the model with its LoRA adapters off; it needs lora.rank (--lora-rank R)"
        )
    if config.lora.text_encoder:
        errors.append(
            "loss.prior_target: base needs the base model's text embeddings; train without lora.text_encoder"
        )
    if config.data.cache_latents:
        errors.append(
            "loss.prior_target: base reads the prior rows from the data; set data.cache_latents false"
        )
    if config.method == "lcm" or config.component != "unet":
        errors.append("loss.prior_target: base is for U-Net fine-tuning (method kd, component unet)")
    return errors


def _lora_errors(config: TrainConfig) -> list[str]:
    lora = config.lora
    if lora.rank is None:
        if lora.text_encoder:
            return ["lora.text_encoder: adapters on the text encoder need lora.rank (--lora-rank R)"]
        if lora.token_embedding_steps is not None and not lora.token_embeddings:
            return [
                "lora.token_embedding_steps: there are no token embeddings to train first (lora.token_embeddings)"
            ]
        if lora.token_embeddings:
            return [
                "lora.token_embeddings: token embeddings train with LoRA adapters (--lora-rank R), not with full training"
            ]
        return []
    errors = []
    from distilsd.lora.names import bad_embedding_word

    errors += [problem for word in lora.token_embeddings if (problem := bad_embedding_word(word))]
    if lora.token_embedding_lr is not None and lora.token_embedding_lr <= 0:
        errors.append(f"lora.token_embedding_lr must be more than 0 (got {lora.token_embedding_lr})")
    if lora.token_embedding_steps is not None:
        if not lora.token_embeddings:
            errors.append(
                "lora.token_embedding_steps: there are no token embeddings to train first (lora.token_embeddings)"
            )
        elif not 1 <= lora.token_embedding_steps < config.max_steps:
            errors.append(
                f"lora.token_embedding_steps must be from 1 to max_steps - 1 = {config.max_steps - 1} "
                f"(got {lora.token_embedding_steps}): the adapters train in the steps after it"
            )
    if lora.token_embeddings and config.teacher:
        errors.append(
            "lora.token_embeddings: a teacher's text embeddings must stay fixed; train without a teacher"
        )
    if lora.rank < 1:
        errors.append(
            f"lora.rank must be at least 1 (got {lora.rank}); leave it unset to train the weights themselves"
        )
    if lora.alpha is not None and lora.alpha <= 0:
        errors.append(f"lora.alpha must be more than 0 (got {lora.alpha})")
    if not 0.0 <= lora.dropout < 1.0:
        errors.append(f"lora.dropout must be in [0, 1) (got {lora.dropout})")
    if not lora.targets:
        errors.append("lora.targets: name at least one module (e.g. to_q,to_k,to_v,to_out.0)")
    if config.component != "unet":
        errors.append("lora: adapters are trained on the U-Net (component: unet)")
    if config.train_text_encoder:
        errors.append(
            "lora with train_text_encoder: train text-encoder adapters instead (--train-text-encoder-lora)"
        )
    if lora.text_encoder and config.teacher:
        errors.append(
            "lora.text_encoder: a teacher's text embeddings must stay fixed; train without a teacher"
        )
    if config.init == "random":
        errors.append("lora: adapters fine-tune trained weights; set init: teacher")
    return errors


def _lcm_errors(config: TrainConfig) -> list[str]:
    if config.method != "lcm":
        return []
    errors = []
    lcm = config.lcm
    if lcm.guidance_max < lcm.guidance_min:
        errors.append(f"lcm.guidance_max ({lcm.guidance_max}) is below lcm.guidance_min ({lcm.guidance_min})")
    if lcm.time_cond_proj_dim % 2:
        errors.append(f"lcm.time_cond_proj_dim must be even (got {lcm.time_cond_proj_dim})")
    if not config.teacher and not config.stages:
        errors.append("method: lcm distills a teacher; give teacher (--teacher MODEL)")
    if config.component != "unet":
        errors.append("method: lcm distills a U-Net (component: unet)")
    if config.init == "random":
        errors.append("method: lcm starts the student from trained weights; set init: teacher")
    # The solver walks the teacher's own noise schedule: no other noise levels or offsets.
    if config.loss.noise_offset:
        errors.append(
            "loss.noise_offset: LCM distillation noises latents on the teacher's schedule; set it to 0"
        )
    if config.loss.snr_gamma:
        errors.append("loss.snr_gamma weighs the task loss, which LCM distillation has not; leave it unset")
    if config.loss.timestep_sampling != "uniform":
        errors.append("loss.timestep_sampling: LCM distillation draws solver steps uniformly; use uniform")
    return errors


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_flat_dict(config: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value, f"{prefix}{f.name}."))
        else:
            flat[f"{prefix}{f.name}"] = value
    return flat


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    import yaml

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)


def _may_differ(key: str) -> bool:
    return key in RESUME_MAY_DIFFER or key.split(".")[0] in RESUME_MAY_DIFFER


def trajectory_fields(config: TrainConfig) -> dict[str, Any]:
    """The flattened fields that decide the training trajectory (what a resume must keep)."""
    return {k: v for k, v in to_flat_dict(config).items() if not _may_differ(k)}


def fingerprint(config: TrainConfig) -> str:
    blob = json.dumps(trajectory_fields(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Fields whose default is not what versions without the field did: a checkpoint that lacks
# them was trained the old way.
FORMER_BEHAVIOUR: dict[str, Any] = {"data.resize": "bicubic", "data.caption_choice": "first"}


def config_differences(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Human-readable differences between a checkpoint's trajectory fields and ``current``."""
    now = trajectory_fields(current)
    # A checkpoint from an older version may hold a field that has since become free to change.
    saved = {k: v for k, v in saved.items() if not _may_differ(k)}
    # A field added since the checkpoint was written: the old version behaved as its default,
    # or as FORMER_BEHAVIOUR says where the default changed when the field came.
    defaults = {**to_flat_dict(TrainConfig()), **FORMER_BEHAVIOUR}
    saved.update({k: defaults[k] for k in now if k not in saved and k in defaults})
    # Precisions written in an older spelling (float32, "no") mean the same as today's.
    from distilsd.models import OLD_PRECISION_SPELLINGS

    saved.update({k: OLD_PRECISION_SPELLINGS.get(saved[k], saved[k]) for k in PRECISION_FIELDS if k in saved})
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key, "<unset>") != now.get(key, "<unset>"):
            diffs.append(
                f"{key}: checkpoint has {saved.get(key, '<unset>')!r}, now {now.get(key, '<unset>')!r}"
            )
    return diffs


def stage_configs(config: TrainConfig) -> list[TrainConfig]:
    """The configs of each stage of a multi-stage run (just ``[config]`` without stages)."""
    if not config.stages:
        return [config]
    out = []
    for i, stage in enumerate(config.stages):
        stage_config = copy.deepcopy(config)
        stage_config.stages = []
        errors: list[str] = []
        _apply(stage_config, stage, f"stages[{i}].", errors)
        if errors:
            raise InputError("invalid stage config: " + "; ".join(errors))
        if not stage_config.name:
            stage_config.name = f"stage{i + 1}"
        out.append(stage_config)
    return out
