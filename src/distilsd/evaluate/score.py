"""Scoring a folder of generated images: FID, IS and CLIP score (``distilsd eval score``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distilsd.errors import InputError, MissingDependencyError, ModelLoadError
from distilsd.evaluate import metrics
from distilsd.evaluate.metrics import ImageSet

METRICS = ("fid", "is", "clip")


def captions_for(images: ImageSet, prompts: str | Path | None) -> list[str]:
    """The caption of every image: from a caption file (by image name) or the image's own parameters."""
    from distilsd.generate import parse_a1111_parameters
    from distilsd.generate.metadata import read_image_parameters

    by_name: dict[str, str] = {}
    if prompts is not None:
        from distilsd.evaluate.prompts import read_caption_file

        by_name = {spec.name: spec.prompt for spec in read_caption_file(prompts)}
    captions = []
    for path in images.paths:
        if prompts is not None:
            caption = by_name.get(path.stem)
        else:
            parameters = read_image_parameters(path)
            caption = parse_a1111_parameters(parameters)["prompt"] if parameters else None
        if not caption:
            where = f"the caption file {prompts}" if prompts is not None else "its embedded parameters"
            raise InputError(
                f"no caption for {path.name} in {where}",
                hint="give --prompts with the caption file the images were made from",
            )
        captions.append(caption)
    return captions


def check_scoring_inputs(
    metrics_to_compute: Sequence[str],
    reference: str | Path | None,
    *,
    size: int = metrics.PROTOCOL_IMAGE_SIZE,
    fid_dims: int = metrics.FID_FEATURE_DIMS,
    inception_weights: str | Path | None = None,
    clip_model: str = metrics.DEFAULT_CLIP_MODEL,
    clip_pretrained: str = metrics.DEFAULT_CLIP_PRETRAINED,
    clip_weights: str | Path | None = None,
    **_: Any,
) -> None:
    """What scoring will need, checked before images are made (``eval sweep``): the reference,
    the metric packages and their weight files. Reads no network weights."""
    unknown = [name for name in metrics_to_compute if name not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {', '.join(unknown)}", hint="choose from " + ", ".join(METRICS))
    if "fid" in metrics_to_compute or "is" in metrics_to_compute:
        try:
            import pytorch_fid  # noqa: F401
        except ImportError:
            raise MissingDependencyError("pytorch-fid", "eval", "FID") from None
        path = (
            Path(inception_weights)
            if inception_weights
            else metrics.torch_hub_checkpoint(Path(metrics.PYTORCH_FID_WEIGHTS_URL).name)
        )
        if not path.is_file():
            raise ModelLoadError(
                f"the FID Inception (pytorch-fid) weights are not on this machine: expected the file {path.name} in {path.parent}",
                hint=f"download {metrics.PYTORCH_FID_WEIGHTS_URL} into {path.parent}, or give --inception-weights PATH",
            )
    if "fid" in metrics_to_compute:
        if reference is None:
            raise InputError(
                "FID needs --reference (an image folder or a pytorch-fid .npz)",
                hint="or leave fid out of --metrics",
            )
        if Path(reference).suffix.lower() == ".npz":
            metrics.load_statistics(reference, expected_dims=fid_dims)
        elif len(metrics.list_images(reference, "the --reference folder")) < 2:
            raise InputError(f"FID needs at least 2 reference images, but {reference} has fewer")
    if "clip" in metrics_to_compute:
        try:
            import open_clip  # noqa: F401
        except ImportError:
            raise MissingDependencyError("open_clip_torch", "eval", "CLIP score") from None
        if clip_model.startswith("local-dir:"):
            folder = Path(clip_model.removeprefix("local-dir:"))
            if not (folder / "open_clip_config.json").is_file():
                raise ModelLoadError(f"{folder} has no open_clip_config.json")
        elif clip_weights is not None:
            if not Path(clip_weights).is_file():
                raise ModelLoadError(f"the CLIP weight file {clip_weights} does not exist")
        else:
            metrics._clip_weights_in_cache(clip_model, clip_pretrained)


def score_images(
    images_dir: str | Path,
    *,
    reference: str | Path | None = None,
    metrics_to_compute: Sequence[str] = METRICS,
    prompts: str | Path | None = None,
    size: int = metrics.PROTOCOL_IMAGE_SIZE,
    inception_weights: str | Path | None = None,
    clip_model: str = metrics.DEFAULT_CLIP_MODEL,
    clip_pretrained: str = metrics.DEFAULT_CLIP_PRETRAINED,
    clip_weights: str | Path | None = None,
    clip_x100: bool = False,
    is_splits: int = 10,
    fid_dims: int = metrics.FID_FEATURE_DIMS,
    family: str | None = None,
    save_reference_stats: str | Path | None = None,
    batch_size: int = 50,
    device: str = "auto",
) -> dict[str, Any]:
    """Score the images in ``images_dir``; return the numbers and notes on what was done.

    Every image (generated and reference) is brought to ``size`` x ``size`` first, as BK-SDM
    scores 256 px copies; the result says how many had to be resized. ``reference`` (for FID)
    is an image folder or pytorch-fid ``.npz`` statistics.
    """
    from distilsd.models import resolve_device

    if fid_dims not in metrics.FID_DIMS_CHOICES:
        raise InputError(
            f"--fid-dims {fid_dims} is not one of " + ", ".join(map(str, metrics.FID_DIMS_CHOICES))
        )
    unknown = [name for name in metrics_to_compute if name not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {', '.join(unknown)}", hint="choose from " + ", ".join(METRICS))
    if size < 16:
        raise InputError(
            f"--size {size} is too small", hint=f"the protocol uses {metrics.PROTOCOL_IMAGE_SIZE}"
        )

    # Check every input before loading any network.
    generated = ImageSet.from_folder(images_dir, size, "the --images folder")
    if not generated.paths:
        raise InputError(
            f"the --images folder {images_dir} has no images",
            hint="expected " + ", ".join(metrics.IMAGE_SUFFIXES),
        )
    reference_set: ImageSet | None = None
    reference_stats = None
    if "fid" in metrics_to_compute:
        if reference is None:
            raise InputError(
                "FID needs --reference (an image folder or a pytorch-fid .npz)",
                hint="or leave fid out of --metrics",
            )
        if len(generated.paths) < 2:
            raise InputError(f"FID needs at least 2 images, but {images_dir} has {len(generated.paths)}")
        if Path(reference).suffix.lower() == ".npz":
            reference_stats = metrics.load_statistics(reference, expected_dims=fid_dims)
        else:
            reference_set = ImageSet.from_folder(reference, size, "the --reference folder")
            if len(reference_set.paths) < 2:
                raise InputError(
                    f"FID needs at least 2 reference images, but {reference} has {len(reference_set.paths)}"
                )
    if save_reference_stats is not None and reference_set is None:
        raise InputError("--save-reference-stats needs --reference to be an image folder")
    captions = captions_for(generated, prompts) if "clip" in metrics_to_compute else None
    scorer = metrics.extra_scorer(family) if family else None
    torch_device = resolve_device(device)

    results: dict[str, Any] = {"num_images": len(generated.paths), "image_size": size}
    notes: list[str] = []
    resized = {"images": generated.resized, "reference": reference_set.resized if reference_set else 0}
    if resized["images"] or resized["reference"]:
        notes.append(
            f"resized {resized['images']} generated and {resized['reference']} reference images to {size}x{size} "
            f"(PIL bicubic; the BK-SDM protocol scores {metrics.PROTOCOL_IMAGE_SIZE} px images)"
        )
    results["resized"] = resized

    if "fid" in metrics_to_compute:
        inception = metrics.load_fid_inception(inception_weights, torch_device, dims=fid_dims)
        mu, sigma = metrics.feature_statistics(
            metrics.inception_features(generated, inception, batch_size, torch_device)
        )
        if reference_set is not None:
            reference_stats = metrics.feature_statistics(
                metrics.inception_features(reference_set, inception, batch_size, torch_device)
            )
            results["num_reference_images"] = len(reference_set.paths)
            if save_reference_stats is not None:
                metrics.save_statistics(save_reference_stats, *reference_stats)
                notes.append(f"saved the reference statistics to {save_reference_stats}")
        del inception
        results["fid"] = metrics.frechet_distance(mu, sigma, *reference_stats)
        results["fid_dims"] = fid_dims
        if fid_dims != metrics.FID_FEATURE_DIMS:
            notes.append(
                f"FID on {fid_dims}-dim features of an early Inception block: not comparable with published (pool3, 2048-dim) FIDs"
            )
        if len(generated.paths) < fid_dims:
            notes.append(
                f"FID from {len(generated.paths)} images (fewer than {fid_dims} features) is biased high; compare only runs of equal size"
            )

    if "is" in metrics_to_compute:
        # A split of one image always scores exactly 1: keep at least 2 images per split.
        splits = max(1, min(is_splits, len(generated.paths) // 2))
        if splits < is_splits:
            notes.append(f"IS over {splits} split(s) instead of {is_splits}: too few images for 2 per split")
        inception = metrics.load_is_inception(inception_weights, torch_device)
        mean, std = metrics.inception_score(
            metrics.inception_logits(generated, inception, batch_size, torch_device), splits=splits
        )
        del inception
        results.update(inception_score=mean, inception_score_std=std, is_splits=splits)

    if "clip" in metrics_to_compute:
        clip = metrics.load_clip_scorer(clip_model, clip_pretrained, clip_weights, torch_device)
        cosines = clip.cosines(generated, captions)
        # BK-SDM reports the mean raw cosine; torchmetrics' CLIPScore is mean(100 * max(cos, 0)).
        value = float((100.0 * cosines.clip(min=0)).mean()) if clip_x100 else float(cosines.mean())
        results.update(
            clip_score=value,
            clip_convention="100*max(cos,0)" if clip_x100 else "raw cosine",
            clip_model=clip.description,
        )

    if scorer is not None:
        results["extra"] = scorer(generated.paths, captions or [])
        results["family"] = family
    results["notes"] = notes
    return results
