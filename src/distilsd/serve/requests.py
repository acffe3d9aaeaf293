"""What every HTTP endpoint shares: reading images sent as base64, and waiting for a job.

Used by :mod:`distilsd.serve.api` (distilsd's own endpoints) and :mod:`distilsd.serve.a1111`.
"""

import asyncio
import base64
import binascii
import io
from typing import Any

from distilsd.serve.service import (
    MAX_INIT_IMAGE_SIZE,
    GenerationRequest,
    Job,
    JobCancelledError,
    RequestError,
    Service,
)


def strip_data_url(data: str) -> str:
    """The base64 part of a ``data:image/png;base64,...`` URL (A1111 clients send either)."""
    return data.partition(",")[2] if data.startswith("data:") else data


def decode_image(data: str, field: str, mode: str):
    """A base64 image (optionally a data: URL) -> PIL image in ``mode``; never touches the disk."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(strip_data_url(data), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, f"{field} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        # Check the header's size before decoding the pixels (a tiny file can claim a huge image).
        if max(image.size) > MAX_INIT_IMAGE_SIZE:
            raise RequestError(
                field,
                f"{field} is {image.size[0]}x{image.size[1]}; the limit is {MAX_INIT_IMAGE_SIZE} per side",
            )
        return image.convert(mode)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise RequestError(field, f"{field} cannot be read as an image ({type(exc).__name__})") from None


async def run_job(service: Service, http_request: Any, request: GenerationRequest) -> Job:
    """Queue ``request`` and wait for it without blocking the event loop.

    A client that disconnects while its job waits (or runs) cancels it, which frees its
    queue slot at once (or stops the denoising at the next step).
    """
    job = service.submit(request)
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(finished.set)
        except RuntimeError:  # the loop is gone (server stopped); nobody waits any more
            pass

    job.add_done_callback(wake)
    while not finished.is_set():
        try:
            await asyncio.wait_for(finished.wait(), timeout=0.25)
        except asyncio.TimeoutError:
            if await http_request.is_disconnected():
                service.cancel(job)
                raise JobCancelledError("the client disconnected; its job was cancelled") from None
    job.result()  # raises the job's error, if any
    return job
