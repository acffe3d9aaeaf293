"""Files shipped inside the package (tokenizer, model presets)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).parent
CLIP_TOKENIZER_DIR = ASSETS_DIR / "clip_tokenizer"


def clip_tokenizer():
    """The standard CLIP BPE tokenizer (SD v1/v2's), loaded offline from the shipped files."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
