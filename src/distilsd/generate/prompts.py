"""Reading prompts: from the command line, a text file (one per line) or a JSONL file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distilsd.errors import InputError

# torch.Generator.manual_seed takes up to 2**64 - 1; the CLI, prompt files and the API share this bound.
MAX_SEED = 2**63 - 1

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt, with what a JSONL line may set for it alone."""

    prompt: str
    negative_prompt: str | None = None  # None: use the run's --negative
    seed: int | None = None  # None: use the run's --seed
    name: str | None = None  # output file stem; None: derived from the index and prompt


def _check_name(name: str, where: str) -> str:
    # Names become file names: nothing from a prompt file may escape the output folder.
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise InputError(
            f"{where}: name '{name}' is not a safe file name",
            hint="use letters, digits, '.', '_' and '-' only",
        )
    return name


def iter_jsonl(path: Path, text: str, expected: str) -> Iterator[tuple[int, str, dict]]:
    """(line number, "path:line", object) for each non-empty line of a JSONL text.

    ``expected`` says what each object must hold, for the error message.
    """
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: each line must be a JSON object with {expected}")
        yield number, where, record


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """Read ``.txt`` (one prompt a line; blank lines and ``#`` comments skipped) or ``.jsonl``.

    A JSONL line is an object with ``prompt`` (or ``text``/``caption``) and optionally
    ``negative_prompt``, ``seed`` and ``name``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None

    specs: list[PromptSpec] = []
    if path.suffix.lower() == ".jsonl":
        for _, where, record in iter_jsonl(path, text, "a 'prompt'"):
            prompt = record.get("prompt", record.get("text", record.get("caption")))
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{where}: missing or empty 'prompt'")
            seed = record.get("seed")
            if seed is not None and (
                not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED
            ):
                raise InputError(f"{where}: 'seed' must be an integer from 0 to {MAX_SEED}, got {seed!r}")
            negative = record.get("negative_prompt")
            if negative is not None and not isinstance(negative, str):
                raise InputError(f"{where}: 'negative_prompt' must be a string")
            name = record.get("name")
            if name is not None:
                name = _check_name(str(name), where)
            specs.append(PromptSpec(prompt.strip(), negative, seed, name))
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                specs.append(PromptSpec(line))

    if not specs:
        raise InputError(
            f"prompt file {path} has no prompts",
            hint="write one prompt per line (.txt) or one JSON object per line (.jsonl)",
        )
    names = [spec.name for spec in specs if spec.name]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(
            f"prompt file {path} uses the name(s) {', '.join(duplicates)} more than once",
            hint="names must be unique",
        )
    return specs


def truncation_warnings(tokenizer, texts: list[str]) -> list[str]:
    """One warning per distinct prompt longer than the text encoder's window.

    Pipelines cut such prompts to the window (CLIP: 77 tokens, start and end tokens
    included) and say so only in a library log; this names what is lost.
    """
    if tokenizer is None:
        return []
    window = tokenizer.model_max_length
    warnings = []
    for text in dict.fromkeys(t for t in texts if t):
        try:  # the prompt's own characters (a deep-copied fast tokenizer decodes to raw BPE)
            encoded = tokenizer(text, truncation=False, verbose=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow tokenizers have no offsets
            encoded = tokenizer(text, truncation=False, verbose=False)
        ids = encoded.input_ids
        count = len(ids)
        if count > window:
            # The pipeline keeps ids[: window - 1] and the end token.
            offsets = encoded.get("offset_mapping")
            dropped = (
                text[offsets[window - 1][0] :].strip() if offsets else tokenizer.decode(ids[window - 1 : -1])
            )
            shown = text if len(text) <= 40 else text[:37] + "..."
            warnings.append(
                f"the prompt '{shown}' is {count} tokens long; the text encoder reads {window}, "
                f"so its last {count - window} tokens are dropped ('{dropped}')"
            )
    return warnings
