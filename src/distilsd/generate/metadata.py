"""Generation parameters in PNG and JPEG files, in the format AUTOMATIC1111's web UI writes.

The PNG text chunk ``parameters`` (in a JPEG: the EXIF UserComment, as A1111 writes it) holds::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 25, Sampler: PLMS, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: bk-sdm-tiny, Version: distilsd 0.1.0

which sd-parsers, the A1111 "PNG Info" tab, ComfyUI and InvokeAI read back.
"""

from __future__ import annotations

import io
from pathlib import Path


def _quote(value: str) -> str:
    # A1111 quotes values that contain its separators.
    return f'"{value}"' if any(ch in value for ch in ',:\n"') else value


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    version: str,
    denoising_strength: float | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    fields = {
        "Steps": str(steps),
        "Sampler": sampler,
        "CFG scale": f"{cfg_scale:g}",
        "Seed": str(seed),
        "Size": f"{width}x{height}",
        "Model": _quote(model),
    }
    if denoising_strength is not None:
        fields["Denoising strength"] = f"{denoising_strength:g}"
    fields.update({key: _quote(value) for key, value in (extra or {}).items()})
    fields["Version"] = _quote(version)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Parse the ``parameters`` text back into ``prompt``, ``negative_prompt`` and the fields."""
    lines = text.split("\n")
    settings_line = lines[-1]
    body = lines[:-1]
    negative_at = next((i for i, line in enumerate(body) if line.startswith("Negative prompt: ")), None)
    if negative_at is None:
        prompt, negative = "\n".join(body), ""
    else:
        prompt = "\n".join(body[:negative_at])
        negative = "\n".join(body[negative_at:])[len("Negative prompt: ") :]
    result = {"prompt": prompt, "negative_prompt": negative}
    # Split "Key: value, Key: "quoted, value", ..." respecting quotes.
    key, in_quotes, token = None, False, ""
    for ch in settings_line + ",":
        if ch == '"':
            in_quotes = not in_quotes
        elif ch == ":" and not in_quotes and key is None:
            key, token = token.strip(), ""
            continue
        elif ch == "," and not in_quotes:
            if key is not None:
                result[key] = token.strip().strip('"')
            key, token = None, ""
            continue
        token += ch
    return result


def read_png_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text chunk of a PNG, or None if it has none or cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.text.get("parameters") if hasattr(image, "text") else None
    except (OSError, ValueError):
        return None


def png_with_parameters(image, parameters: str) -> bytes:
    """Encode a PIL image as PNG bytes carrying ``parameters`` in its text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


JPEG_QUALITY = 75  # PIL's default: what BK-SDM's ``img.save("....jpg")`` writes
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"  # EXIF's marker for a UTF-16 UserComment


def jpeg_with_parameters(image, parameters: str, quality: int = JPEG_QUALITY) -> bytes:
    """Encode a PIL image as JPEG bytes carrying ``parameters`` in its EXIF UserComment."""
    from PIL import Image

    exif = Image.Exif()
    exif[_EXIF_IFD] = {_USER_COMMENT: _UNICODE_PREFIX + parameters.encode("utf-16-be")}
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, exif=exif)
    return buffer.getvalue()


def read_image_parameters(path: str | Path) -> str | None:
    """The generation parameters of a PNG (text chunk) or JPEG (EXIF UserComment), or None."""
    from PIL import Image

    if Path(path).suffix.lower() not in (".jpg", ".jpeg"):
        return read_png_parameters(path)
    try:
        with Image.open(path) as image:
            comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except (OSError, ValueError):
        return None
    if not isinstance(comment, bytes) or not comment.startswith(_UNICODE_PREFIX):
        return None
    return comment[len(_UNICODE_PREFIX) :].decode("utf-16-be", errors="replace")
