"""Image-quality metrics of the BK-SDM protocol: FID, Inception Score and CLIP score.

- FID is a pure function of two feature sets (:func:`frechet_distance`, pytorch-fid's
  formula); features are Inception pool3 activations from pytorch-fid's own network, so
  numbers and ``.npz`` statistics are interchangeable with ``python -m pytorch_fid``.
- IS comes from torch-fidelity (its Inception network and its split/shuffle convention).
- CLIP score uses open_clip: BK-SDM's raw cosine by default, or the 100 * max(cos, 0)
  convention of torchmetrics' ``CLIPScore``.

Weights are read from the libraries' usual caches (nothing is downloaded behind the user's
back) or from a path given explicitly; a missing file is reported by name and location.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distilsd.errors import InputError, MissingDependencyError, ModelLoadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FID_FEATURE_DIMS = 2048  # Inception pool3
FID_DIMS_CHOICES = (
    64,
    192,
    768,
    2048,
)  # pytorch-fid's --dims: earlier Inception blocks, for quick checks only
PROTOCOL_IMAGE_SIZE = 256  # BK-SDM scores 256 px copies of the 512 px images

# The files each library looks for in torch.hub's cache (``<torch hub dir>/checkpoints``).
PYTORCH_FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

DEFAULT_CLIP_MODEL = "ViT-g-14"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"


# --------------------------------------------------------------------------- FID math


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, features in columns) of an ``[N, D]`` feature set."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise InputError(f"features must be an [N, D] array, got shape {features.shape}")
    if features.shape[0] < 2:
        raise InputError(
            f"FID needs at least 2 images per set, got {features.shape[0]}",
            hint="a covariance needs 2 or more samples",
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)). When the product is
    singular, ``eps`` is added to both diagonals; a small imaginary part left by ``sqrtm`` is
    dropped, a large one is an error (as in pytorch-fid).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(
            f"the two feature sets have different sizes ({mu1.shape[0]} and {mu2.shape[0]} features)"
        )

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # A singular product (fewer images than features) is expected; the eps fallback handles it.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm left an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two ``[N, D]`` feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def load_statistics(path: str | Path, expected_dims: int = FID_FEATURE_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """Read precomputed ``mu``/``sigma`` (pytorch-fid's ``--save-stats`` ``.npz``)."""
    path = Path(path)
    try:
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise InputError(
                    f"{path} has no 'mu' and 'sigma' arrays",
                    hint="make it with pytorch-fid --save-stats or --save-reference-stats",
                )
            mu, sigma = data["mu"], data["sigma"]
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the statistics file {path}: {exc}") from None
    if mu.shape != (expected_dims,) or sigma.shape != (expected_dims, expected_dims):
        raise InputError(
            f"{path} holds statistics of {mu.shape[-1] if mu.ndim else 0}-dim features (sigma {sigma.shape}), but FID uses {expected_dims}-dim Inception pool3 features",
            hint="compute the reference statistics with pytorch-fid's default --dims 2048",
        )
    return mu, sigma


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return path


# --------------------------------------------------------------------------- images


def list_images(folder: str | Path, what: str = "image folder") -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} {folder} does not exist or is not a folder")
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


@dataclass
class ImageSet:
    """Images to score, all brought to ``size`` x ``size`` (BK-SDM resizes to 256 px)."""

    paths: list[Path]
    size: int
    resized: int = 0  # how many were not size x size and were resized (PIL bicubic)

    @classmethod
    def from_folder(cls, folder: str | Path, size: int, what: str = "image folder") -> ImageSet:
        from PIL import Image

        paths = list_images(folder, what)
        resized = 0
        for path in paths:
            with Image.open(path) as image:
                resized += image.size != (size, size)
        return cls(paths, size, resized)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """``[B, H, W, 3]`` uint8 arrays, resized to ``size`` when needed."""
        from PIL import Image

        for start in range(0, len(self.paths), batch_size):
            arrays = []
            for path in self.paths[start : start + batch_size]:
                with Image.open(path) as image:
                    image = image.convert("RGB")
                    if image.size != (self.size, self.size):
                        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
                    arrays.append(np.asarray(image))
            yield np.stack(arrays)


# --------------------------------------------------------------------------- Inception


def torch_hub_checkpoint(filename: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _load_plain_state_dict(path: Path, what: str, url: str, flag: str) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise ModelLoadError(
            f"the {what} weights are not on this machine: expected the file {path.name} in {path.parent}",
            hint=f"download {url} into {path.parent}, or give {flag} PATH",
        )
    try:
        # weights_only: a weight file must not be able to run code when loaded.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read {path} as a PyTorch state dict: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if not isinstance(state_dict, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return state_dict


@contextlib.contextmanager
def _serving_weights(module: Any, state_dict: dict[str, Any]) -> Iterator[None]:
    """Make ``module.load_state_dict_from_url`` return ``state_dict``.

    pytorch-fid and torch-fidelity build their Inception networks and fetch the weights in
    one constructor; this lets us hand them a file we loaded (safely) ourselves, while the
    network code that defines the features stays theirs.
    """
    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


def load_fid_inception(
    weights_path: str | Path | None = None, device: Any = "cpu", dims: int = FID_FEATURE_DIMS
):
    """pytorch-fid's FID Inception v3, cut after the block that gives ``dims`` features (pool3: 2048)."""
    try:
        from pytorch_fid import inception as pytorch_fid_inception
    except ImportError:
        raise MissingDependencyError("pytorch-fid", "eval", "FID") from None

    path = Path(weights_path) if weights_path else torch_hub_checkpoint(Path(PYTORCH_FID_WEIGHTS_URL).name)
    state_dict = _load_plain_state_dict(
        path, "FID Inception (pytorch-fid)", PYTORCH_FID_WEIGHTS_URL, "--inception-weights"
    )
    try:
        with _serving_weights(pytorch_fid_inception, state_dict):
            model = pytorch_fid_inception.InceptionV3(
                [pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]
            )
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{path} is not the FID Inception network's state dict: {str(exc).splitlines()[0][:200]}"
        ) from None
    return model.to(device).eval()


def load_is_inception(weights_path: str | Path | None = None, device: Any = "cpu"):
    """torch-fidelity's Inception v3 (the TF-ported network), returning unbiased logits for IS."""
    try:
        from torch_fidelity import feature_extractor_inceptionv3
    except ImportError:
        raise MissingDependencyError("torch-fidelity", "eval", "the Inception Score") from None

    path = Path(weights_path) if weights_path else torch_hub_checkpoint(Path(TORCH_FIDELITY_WEIGHTS_URL).name)
    state_dict = _load_plain_state_dict(
        path, "Inception Score (torch-fidelity)", TORCH_FIDELITY_WEIGHTS_URL, "--inception-weights"
    )
    try:
        with _serving_weights(feature_extractor_inceptionv3, state_dict):
            model = feature_extractor_inceptionv3.FeatureExtractorInceptionV3(
                "inception-v3-compat", ["logits_unbiased"]
            )
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{path} is not torch-fidelity's Inception state dict: {str(exc).splitlines()[0][:200]}"
        ) from None
    return model.to(device)


def inception_features(images: ImageSet, model: Any, batch_size: int = 50, device: Any = "cpu") -> np.ndarray:
    """``[N, D]`` features (pool3: D = 2048), with pytorch-fid's input convention (RGB in [0, 1])."""
    import torch
    import torch.nn.functional as F

    features = []
    with torch.inference_mode():
        for batch in images.batches(batch_size):
            pixels = (
                torch.from_numpy(batch).permute(0, 3, 1, 2).to(device, torch.float32) / 255.0
            )  # [B, 3, H, W]
            pooled = model(pixels)[0]  # [B, D, h, w]; h = w = 1 for pool3
            if pooled.shape[2:] != (1, 1):  # earlier blocks: spatially averaged, as pytorch-fid does
                pooled = F.adaptive_avg_pool2d(pooled, output_size=(1, 1))
            features.append(pooled.squeeze(-1).squeeze(-1).cpu().double().numpy())
    return np.concatenate(features)


def inception_logits(images: ImageSet, model: Any, batch_size: int = 50, device: Any = "cpu"):
    """``[N, 1008]`` unbiased Inception logits (torch-fidelity takes uint8 images)."""
    import torch

    logits = []
    with torch.inference_mode():
        for batch in images.batches(batch_size):
            pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)  # [B, 3, H, W] uint8
            logits.append(model(pixels)[0].cpu())
    return torch.cat(logits)


def inception_score(
    logits, splits: int = 10, shuffle: bool = True, rng_seed: int = 2020
) -> tuple[float, float]:
    """Mean and std of IS over ``splits`` (torch-fidelity's function and defaults)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    result = isc_features_to_metric(logits, splits=splits, shuffle=shuffle, rng_seed=rng_seed)
    return result[KEY_METRIC_ISC_MEAN], result[KEY_METRIC_ISC_STD]


# --------------------------------------------------------------------------- CLIP score


def _clip_weights_in_cache(model_name: str, pretrained: str) -> tuple[str, dict[str, Any]]:
    """The cached weight file open_clip would use for ``model_name`` / ``pretrained``, and the tag's config."""
    import open_clip
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import try_to_load_from_cache

    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        if Path(pretrained).is_file():
            return pretrained, {}
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if model_name not in open_clip.list_models():
            raise InputError(
                f"unknown open_clip model '{model_name}'",
                hint="see open_clip.list_models(), or use local-dir:PATH",
            )
        raise InputError(
            f"'{pretrained}' is neither a pretrained tag of {model_name} nor a file",
            hint="tags: " + ", ".join(tags),
        )
    if tag_cfg.get("hf_hub"):
        # open_clip's convention: 'org/repo/' (default file names) or 'org/repo/filename'.
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            cached = try_to_load_from_cache(repo_id, name)
            if isinstance(cached, str):
                return cached, tag_cfg
        raise ModelLoadError(
            f"the CLIP weights {model_name}/{pretrained} are not on this machine: expected {names[-1] if filename else names[0]} "
            f"of the hub repo {repo_id} in the Hugging Face cache {hf_constants.HF_HUB_CACHE}",
            hint=f"download it with: hf download {repo_id} {names[0]}, or give --clip-weights PATH",
        )
    url = tag_cfg.get("url", "")
    cached_path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if url and cached_path.is_file():
        return str(cached_path), tag_cfg
    raise ModelLoadError(
        f"the CLIP weights {model_name}/{pretrained} are not on this machine: expected {cached_path.name} in {cached_path.parent}",
        hint=f"download {url} there, or give --clip-weights PATH",
    )


@dataclass
class ClipScorer:
    model: Any
    preprocess: Callable
    tokenizer: Callable
    device: Any
    description: str

    def cosines(self, images: ImageSet, captions: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Cosine similarity of each image with its caption, ``[N]``."""
        import torch
        from PIL import Image

        values = []
        with torch.inference_mode():
            for start, batch in zip(
                range(0, len(images.paths), batch_size), images.batches(batch_size), strict=True
            ):
                pixels = torch.stack([self.preprocess(Image.fromarray(array)) for array in batch]).to(
                    self.device
                )
                tokens = self.tokenizer(list(captions[start : start + len(batch)])).to(self.device)
                image_features = self.model.encode_image(pixels).float()
                text_features = self.model.encode_text(tokens).float()
                image_features = image_features / image_features.norm(dim=-1, keepdim=True)
                text_features = text_features / text_features.norm(dim=-1, keepdim=True)
                values.append((image_features * text_features).sum(dim=-1).cpu().double().numpy())
        return np.concatenate(values)


def load_clip_scorer(
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: str = DEFAULT_CLIP_PRETRAINED,
    weights_path: str | Path | None = None,
    device: Any = "cpu",
) -> ClipScorer:
    """An open_clip model for CLIP score.

    ``model_name`` is an open_clip model name (``ViT-g-14``) or ``local-dir:FOLDER`` (a folder
    with ``open_clip_config.json`` and weights); ``pretrained`` a tag of that model whose
    weights must be in the Hugging Face cache; ``weights_path`` overrides where the weights
    are read from (the tag still sets the preprocessing).
    """
    try:
        import open_clip
    except ImportError:
        raise MissingDependencyError("open_clip_torch", "eval", "CLIP score") from None

    kwargs: dict[str, Any] = {}
    if model_name.startswith("local-dir:"):
        folder = Path(model_name.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            raise ModelLoadError(
                f"{folder} has no open_clip_config.json",
                hint="a local-dir: CLIP model is a folder with open_clip_config.json and its weights",
            )
        if (
            weights_path is None
            and not any(folder.glob("*.safetensors"))
            and not any(folder.glob("*.bin"))
            and not any(folder.glob("*.pth"))
        ):
            raise ModelLoadError(
                f"{folder} has no weight file",
                hint="put open_clip_model.safetensors next to its open_clip_config.json",
            )
        description = model_name
        if weights_path is not None:
            raise InputError(
                "--clip-weights cannot be combined with a local-dir: model",
                hint="put the weights into the folder",
            )
    else:
        if model_name.startswith("hf-hub:"):
            raise InputError(
                "hf-hub: CLIP models are not supported offline",
                hint="download the repo and use local-dir:FOLDER",
            )
        if weights_path is not None:
            if not Path(weights_path).is_file():
                raise ModelLoadError(f"the CLIP weight file {weights_path} does not exist")
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
            kwargs["pretrained"] = str(weights_path)
        else:
            cached, tag_cfg = _clip_weights_in_cache(model_name, pretrained)
            kwargs["pretrained"] = cached
        # Loading from a file skips the tag's preprocessing settings: pass them explicitly.
        for key, argument in (
            ("mean", "image_mean"),
            ("std", "image_std"),
            ("interpolation", "image_interpolation"),
            ("resize_mode", "image_resize_mode"),
        ):
            if tag_cfg.get(key) is not None:
                kwargs[argument] = tag_cfg[key]
        if tag_cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
        description = f"{model_name}/{pretrained}"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device, **kwargs)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"open_clip could not build {description}: {str(exc).splitlines()[0][:300]}"
        ) from None
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipScorer(model.eval(), preprocess, tokenizer, device, description)


# --------------------------------------------------------------------------- extra scorers

# Extra metrics for a model family, keyed by family name: a function of (image paths, captions)
# returning {metric name: value}.
ExtraScorer = Callable[[Sequence[Path], Sequence[str]], dict[str, float]]


def _shapes_scorer(image_paths: Sequence[Path], captions: Sequence[str]) -> dict[str, float]:
    from distilsd.shapes.evaluate import alignment_scores

    return alignment_scores(image_paths, captions)


EXTRA_SCORERS: dict[str, ExtraScorer] = {"shapes": _shapes_scorer}


def register_scorer(family: str, scorer: ExtraScorer) -> None:
    """Add the extra metrics of a model family (``distilsd eval score --family NAME``)."""
    EXTRA_SCORERS[family] = scorer


def extra_scorer(family: str) -> ExtraScorer:
    if family not in EXTRA_SCORERS:
        known = ", ".join(sorted(EXTRA_SCORERS)) or "none registered yet"
        raise InputError(f"no extra metrics for the model family '{family}'", hint=f"families: {known}")
    return EXTRA_SCORERS[family]
