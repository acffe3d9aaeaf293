"""Latent and text-embedding cache: encode every sample once, reuse across epochs and runs.

Layout: ``<cache_root>/<key>/shard-00000.safetensors ... manifest.json``. Shard ``s`` holds
the usable samples among source indices ``[s * S, (s + 1) * S)`` with tensors

- ``latent_mean``, ``latent_std`` [n, 4, h, w]: the VAE's latent distribution (not a sample,
  so that a latent is drawn with the same per-step noise as an uncached run draws it);
- ``latent_mean_flip``, ``latent_std_flip``: the same for the mirrored image (random flip);
- ``text_embeds`` [m, 77, d]: the text encoder's last hidden state for each caption of each
  row (one per row with ``caption_choice: first``, every caption of the row with ``random``;
  unused by runs that train the text encoder: they cache only the latents and encode their
  captions as they go);
- ``caption_start``, ``caption_count`` [n]: where a row's captions are in ``text_embeds``;
- ``index`` [n]: the source index of each row.

The key hashes the VAE and text-encoder weights and tokenizer files, the resolution, resize
filter, crop, flip, caption choice, dtype and the data listing (file names, captions, sizes, modification times), so a
changed input gets a new cache instead of a stale one. Shards are written atomically; an
interrupted build keeps its finished shards and goes on from there. With several processes
each builds every N-th shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from distilsd.errors import InputError

from .data import BadSample, ImageCaptionSource, caption_pick, prepare_image, wants_flip

logger = logging.getLogger(__name__)

# 2: every caption of a multi-caption row is cached (1 held the first only) and the resize
# filter is part of the key.
CACHE_FORMAT = 2
IDENTITY_COMPONENTS = ("vae", "text_encoder", "tokenizer")


def model_identity(model: str) -> str:
    """A hash of the files that decide the cached values (VAE, text encoder, tokenizer)."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{model}"  # a hub id resolves to a fixed snapshot for a given revision
    digest = hashlib.sha256()
    for component in IDENTITY_COMPONENTS:
        for file in sorted((path / component).rglob("*")):
            if file.is_file():
                digest.update(str(file.relative_to(path)).encode())
                with open(file, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 24), b""):
                        digest.update(block)
    return digest.hexdigest()


def cache_key(model_id: str, source: ImageCaptionSource, data_config) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "model": model_id,
        "data": source.identity(),
        "resolution": data_config.resolution,
        "resize": data_config.resize,
        "crop": data_config.crop,
        "flip": bool(data_config.random_flip),
        "caption_choice": data_config.caption_choice,
        "dtype": data_config.cache_dtype,
        "shard_size": data_config.cache_shard_size,
    }
    if data_config.refine_latents:  # absent when 0, so the caches built before keep their keys
        parts["refine_latents"] = data_config.refine_latents
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# ---- encoders (shared with the uncached training path, so both compute the same values) ----


def tokenize(tokenizer, captions: list[str]):
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_text(text_encoder, tokenizer, captions: list[str], grad: bool = False):
    """Captions -> the text encoder's last hidden state [B, 77, D] (what SD's U-Net attends to).

    ``grad``: keep the graph (the text encoder is being trained with the U-Net).
    """
    import torch

    input_ids = tokenize(tokenizer, captions).to(text_encoder.device)
    with torch.set_grad_enabled(grad):
        return text_encoder(input_ids, return_dict=False)[0]


def encode_images(vae, pixel_values):
    """Pixels [B, 3, H, W] in [-1, 1] -> the latent distribution's (mean, std), each [B, 4, H/8, W/8]."""
    import torch

    with torch.no_grad():
        distribution = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    return distribution.mean, distribution.std


REFINE_LEARNING_RATE = 0.05


def refine_latent_means(vae, pixel_values, mean, steps: int):
    """Move each latent mean until the VAE's decoder draws its image (decoder inversion).

    The encoder's mean decodes to an approximation of the image; for a shape the VAE never saw
    (the Shapes hexagon) the approximation is a rounded blob, and a U-Net trained on such
    latents learns the blob. ``steps`` Adam steps (learning rate 0.05) on the L1 distance
    between the decoded latent and the image, from the encoder's mean, in float32 with the VAE
    frozen. One image at a time: Adam turns the last bits of a batched convolution into whole
    steps, so a batch of images would not give each image the latent it gets alone, and the
    cached and uncached paths batch differently.
    """
    import torch

    decoder_dtype = next(vae.parameters()).dtype
    refined = []
    for target, start in zip(pixel_values, mean, strict=True):
        target = target[None].to(vae.device, torch.float32)
        latent = start[None].detach().to(vae.device, torch.float32).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([latent], lr=REFINE_LEARNING_RATE)
        with torch.enable_grad():
            for _ in range(steps):
                decoded = vae.decode(latent.to(decoder_dtype)).sample.float()
                loss = (decoded - target).abs().mean()
                # Gradients for the latent only: the VAE's own .grad stays untouched.
                (latent.grad,) = torch.autograd.grad(loss, latent)
                optimizer.step()
        refined.append(latent.detach()[0])
    return torch.stack(refined).to(mean.device, mean.dtype)


class LatentCache:
    """A finished cache folder, read row by row (memory-mapped safetensors)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.rows: list[tuple[int, int]] = [
            (s, r) for s, shard in enumerate(self.manifest["shards"]) for r in range(shard["count"])
        ]
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def flip(self) -> bool:
        return self.manifest["flip"]

    def _shard(self, shard: int):
        from safetensors import safe_open

        if shard not in self._handles:
            if len(self._handles) > 8:
                self._handles.clear()
            self._handles[shard] = safe_open(
                str(self.folder / self.manifest["shards"][shard]["file"]), framework="pt"
            )
        return self._handles[shard]

    def source_index(self, row: int) -> int:
        shard, r = self.rows[row]
        return int(self._shard(shard).get_slice("index")[r : r + 1][0])

    def caption_count(self, row: int) -> int:
        shard, r = self.rows[row]
        return int(self._shard(shard).get_slice("caption_count")[r : r + 1][0])

    def row(self, row: int, flipped: bool, caption: int = 0) -> dict[str, Any]:
        """Row ``row``'s latents (mirrored ones if ``flipped``) and its ``caption``-th text embedding."""
        shard, r = self.rows[row]
        handle = self._shard(shard)
        suffix = "_flip" if flipped else ""
        text = int(handle.get_slice("caption_start")[r : r + 1][0]) + caption
        return {
            "latent_mean": handle.get_slice(f"latent_mean{suffix}")[r : r + 1][0].float(),
            "latent_std": handle.get_slice(f"latent_std{suffix}")[r : r + 1][0].float(),
            "text_embeds": handle.get_slice("text_embeds")[text : text + 1][0].float(),
        }

    def __getstate__(self):  # DataLoader workers open their own file handles
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


class CachedDataset:
    """``(epoch, row) -> cached latents and text embeddings``, flipped as the uncached path would.

    A row with several captions gets the text embedding of the caption the uncached path
    would choose (same rule, same seed, epoch and source index).
    With ``captions`` (the data source) each item also carries its caption, for runs that
    train the text encoder: their latents come from the cache (the VAE is frozen), their text
    embeddings from the encoder as it is now, not from the cache.
    """

    def __init__(
        self,
        cache: LatentCache,
        seed: int,
        caption_choice: str = "random",
        captions: ImageCaptionSource | None = None,
    ):
        self.cache = cache
        self.seed = seed
        self.caption_choice = caption_choice
        self.captions = captions

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, row = key
        flipped = wants_flip(self.cache.flip, self.seed, epoch, row)
        source_index = self.cache.source_index(row)
        pick = caption_pick(
            self.cache.caption_count(row), self.caption_choice, self.seed, epoch, source_index
        )
        item = self.cache.row(row, flipped, pick)
        if self.captions is not None:
            item["caption"] = self.captions.captions_of(source_index)[pick]
        return {**item, "index": row, "bad": 0}


def build_cache(
    source: ImageCaptionSource,
    data_config,
    model_id: str,
    vae,
    text_encoder,
    tokenizer,
    accelerator,
    batch_size: int = 8,
) -> LatentCache:
    """Find the cache for this model + data + settings, or build it (shards split over processes)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .data import default_cache_root

    if data_config.crop == "random":
        raise InputError(
            "--cache-latents stores one crop per image, so it cannot be combined with random crops",
            hint="use --crop center (random flips are cached both ways)",
        )
    root = Path(data_config.cache_dir) if data_config.cache_dir else default_cache_root()
    folder = root / cache_key(model_id, source, data_config)
    if (folder / "manifest.json").is_file():
        logger.info("using the latent cache at %s", folder)
        return LatentCache(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from distilsd.models import torch_dtype

    dtype = torch_dtype(data_config.cache_dtype)
    shard_size = data_config.cache_shard_size
    num_shards = (len(source) + shard_size - 1) // shard_size
    started = time.perf_counter()
    for shard in range(accelerator.process_index, num_shards, accelerator.num_processes):
        path = folder / f"shard-{shard:05d}.safetensors"
        if path.is_file():
            continue  # finished by an earlier, interrupted build
        indices = range(shard * shard_size, min(len(source), (shard + 1) * shard_size))
        columns: dict[str, list] = {}
        kept: list[int] = []
        caption_counts: list[int] = []
        skipped = 0
        for first in range(0, len(indices), batch_size):
            pixels, captions = [], []
            for index in indices[first : first + batch_size]:
                try:
                    image = source.load_image(index)
                except BadSample as exc:
                    logger.warning("cache: skipping bad sample: %s", exc)
                    skipped += 1
                    continue
                pixels.append(
                    prepare_image(image, data_config.resolution, "center", False, resize=data_config.resize)
                )
                # "first" never trains on the others: their embeddings would be dead weight.
                row_captions = source.captions_of(index)
                if data_config.caption_choice == "first":
                    row_captions = row_captions[:1]
                captions.extend(row_captions)
                caption_counts.append(len(row_captions))
                kept.append(index)
            if not pixels:
                continue
            batch = torch.stack(pixels).to(accelerator.device)
            encoded = {"text_embeds": encode_text(text_encoder, tokenizer, captions)}
            encoded["latent_mean"], encoded["latent_std"] = encode_images(vae, batch)
            if data_config.random_flip:
                encoded["latent_mean_flip"], encoded["latent_std_flip"] = encode_images(
                    vae, torch.flip(batch, dims=[3])
                )
            if data_config.refine_latents:
                batch_rows = kept[len(kept) - len(pixels) :]
                instance = [i for i, index in enumerate(batch_rows) if index not in source.prior_rows]
                views = {"latent_mean": batch, "latent_mean_flip": torch.flip(batch, dims=[3])}
                for name, view in views.items():
                    if name in encoded and instance:
                        encoded[name][instance] = refine_latent_means(
                            vae, view[instance], encoded[name][instance], data_config.refine_latents
                        )
            for name, tensor in encoded.items():
                columns.setdefault(name, []).append(tensor.to("cpu", dtype))
        tensors = {name: torch.cat(parts).contiguous() for name, parts in columns.items()}
        tensors["index"] = torch.tensor(kept, dtype=torch.int64)
        counts = torch.tensor(caption_counts, dtype=torch.int64)
        tensors["caption_count"] = counts
        tensors["caption_start"] = torch.cumsum(counts, 0) - counts
        tmp = path.with_name(path.name + f".tmp{accelerator.process_index}")
        save_file(tensors, str(tmp), metadata={"count": str(len(kept)), "skipped": str(skipped)})
        tmp.replace(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = []
        total_skipped = 0
        for shard in range(num_shards):
            name = f"shard-{shard:05d}.safetensors"
            with safe_open(str(folder / name), framework="pt") as handle:
                metadata = handle.metadata()
            shards.append({"file": name, "count": int(metadata["count"])})
            total_skipped += int(metadata["skipped"])
        manifest = {
            "format": CACHE_FORMAT,
            "num_samples": sum(s["count"] for s in shards),
            "skipped": total_skipped,
            "flip": bool(data_config.random_flip),
            "caption_choice": data_config.caption_choice,
            "resize": data_config.resize,
            "resolution": data_config.resolution,
            "dtype": data_config.cache_dtype,
            "model": model_id,
            "data": source.identity(),
            "shards": shards,
        }
        tmp = folder / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(folder / "manifest.json")
        logger.info(
            "built the latent cache (%d samples, %d skipped) in %.1f s at %s",
            manifest["num_samples"],
            total_skipped,
            time.perf_counter() - started,
            folder,
        )
    accelerator.wait_for_everyone()
    cache = LatentCache(folder)
    if len(cache) == 0:
        raise InputError(f"no sample of {source.kind} data could be read while building the cache")
    return cache
