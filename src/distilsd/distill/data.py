"""Image-caption data for training: three sources, one deterministic, resumable order.

Sources (all map-style, so that the order is a pure function of the seed and the step):

- an image folder with ``metadata.jsonl`` (``{"file_name": ..., "text": ...}`` per line, the
  BK-SDM / diffusers ``imagefolder`` format), or images with ``.txt`` captions beside them;
- a Hugging Face dataset (hub name or local path), image and caption columns by name;
- webdataset tar shards as img2dataset writes them (``key.jpg`` + ``key.txt`` per sample).
  The tars are indexed once (member offsets), so samples are read by random access and the
  ``webdataset`` package is not needed.

Order: global micro-batch ``k`` takes ``permutation(epoch)[j * B : (j + 1) * B]`` (``B`` the
global micro-batch over all processes, ``j`` its place in the epoch) and process ``r`` takes
its ``r``-th slice. Crop and flip come from a generator seeded by (seed, epoch, index), and
so does the caption of a row that has several. So a resumed run sees exactly the samples an
uninterrupted one would, and N processes with batch b see the same samples as one process
with batch N*b. An epoch's last partial global batch is dropped (see GlobalBatchSampler).

Bad samples (unreadable image, missing caption) never stop training: captionless entries
are dropped while listing and counted; an image that fails to decode is replaced by the next
index (deterministically) and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distilsd.errors import InputError, MissingDependencyError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadSample(Exception):
    """A sample that cannot be used (unreadable image, missing caption)."""


class ImageCaptionSource:
    """A list of images, each with one or more captions.

    ``captions[i]`` is the tuple of row ``i``'s captions (COCO-style rows have five); which one a
    training step sees is :func:`choose_caption`'s decision, ``caption(i)`` is the first.
    """

    kind = "base"

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()  # reason -> count, found while listing
        self.captions: list[tuple[str, ...]] = []
        # Rows marked as prior-preservation samples ("prior": true in metadata.jsonl, as
        # `distilsd dreambooth` writes its class images); loss.prior_target says what they learn.
        self.prior_rows: set[int] = set()

    def __len__(self) -> int:
        raise NotImplementedError

    def load_image(self, index: int):
        raise NotImplementedError

    def load(self, index: int):
        """``(PIL image, first caption)``."""
        return self.load_image(index), self.caption(index)

    def caption(self, index: int) -> str:
        return self.captions[index][0]

    def captions_of(self, index: int) -> tuple[str, ...]:
        return self.captions[index]

    def identity(self) -> str:
        """A string that changes whenever the listing or the files change (for the cache key)."""
        raise NotImplementedError


def caption_list(value: Any) -> tuple[str, ...]:
    """A caption cell -> its non-empty captions: a string, or a list of strings (COCO-style)."""
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(c for c in value if isinstance(c, str) and c.strip())
    return ()


def _decode_image(data: bytes | str | Path, what: str):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # PIL raises many kinds for broken files
        raise BadSample(f"unreadable image {what}: {exc}") from None


class ImageFolderSource(ImageCaptionSource):
    """``metadata.jsonl`` + images, or images with ``.txt`` caption files beside them."""

    kind = "imagefolder"

    def __init__(self, root: str | Path, caption_column: str = "text"):
        super().__init__()
        self.root = Path(root)
        self.files: list[Path] = []
        metadata = self.root / "metadata.jsonl"
        if metadata.is_file():
            self._read_metadata(metadata, caption_column)
        else:
            self._read_sidecars()

    def _read_metadata(self, metadata: Path, caption_column: str) -> None:
        keys_seen: set[str] = set()
        for line_number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                self.skipped["bad metadata line"] += 1
                logger.warning("metadata.jsonl line %d is not JSON; skipped", line_number)
                continue
            keys_seen.update(row)
            file_name, captions = row.get("file_name"), caption_list(row.get(caption_column))
            if not file_name:
                self.skipped["no file_name"] += 1
                continue
            if not captions:
                self.skipped["missing caption"] += 1
                continue
            path = self.root / file_name
            if not path.is_file():
                self.skipped["missing image file"] += 1
                continue
            if row.get("prior") is True:
                self.prior_rows.add(len(self.files))
            self.files.append(path)
            self.captions.append(captions)
        if not self.files:
            if keys_seen and caption_column not in keys_seen:
                raise InputError(
                    f"no captions: {metadata} has no '{caption_column}' key (keys: {', '.join(sorted(keys_seen))})",
                    hint="choose the caption key with --caption-column",
                )
            raise InputError(
                f"no usable image-caption pairs in {self.root} ({self._skipped_text() or 'metadata.jsonl is empty'})",
                hint='metadata.jsonl needs one line per image: {"file_name": "0001.png", "text": "a caption"}',
            )

    def _read_sidecars(self) -> None:
        images = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not images:
            raise InputError(
                f"no images in {self.root}",
                hint="give an image folder with metadata.jsonl, a Hugging Face dataset, or webdataset .tar shards",
            )
        for path in images:
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            if not caption:
                self.skipped["missing caption"] += 1
                continue
            self.files.append(path)
            self.captions.append((caption,))
        if not self.files:
            raise InputError(
                f"no captions for the {len(images)} images in {self.root}",
                hint="add metadata.jsonl (file_name, text per line) or a .txt caption beside each image",
            )

    def _skipped_text(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.skipped.items())

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, index: int):
        return _decode_image(self.files[index], str(self.files[index]))

    def identity(self) -> str:
        digest = hashlib.sha256()
        for path, captions in zip(self.files, self.captions, strict=True):
            stat = path.stat()
            caption = "\x1f".join(captions)  # every caption of the row: each may be trained on
            digest.update(
                f"{path.relative_to(self.root)}\0{caption}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
            )
        return f"imagefolder:{digest.hexdigest()}"


class HFDatasetSource(ImageCaptionSource):
    """A Hugging Face dataset: a hub name, a folder from ``save_to_disk``, or a data folder."""

    kind = "hf"

    def __init__(
        self, name: str, split: str = "train", image_column: str = "image", caption_column: str = "text"
    ):
        super().__init__()
        try:
            import datasets
        except ImportError:
            raise MissingDependencyError("datasets", "train", "Reading Hugging Face datasets") from None
        path = Path(name)
        try:
            if path.is_dir() and (
                (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
            ):
                dataset = datasets.load_from_disk(str(path))
                if isinstance(dataset, datasets.DatasetDict):
                    if split not in dataset:
                        raise InputError(
                            f"dataset {name} has no split '{split}' (splits: {', '.join(dataset)})",
                            hint="choose one with --split",
                        )
                    dataset = dataset[split]
            else:
                dataset = datasets.load_dataset(name, split=split)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot load the Hugging Face dataset '{name}': {exc}") from None
        columns = dataset.column_names
        for column, flag in ((image_column, "--image-column"), (caption_column, "--caption-column")):
            if column not in columns:
                raise InputError(
                    f"dataset {name} has no column '{column}' (columns: {', '.join(columns)})",
                    hint=f"choose it with {flag}",
                )
        if isinstance(dataset.features[image_column], datasets.Image):
            # Decode ourselves, so that one broken image is skipped instead of raising in datasets.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.image_column = image_column
        self.rows: list[int] = []
        for row, cell in enumerate(dataset[caption_column]):
            captions = caption_list(cell)
            if not captions:
                self.skipped["missing caption"] += 1
                continue
            self.rows.append(row)
            self.captions.append(captions)
        if not self.rows:
            raise InputError(
                f"no captions in column '{caption_column}' of dataset {name}",
                hint="choose it with --caption-column",
            )
        self.name = name
        self.split = split
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, index: int):
        value = self.dataset[self.rows[index]][self.image_column]
        what = f"row {self.rows[index]} of {self.name}"
        if value is None:
            raise BadSample(f"no image in {what}")
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if hasattr(value, "convert"):  # already a PIL image
            return value.convert("RGB")
        return _decode_image(value, what)

    def identity(self) -> str:
        fingerprint = getattr(self.dataset, "_fingerprint", "")
        # The fingerprint covers the captions; the format version marks that every caption of
        # a row is listed now (the first only, before).
        return f"hf2:{self.name}:{self.split}:{self.image_column}:{self.caption_column}:{fingerprint}:{len(self.rows)}"


def expand_shards(pattern: str) -> list[Path]:
    """``dir/`` -> its .tar files; ``a-{000..009}.tar`` -> ten names; ``*.tar`` -> glob."""
    path = Path(pattern)
    if path.is_dir():
        return sorted(path.rglob("*.tar"))
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first)
        names = [
            pattern[: match.start()] + str(i).zfill(width) + pattern[match.end() :]
            for i in range(int(first), int(last) + 1)
        ]
        return [p for name in names for p in expand_shards(name)]
    if any(ch in pattern for ch in "*?["):
        import glob

        return sorted(Path(p) for p in glob.glob(pattern))
    return [path] if path.is_file() else []


@dataclass
class _TarMember:
    shard: int
    offset: int
    size: int


class WebDatasetSource(ImageCaptionSource):
    """webdataset / img2dataset tar shards, read by random access after indexing the members."""

    kind = "webdataset"

    def __init__(self, pattern: str, image_ext: str = "jpg;jpeg;png;webp", caption_ext: str = "txt"):
        super().__init__()
        self.shards = expand_shards(pattern)
        if not self.shards:
            raise InputError(
                f"no .tar shards match '{pattern}'",
                hint="give a folder of .tar files, a glob or a brace range like data/{00000..00099}.tar",
            )
        image_exts = [
            e.strip().lstrip(".").lower() for e in image_ext.replace(",", ";").split(";") if e.strip()
        ]
        if image_ext == "image":  # the HF-style default column name means "any image"
            image_exts = ["jpg", "jpeg", "png", "webp"]
        caption_ext = "txt" if caption_ext == "text" else caption_ext.lstrip(".").lower()
        self.images: list[_TarMember] = []
        for shard_index, shard in enumerate(self.shards):
            if shard.name.endswith((".tar.gz", ".tgz")):
                raise InputError(
                    f"compressed shard {shard} cannot be read by random access",
                    hint="use uncompressed .tar shards (img2dataset's default)",
                )
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                with tarfile.open(shard, "r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        directory, _, base = member.name.rpartition("/")
                        key, _, ext = base.partition(".")
                        samples.setdefault(f"{directory}/{key}", {})[ext.lower()] = member
                    for members in samples.values():
                        image = next((members[e] for e in image_exts if e in members), None)
                        if image is None:
                            self.skipped["no image"] += 1
                            continue
                        caption_member = members.get(caption_ext)
                        captions: tuple[str, ...] = ()
                        if caption_member is not None:
                            raw = tar.extractfile(caption_member).read().decode("utf-8", "replace")
                            cell = json.loads(raw).get("caption") if caption_ext == "json" else raw
                            captions = tuple(c.strip() for c in caption_list(cell))
                        if not captions:
                            self.skipped["missing caption"] += 1
                            continue
                        self.images.append(_TarMember(shard_index, image.offset_data, image.size))
                        self.captions.append(captions)
            except (tarfile.TarError, OSError) as exc:
                self.skipped["unreadable shard"] += 1
                logger.warning("skipping unreadable shard %s: %s", shard, exc)
        if not self.images:
            raise InputError(
                f"no image-caption pairs in the {len(self.shards)} shard(s) of '{pattern}'",
                hint="each sample needs an image (.jpg/.png/.webp) and a caption (.txt)",
            )
        self.pattern = pattern

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int):
        member = self.images[index]
        with open(self.shards[member.shard], "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
        return _decode_image(data, f"#{index} in {self.shards[member.shard]}")

    def identity(self) -> str:
        digest = hashlib.sha256()
        for shard in self.shards:
            stat = shard.stat()
            digest.update(f"{shard.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return f"webdataset:{digest.hexdigest()}:{len(self.images)}"


def open_source(data_config) -> ImageCaptionSource:
    """The data source that ``data_config.source`` (and ``data_config.format``) names."""
    source = data_config.source
    if not source:
        raise InputError(
            "no training data given", hint="pass --data FOLDER (image folder, HF dataset or .tar shards)"
        )
    kind = data_config.format
    path = Path(source)
    if kind == "auto":
        if path.is_dir() and any(path.glob("*.tar")) and not (path / "metadata.jsonl").exists():
            kind = "webdataset"
        elif source.endswith(".tar") or re.search(r"\{\d+\.\.\d+\}", source):
            kind = "webdataset"
        elif path.is_dir() and (
            (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
        ):
            kind = "hf"
        elif path.is_dir():
            kind = "imagefolder"
        elif not path.exists() and "/" in source and not source.startswith((".", "/")):
            kind = "hf"  # a hub name such as "lambdalabs/naruto-blip-captions"
        else:
            raise InputError(
                f"data not found: {source}",
                hint="give an image folder, a Hugging Face dataset or .tar shards",
            )
    if kind == "imagefolder":
        if not path.is_dir():
            raise InputError(f"data folder not found: {source}")
        found: ImageCaptionSource = ImageFolderSource(path, data_config.caption_column)
    elif kind == "hf":
        found = HFDatasetSource(
            source, data_config.split, data_config.image_column, data_config.caption_column
        )
    else:
        caption_ext = data_config.caption_column
        found = WebDatasetSource(source, data_config.image_column, caption_ext)
    if data_config.max_samples is not None and data_config.max_samples < len(found):
        _truncate(found, data_config.max_samples)
    if found.skipped:
        logger.warning(
            "data: skipped while listing: %s", ", ".join(f"{n} {r}" for r, n in found.skipped.items())
        )
    return found


def _truncate(source: ImageCaptionSource, n: int) -> None:
    for name in ("files", "captions", "rows", "images"):
        if hasattr(source, name):
            setattr(source, name, getattr(source, name)[:n])


# ---- transforms ---------------------------------------------------------------------------


CAPTION_CHOICES = ("random", "first")
RESIZE_CHOICES = ("bilinear", "bicubic")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation (crop offset, flip)."""
    return np.random.default_rng([seed, epoch, index, 0xA06])


def wants_flip(random_flip: bool, seed: int, epoch: int, index: int) -> bool:
    return bool(random_flip) and bool(sample_rng(seed, epoch, index).random() < 0.5)


def caption_pick(count: int, rule: str, seed: int, epoch: int, index: int) -> int:
    """Which of row ``index``'s ``count`` captions it trains with in ``epoch``.

    random: one of the row's captions, uniformly, as BK-SDM's ``random.choice`` in
    ``tokenize_captions``; drawn from its own generator seeded by (seed, epoch, row), so the
    choice does not depend on the process count, the worker count or where a run resumed, and
    the crop and flip draws stay what they are for one-caption rows. first: always the first.
    """
    if rule == "first" or count == 1:
        return 0
    return int(np.random.default_rng([seed, epoch, index, 0xCA9]).integers(count))


def choose_caption(captions: tuple[str, ...], rule: str, seed: int, epoch: int, index: int) -> str:
    return captions[caption_pick(len(captions), rule, seed, epoch, index)]


def prepare_image(
    image,
    resolution: int,
    crop: str,
    flip: bool,
    rng: np.random.Generator | None = None,
    resize: str = "bilinear",
):
    """Resize the short side to ``resolution``, crop a square, flip; -> float tensor [3, H, W] in [-1, 1].

    resize bilinear: BK-SDM's ``transforms.Resize(resolution, BILINEAR)`` + ``CenterCrop``
    (torchvision truncates the long side and rounds the centre offset; on a PIL image it calls
    PIL's antialiased bilinear resize, as here). bicubic: distilsd's earlier rule (PIL bicubic,
    long side rounded, centre offset floored), kept so that older runs resume exactly.
    """
    import torch
    from PIL import Image

    width, height = image.size
    if resize == "bilinear":
        if width <= height:
            new_size = (resolution, int(resolution * height / width))
        else:
            new_size = (int(resolution * width / height), resolution)
        resample = Image.BILINEAR
    else:
        scale = resolution / min(width, height)
        new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        resample = Image.BICUBIC
    if new_size != image.size:
        image = image.resize(new_size, resample)
    width, height = image.size
    if crop == "random" and rng is not None:
        left = int(rng.integers(0, width - resolution + 1))
        top = int(rng.integers(0, height - resolution + 1))
    elif resize == "bilinear":
        left, top = int(round((width - resolution) / 2.0)), int(round((height - resolution) / 2.0))
    else:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # [3, H, W]


# ---- order --------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


class GlobalBatchSampler:
    """Yields this process's list of ``(epoch, index)`` for global micro-batches ``start, start+1, ...``."""

    def __init__(
        self, num_samples: int, global_batch: int, rank: int, per_process: int, seed: int, start: int = 0
    ):
        if num_samples < global_batch:
            raise InputError(
                f"the data has {num_samples} usable samples, fewer than one global batch ({global_batch})",
                hint="add data or lower --batch-size / the number of processes",
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.rank = rank
        self.per_process = per_process
        self.seed = seed
        self.start = start
        # The last partial global batch of an epoch is dropped (BK-SDM's DataLoader keeps it):
        # every step then has the same batch, N processes x b stay identical to 1 x N*b, and
        # as each epoch has its own permutation, the samples left out differ every epoch.
        self.batches_per_epoch = num_samples // global_batch

    def position(self, micro_batch: int) -> tuple[int, int]:
        return divmod(micro_batch, self.batches_per_epoch)

    def __iter__(self):
        micro_batch = self.start
        epoch, permutation = -1, None
        while True:
            batch_epoch, j = self.position(micro_batch)
            if batch_epoch != epoch:
                epoch, permutation = batch_epoch, epoch_permutation(self.num_samples, self.seed, batch_epoch)
            first = j * self.global_batch + self.rank * self.per_process
            yield [(epoch, int(i)) for i in permutation[first : first + self.per_process]]
            micro_batch += 1


# ---- datasets -----------------------------------------------------------------------------


class ImageCaptionDataset:
    """Decodes and augments samples; an unreadable image is replaced by the next index."""

    def __init__(
        self,
        source: ImageCaptionSource,
        resolution: int,
        crop: str,
        random_flip: bool,
        seed: int,
        caption_choice: str = "random",
        resize: str = "bilinear",
    ):
        self.source = source
        self.resolution = resolution
        self.crop = crop
        self.random_flip = random_flip
        self.seed = seed
        self.caption_choice = caption_choice
        self.resize = resize

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        bad = 0
        for attempt in range(min(len(self.source), 64)):
            candidate = (index + attempt) % len(self.source)
            try:
                image = self.source.load_image(candidate)
            except BadSample as exc:
                logger.warning("skipping bad sample: %s", exc)
                bad += 1
                continue
            caption = choose_caption(
                self.source.captions_of(candidate), self.caption_choice, self.seed, epoch, candidate
            )
            rng = sample_rng(self.seed, epoch, candidate)
            flip = self.random_flip and bool(rng.random() < 0.5)
            pixels = prepare_image(image, self.resolution, self.crop, flip, rng, self.resize)
            return {
                "pixel_values": pixels,
                "caption": caption,
                "index": candidate,
                "bad": bad,
                "prior": candidate in self.source.prior_rows,
            }
        raise InputError(f"64 samples in a row are unreadable (from index {index}); the data looks broken")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    batch: dict[str, Any] = {
        "index": torch.tensor([s["index"] for s in samples]),
        "bad": sum(s["bad"] for s in samples),
    }
    if "pixel_values" in samples[0]:
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
        batch["captions"] = [s["caption"] for s in samples]
        batch["prior"] = torch.tensor([s["prior"] for s in samples], dtype=torch.bool)
    else:
        for key in ("latent_mean", "latent_std", "text_embeds"):
            batch[key] = torch.stack([s[key] for s in samples])
        if "caption" in samples[0]:  # cached latents, live text (the text encoder is trained)
            batch["captions"] = [s["caption"] for s in samples]
    return batch


def make_loader(dataset, sampler: GlobalBatchSampler, num_workers: int):
    import torch

    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def default_cache_root() -> Path:
    """Where latent caches live unless ``data.cache_dir`` says otherwise: ``$DISTILSD_CACHE/latents``."""
    from distilsd.models import cache_dir

    return cache_dir("latents")
