"""Build the CLIP tokenizer files that distilsd ships, from open_clip's BPE vocabulary.

The CLIP BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``) ships inside the
open_clip_torch wheel. This script turns it into the ``vocab.json`` / ``merges.txt`` pair
that ``transformers.CLIPTokenizer`` reads, using the same construction as CLIP's own
tokenizer, so that ids match the standard ones (49406 start, 49407 end, 49408 tokens).

    pip install 'distilsd[tokenizer]'
    python scripts/build_clip_tokenizer.py [--output src/distilsd/assets/clip_tokenizer]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src" / "distilsd" / "assets" / "clip_tokenizer"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (the first line is a header).
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def find_open_clip_vocabulary() -> Path:
    import open_clip  # noqa: F401  (only to locate the packaged file)

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise SystemExit(f"open_clip is installed but {path} is missing")
    return path


def build(bpe_path: Path, output: Path) -> None:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]

    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [token + "</w>" for token in tokens]
    tokens += ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)

    output.mkdir(parents=True, exist_ok=True)
    (output / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (output / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    # The settings of openai/clip-vit-large-patch14's tokenizer, which SD v1 uses.
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "errors": "replace",
    }
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bpe", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz (default: open_clip's)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    build(args.bpe or find_open_clip_vocabulary(), args.output)


if __name__ == "__main__":
    main()
