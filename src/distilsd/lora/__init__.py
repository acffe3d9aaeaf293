"""LoRA adapters: train them (:mod:`.adapters`, used by the trainer), read, check, convert and apply them (:mod:`.files`).

    from distilsd.lora import LoRASpec, apply_loras

    apply_loras(pipe, [LoRASpec(Path("runs/hexagon-lora"), scale=0.8)], fuse=True)

Importing this package is cheap; torch, peft and diffusers load when a function runs.
"""

from __future__ import annotations

__all__ = [
    "KOHYA_WEIGHTS",
    "LORA_INFO",
    "LORA_WEIGHTS",
    "LoRASpec",
    "add_lora",
    "apply_loras",
    "check_lora_fits",
    "parse_lora_spec",
    "read_lora",
    "save_lora",
    "to_kohya",
    "write_kohya",
]

from distilsd.lora.names import KOHYA_WEIGHTS, LORA_INFO, LORA_WEIGHTS


def __getattr__(name: str):
    if name in ("add_lora", "save_lora"):
        from distilsd.lora import adapters

        return getattr(adapters, name)
    if name in (
        "LoRASpec",
        "apply_loras",
        "check_lora_fits",
        "parse_lora_spec",
        "read_lora",
        "to_kohya",
        "write_kohya",
    ):
        from distilsd.lora import files

        return getattr(files, name)
    raise AttributeError(name)
