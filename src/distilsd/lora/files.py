"""LoRA files: reading, checking, the kohya / AUTOMATIC1111 layout, and applying them to pipelines.

Two key layouts are read and written:

- diffusers (``pytorch_lora_weights.safetensors``): ``unet.<module>.lora.down.weight`` /
  ``.lora.up.weight`` (or peft's ``lora_A`` / ``lora_B``), the adapter config in the file's
  metadata. ``StableDiffusionPipeline.load_lora_weights`` reads it.
- kohya (sd-scripts, loaded by AUTOMATIC1111 and ComfyUI): ``lora_unet_<module with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` per module; text-encoder modules start with ``lora_te_``.
  diffusers' own loader reads this layout too; distilsd only writes it (:func:`to_kohya`).

Before a file is handed to diffusers, every module it adapts is looked up in the pipeline and
its shapes compared, so a LoRA made for another architecture fails with the first module that
does not fit rather than with a shape error deep inside peft.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distilsd.errors import InputError, ModelLoadError

from .names import KOHYA_WEIGHTS, LORA_WEIGHTS

PICKLED = (".ckpt", ".pt", ".pth", ".bin")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
# lora.down/up: diffusers' U-Net layout; lora_linear_layer.down/up: its text-encoder layout; lora_A/B: peft's.
_DIFFUSERS_SUFFIX = re.compile(
    r"\.(lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)(\.default)?\.weight$"
)
_DOWN = ("lora.down", "lora_linear_layer.down", "lora_A")
_KOHYA_SUFFIX = re.compile(r"\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass
class LoRASpec:
    """One ``--lora PATH[:SCALE]``."""

    path: Path
    scale: float = 1.0
    name: str = ""


def parse_lora_spec(text: str) -> LoRASpec:
    """``"style.safetensors:0.7"`` -> (path, 0.7); a path alone has scale 1."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).exists():
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    return LoRASpec(Path(path), scale)


def lora_file(path: str | Path) -> Path:
    """The weights file of ``path``: the file itself, or a folder's LoRA file."""
    path = Path(path)
    if path.is_dir():
        for name in (LORA_WEIGHTS, KOHYA_WEIGHTS):
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise InputError(f"no LoRA file in {path}", hint=f"expected {LORA_WEIGHTS} (what distilsd writes)")
    if not path.is_file():
        raise InputError(f"LoRA file {path} does not exist")
    return path


def read_lora(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, adapter metadata) of a LoRA file; pickles only with ``allow_pickle``."""
    path = lora_file(path)
    if path.suffix.lower() in PICKLED:
        if not allow_pickle:
            from distilsd.errors import UnsafeCheckpointError

            raise UnsafeCheckpointError(
                f"{path} is a pickled LoRA, and loading a pickle can run arbitrary code",
                hint="use a .safetensors LoRA, or pass --allow-pickle if you trust its source",
            )
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelLoadError(f"{path} does not hold a LoRA state dict")
        return state, {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read the LoRA file {path}: {exc}") from None
    raw = metadata.get("lora_adapter_metadata")
    return tensors, json.loads(raw) if raw else {}


def is_kohya(tensors: dict[str, torch.Tensor]) -> bool:
    return bool(tensors) and all(k.startswith(tuple(_KOHYA_PREFIXES)) for k in tensors)


# ---- the kohya layout ----------------------------------------------------------------------


def to_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers-layout tensors -> kohya keys, with each module's alpha (A1111 scales by alpha / rank)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}.get(component)
        match = _DIFFUSERS_SUFFIX.search(rest)
        if prefix is None or match is None:
            raise InputError(f"LoRA key {key} is not in diffusers' layout")
        module = rest[: match.start()]
        if component == "text_encoder" and not module.startswith("text_model."):
            module = f"text_model.{module}"  # kohya names CLIPTextModel's modules in full
        kohya = prefix + module.replace(".", "_")
        down = match.group(1) in _DOWN
        out[f"{kohya}.{'lora_down' if down else 'lora_up'}.weight"] = tensor.contiguous()
        if down:
            rank = tensor.shape[0]
            alpha = metadata.get(f"{component}.lora_alpha", rank)
            out[f"{kohya}.alpha"] = torch.tensor(float(alpha))
    return out


def write_kohya(source: Path, target: Path) -> Path:
    """Write the kohya layout of the diffusers LoRA file ``source`` into ``target``."""
    from safetensors.torch import save_file

    tensors, metadata = read_lora(source)
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(
        to_kohya(tensors, metadata), str(tmp), metadata={"format": "pt", "ss_network_module": "networks.lora"}
    )
    tmp.replace(target)
    return target


# ---- checking a LoRA against a pipeline ----------------------------------------------------


@dataclass
class LoRAFit:
    """Which modules of a pipeline a LoRA file adapts, and which it names that are not there."""

    # the file's module key -> (component, module name in the pipeline)
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)  # the file's module keys with no such module


def _lookup(pipe) -> dict[str, dict[str, torch.nn.Module]]:
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    return {name: dict(model.named_modules()) for name, model in components.items() if model is not None}


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base_layer", module)  # a peft LoRA layer wraps the original


def _in_out(module: torch.nn.Module) -> tuple[int, int] | None:
    module = _base(module)
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def module_table(pipe) -> dict[str, dict[str, torch.nn.Module]]:
    """The modules a LoRA may adapt, by component and name: what :func:`check_lora_fits` looks them up in."""
    return _lookup(pipe)


def check_lora_fits(
    tensors: dict[str, torch.Tensor],
    pipe,
    source: str | Path,
    modules: dict[str, dict[str, torch.nn.Module]] | None = None,
) -> LoRAFit:
    """Look up every adapted module in ``pipe``; raise on a shape mismatch, collect unknown names.

    ``modules`` (from :func:`module_table`) replaces looking them up in ``pipe`` again: a server
    checks against a table taken once, while its workers may be adding adapters to the modules.
    """
    modules = modules if modules is not None else _lookup(pipe)
    underscored = {
        component: {name.replace(".", "_"): name for name in named} for component, named in modules.items()
    }
    fit = LoRAFit()
    for key, tensor in tensors.items():
        if is_kohya({key: tensor}):
            prefix = next(p for p in _KOHYA_PREFIXES if key.startswith(p))
            component = _KOHYA_PREFIXES[prefix]
            match = _KOHYA_SUFFIX.search(key)
            if match is None:
                fit.unknown.append(key)
                continue
            module_key = key[: match.start()]
            name = underscored.get(component, {}).get(module_key[len(prefix) :])
            kind = {"lora_down.weight": "down", "lora_up.weight": "up"}.get(match.group(1))
        else:
            component, _, rest = key.partition(".")
            match = _DIFFUSERS_SUFFIX.search(rest)
            if component not in ("unet", "text_encoder") or match is None:
                fit.unknown.append(key)
                continue
            module_key = f"{component}.{rest[: match.start()]}"
            named = modules.get(component, {})
            # diffusers' text-encoder keys leave out CLIPTextModel's "text_model." level.
            candidates = (rest[: match.start()], f"text_model.{rest[: match.start()]}")
            name = next((c for c in candidates if c in named), None)
            kind = "down" if match.group(1) in _DOWN else "up"
        if name is None:
            if module_key not in fit.unknown:
                fit.unknown.append(module_key)
            continue
        fit.modules[module_key] = (component, name)
        shape = _in_out(modules[component][name])
        if kind is None or shape is None:
            continue
        expected = shape[0] if kind == "down" else shape[1]
        got = tensor.shape[1] if kind == "down" else tensor.shape[0]
        if got != expected:
            side = "input" if kind == "down" else "output"
            raise InputError(
                f"LoRA {source} does not fit this model: {component} module {name} has {expected} {side} features, the LoRA has {got}",
                hint="use a LoRA trained for this architecture (distilsd lora transfer maps a teacher's LoRA onto its student)",
            )
    return fit


# ---- applying LoRAs to a pipeline ----------------------------------------------------------


def _adapter_name(spec: LoRASpec, taken: set[str]) -> str:
    # A run folder is named by the folder (its file is always pytorch_lora_weights).
    label = spec.name or (spec.path.name if spec.path.is_dir() else lora_file(spec.path).stem)
    return unique_adapter_name(label, taken)


def unique_adapter_name(label: str, taken: set[str]) -> str:
    """A peft adapter name from ``label`` (letters, digits, _), not one of ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", label) or "lora"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def checked_lora_source(
    pipe,
    path: Path,
    *,
    allow_pickle: bool = False,
    skip_unknown: bool = False,
    modules: dict[str, dict[str, torch.nn.Module]] | None = None,
) -> str | dict[str, torch.Tensor]:
    """Read the LoRA file ``path`` and check it against ``pipe``: what ``load_lora_weights`` should get.

    Raises InputError naming the first module that does not fit, or the first module the
    pipeline does not have (unless ``skip_unknown``, which keeps the matching tensors only).
    Returns the file's path (diffusers then reads its adapter config, alpha included, from the
    metadata) or, for a pickle or a filtered file, the tensors.
    """
    tensors, metadata = read_lora(path, allow_pickle=allow_pickle)
    if not tensors:
        raise InputError(f"LoRA file {path} holds no tensors")
    fit = check_lora_fits(tensors, pipe, path, modules)
    if not fit.modules:
        raise InputError(
            f"LoRA {path} adapts no module of this model ({len(fit.unknown)} unknown, e.g. {fit.unknown[0]})",
            hint="it was made for another architecture",
        )
    if fit.unknown and not skip_unknown:
        raise InputError(
            f"LoRA {path} names {len(fit.unknown)} modules this model does not have (first: {fit.unknown[0]}); {len(fit.modules)} match",
            hint="pass --lora-skip-unknown to load the matching ones only",
        )
    if fit.unknown:
        unknown = set(fit.unknown)
        prefixes = tuple(u + "." for u in unknown)
        tensors = {k: v for k, v in tensors.items() if k not in unknown and not k.startswith(prefixes)}
    if _two_diffusers_layouts(tensors):
        # distilsd before 2026-12 wrote adapters beyond the attention projections this way;
        # diffusers' loader reads one layout per file and drops the rest. The kohya layout
        # (with each module's alpha) carries every module over.
        return to_kohya(tensors, metadata)
    if fit.unknown and metadata and not is_kohya(tensors):
        # Handed over as tensors, a diffusers-layout file loses the adapter config in its
        # metadata, and with it lora_alpha (the scale alpha / rank): the kohya layout keeps it.
        return to_kohya(tensors, metadata)
    if fit.unknown or path.suffix.lower() in PICKLED:
        return tensors
    return str(path)


def _two_diffusers_layouts(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a diffusers-layout file mixes ``lora.down``/``lora.up`` keys with peft's ``lora_A``/``lora_B``."""
    suffixes = {match.group(1) for key in tensors if (match := _DIFFUSERS_SUFFIX.search(key))}
    return bool(suffixes & {"lora.down", "lora.up"}) and bool(suffixes & {"lora_A", "lora_B"})


def load_lora_adapter(pipe, path: Path, name: str, source: str | dict[str, torch.Tensor]) -> None:
    """Load ``source`` (from :func:`checked_lora_source`) into ``pipe`` as the peft adapter ``name``."""
    try:
        if isinstance(source, str):
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        else:
            pipe.load_lora_weights(source, adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"diffusers could not load the LoRA {path}: {str(exc).splitlines()[0][:300]}"
        ) from None


def apply_loras(
    pipe,
    specs: list[LoRASpec],
    *,
    fuse: bool = False,
    allow_pickle: bool = False,
    skip_unknown: bool = False,
) -> list[str]:
    """Load each LoRA into ``pipe`` as its own adapter, mixed by the scales; return the adapter names.

    ``fuse`` folds the weighted adapters into the base weights and removes them (one pipeline
    as fast as the base, what an export needs). Keys that name no module of the pipeline are
    refused unless ``skip_unknown``, which loads the rest. A run folder's trained token
    embeddings (``embeddings/<word>.safetensors``) are loaded too, at full strength whatever
    the LoRA's scale (a word's vectors do not interpolate like an adapter).
    """
    from .embeddings import embedding_files, load_word_embeddings

    if not specs:
        return []
    names: list[str] = []
    for spec in specs:
        path = lora_file(spec.path)
        source = checked_lora_source(pipe, path, allow_pickle=allow_pickle, skip_unknown=skip_unknown)
        name = _adapter_name(spec, set(names))
        # The embeddings first: a word the tokenizer has already (the same run twice) is refused
        # before the adapter is loaded.
        load_word_embeddings(pipe, embedding_files(spec.path))
        load_lora_adapter(pipe, path, name, source)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[spec.scale for spec in specs])
    if fuse:
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
    return names
