"""Caption files for evaluation: every caption gets a unique, stable image name.

Three layouts are read:

- ``.csv``: BK-SDM's ``metadata.csv`` (a header with ``file_name`` and ``text``; ``caption``
  or ``prompt`` are accepted for ``text``). The image is named after ``file_name``'s stem, so
  ``COCO_val2014_000000000042.jpg`` becomes ``COCO_val2014_000000000042.png``.
- ``.jsonl``: one object a line with ``file_name`` (or ``name``) and ``text`` (or
  ``caption`` / ``prompt``); without a name the line number names the image.
- anything else: plain text, one caption a line; image ``i`` is named ``00000i``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from distilsd.errors import InputError
from distilsd.generate import PromptSpec
from distilsd.generate.prompts import SAFE_NAME, iter_jsonl

CAPTION_KEYS = ("text", "caption", "prompt")
NAME_KEYS = ("file_name", "name")


def _name_from(value: str, where: str) -> str:
    stem = Path(str(value).strip()).stem
    # Names become file names: nothing from a caption file may escape the output folder.
    if not SAFE_NAME.match(stem):
        raise InputError(
            f"{where}: '{value}' does not give a safe file name",
            hint="use letters, digits, '.', '_' and '-' only",
        )
    return stem


def _caption_from(record: dict, where: str) -> str:
    for key in CAPTION_KEYS:
        value = record.get(key)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise InputError(
                    f"{where}: the caption ('{key}') is empty", hint="every image needs a caption"
                )
            return " ".join(value.split())
    raise InputError(
        f"{where}: no caption",
        hint="give it a column/key named " + " or ".join(f"'{k}'" for k in CAPTION_KEYS),
    )


def read_caption_file(path: str | Path) -> list[PromptSpec]:
    """Read a caption file (``metadata.csv``, ``.jsonl`` or ``.txt``) into named prompts.

    Refuses a file with an empty caption or with two captions for the same image name.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"caption file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"caption file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None

    specs: list[PromptSpec] = []
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        fields = [f.strip() for f in reader.fieldnames or []]
        if "file_name" not in fields or not any(key in fields for key in CAPTION_KEYS):
            raise InputError(
                f"{path}: expected a header with 'file_name' and 'text' (BK-SDM's metadata.csv), got {', '.join(fields) or 'nothing'}"
            )
        for number, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            where = f"{path}:{number}"
            if not (row.get("file_name") or "").strip():
                raise InputError(f"{where}: empty 'file_name'")
            specs.append(PromptSpec(_caption_from(row, where), name=_name_from(row["file_name"], where)))
    elif suffix == ".jsonl":
        for number, where, record in iter_jsonl(path, text, "'file_name' and 'text'"):
            raw_name = next((record[key] for key in NAME_KEYS if record.get(key) not in (None, "")), None)
            name = _name_from(raw_name, where) if raw_name is not None else f"{number - 1:06d}"
            specs.append(PromptSpec(_caption_from(record, where), name=name))
    else:
        for number, line in enumerate(text.splitlines()):
            if line.strip():
                specs.append(PromptSpec(" ".join(line.split()), name=f"{number:06d}"))

    if not specs:
        raise InputError(f"caption file {path} has no captions")
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec.name] = seen.get(spec.name, 0) + 1
    duplicates = sorted(name for name, count in seen.items() if count > 1)
    if duplicates:
        shown = ", ".join(f"'{name}'" for name in duplicates[:5]) + (
            f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        )
        raise InputError(
            f"caption file {path} names the image(s) {shown} more than once",
            hint="image names must be unique",
        )
    return specs
