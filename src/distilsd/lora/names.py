"""The file names a LoRA run folder holds."""

import re

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' layout (save_lora_weights / load_lora_weights)
KOHYA_WEIGHTS = "lora_kohya.safetensors"  # the kohya / AUTOMATIC1111 layout, written on request
LORA_INFO = "lora_info.json"  # what the adapter was trained on: base model, rank, alpha, steps
EMBEDDINGS_DIR = (
    "embeddings"  # trained token embeddings: embeddings/<word>.safetensors (AUTOMATIC1111's layout)
)

_WORD = re.compile(r"[a-z0-9][a-z0-9_-]*")


def bad_embedding_word(word: str) -> str | None:
    """Why ``word`` cannot name a trained token embedding (None: it can)."""
    if not _WORD.fullmatch(word.strip().lower()):
        return f"token embedding word {word!r} is not one word (letters, digits, - and _)"
    return None
