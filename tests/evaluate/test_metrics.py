"""FID math, statistics files, and the Inception / IS / CLIP code paths on stand-in networks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from distilsd.errors import InputError, ModelLoadError
from distilsd.evaluate import metrics

from .conftest import write_images


def fixed_features(seed: int, n: int = 300, d: int = 24, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def fid_by_eigenvalues(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID computed another way: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix."""
    mu1, mu2 = features1.mean(0), features2.mean(0)
    s1, s2 = np.cov(features1.T), np.cov(features2.T)
    w, v = linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = linalg.eigvalsh(s1_half @ s2 @ s1_half)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_fid_of_a_set_with_itself_is_zero():
    features = fixed_features(0)
    assert abs(metrics.fid_from_features(features, features)) < 1e-8


def test_fid_grows_as_features_are_perturbed():
    features = fixed_features(0)
    noise = np.random.default_rng(1).normal(size=features.shape)
    values = [
        metrics.fid_from_features(features, features + scale * noise) for scale in (0.05, 0.2, 0.5, 1.0, 2.0)
    ]
    assert values[0] > 1e-4
    assert all(values[i] < values[i + 1] for i in range(len(values) - 1)), values


def test_fid_matches_an_independent_scipy_computation():
    a, b = fixed_features(2), fixed_features(3, shift=0.3)
    expected = fid_by_eigenvalues(a, b)
    assert expected > 1.0
    assert metrics.fid_from_features(a, b) == pytest.approx(expected, abs=1e-6)


def test_fid_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = fixed_features(4), fixed_features(5, shift=-0.2)
    stats_a, stats_b = metrics.feature_statistics(a), metrics.feature_statistics(b)
    assert metrics.frechet_distance(*stats_a, *stats_b) == pytest.approx(
        calculate_frechet_distance(*stats_a, *stats_b), abs=1e-9
    )


def test_fid_needs_two_samples_and_equal_sizes():
    with pytest.raises(InputError, match="at least 2"):
        metrics.feature_statistics(np.zeros((1, 8)))
    with pytest.raises(InputError, match="different sizes"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_statistics_round_trip_and_wrong_feature_size(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4)
    path = metrics.save_statistics(tmp_path / "ref.npz", mu, sigma)
    loaded_mu, loaded_sigma = metrics.load_statistics(path, expected_dims=4)
    assert np.array_equal(loaded_mu, mu) and np.array_equal(loaded_sigma, sigma)
    with pytest.raises(InputError, match="4-dim features"):
        metrics.load_statistics(path)  # 2048 expected


def test_inception_score_matches_its_definition():
    import torch

    logits = torch.from_numpy(fixed_features(6, n=40, d=10))
    mean, std = metrics.inception_score(logits, splits=1)
    p = torch.softmax(logits.double(), dim=1)
    expected = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()).item()
    assert mean == pytest.approx(expected, rel=1e-12) and std == 0.0


def test_missing_inception_weights_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(ModelLoadError) as info:
        metrics.load_fid_inception()
    message = str(info.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in message
    with pytest.raises(ModelLoadError, match="weights-inception-2015-12-05-6726825d.pth"):
        metrics.load_is_inception()


def test_missing_clip_weights_name_the_file_and_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelLoadError) as info:
        metrics.load_clip_scorer("ViT-g-14", "laion2b_s34b_b88k")
    message = str(info.value)
    assert "open_clip_model.safetensors" in message and "laion/CLIP-ViT-g-14-laion2B-s34B-b88K" in message
    assert str(tmp_path / "hf-cache") in message


def test_inception_features_and_logits_on_random_weights(tmp_path, inception_weights):
    images = metrics.ImageSet.from_folder(write_images(tmp_path / "a", 3, size=48), size=64)
    assert images.resized == 3
    fid_net = metrics.load_fid_inception(inception_weights)
    features = metrics.inception_features(images, fid_net, batch_size=2)
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    assert features.std(axis=0).max() > 0  # different images give different features
    is_net = metrics.load_is_inception(inception_weights)
    logits = metrics.inception_logits(images, is_net, batch_size=2)
    assert tuple(logits.shape) == (3, 1008) and bool(logits.isfinite().all())


def test_clip_cosines_on_a_tiny_stand_in(tmp_path, tiny_clip_dir):
    import torch
    from PIL import Image

    scorer = metrics.load_clip_scorer(f"local-dir:{tiny_clip_dir}")
    images = metrics.ImageSet.from_folder(write_images(tmp_path / "c", 3, size=32), size=32)
    captions = ["a red circle", "a blue square", "a green triangle"]
    cosines = scorer.cosines(images, captions, batch_size=2)
    assert cosines.shape == (3,) and np.all(np.abs(cosines) <= 1 + 1e-6)
    # The same number computed directly for the last image.
    with torch.inference_mode():
        image = scorer.preprocess(Image.open(images.paths[2]).convert("RGB"))[None]
        image_features = scorer.model.encode_image(image)
        text_features = scorer.model.encode_text(scorer.tokenizer([captions[2]]))
        expected = torch.nn.functional.cosine_similarity(image_features, text_features).item()
    assert cosines[2] == pytest.approx(expected, abs=1e-5)


def test_extra_scorer_registry(monkeypatch):
    with pytest.raises(InputError, match="no extra metrics for the model family 'bogus'") as info:
        metrics.extra_scorer("bogus")
    assert "shapes" in info.value.hint
    monkeypatch.setitem(metrics.EXTRA_SCORERS, "toy", lambda paths, captions: {"count": float(len(paths))})
    assert metrics.extra_scorer("toy")([1, 2], ["a", "b"]) == {"count": 2.0}


def test_shapes_family_scores_alignment(tmp_path):
    """--family shapes: renders of the captions' scenes align; a non-Shapes caption is left out."""
    import random

    from distilsd.shapes.world import render, sample_scene

    scenes = [sample_scene(random.Random(i), 1 + i % 2) for i in range(6)]
    paths = []
    for i, scene in enumerate(scenes):
        paths.append(tmp_path / f"{i}.png")
        render(scene).save(paths[-1])
    render(scenes[0]).save(tmp_path / "other.png")
    scores = metrics.extra_scorer("shapes")(
        [*paths, tmp_path / "other.png"], [s.caption for s in scenes] + ["a photo of a cat"]
    )
    assert scores["shapes_prompts"] == 6 and scores["shapes_unparsed"] == 1
    assert scores["shapes_alignment"] == 1.0
    assert scores["shapes_alignment_single"] == 1.0 and scores["shapes_alignment_two"] == 1.0
    # A render of another scene does not match the caption.
    render(scenes[1]).save(paths[0])
    assert metrics.extra_scorer("shapes")(paths[:1], [scenes[0].caption])["shapes_alignment"] == 0.0


def test_inception_weights_are_read_from_torch_hubs_cache(tmp_path, monkeypatch, inception_weights):
    import shutil

    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth"):
        shutil.copy(inception_weights, checkpoints / name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    fid_net = metrics.load_fid_inception(dims=64)
    is_net = metrics.load_is_inception()
    assert len(fid_net.blocks) == 1  # cut after the first block for 64-dim features
    assert type(is_net).__name__ == "FeatureExtractorInceptionV3"
