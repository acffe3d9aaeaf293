"""Stand-in networks for the metrics: the real architectures (or tiny ones of the same kind)
with random weights, saved where the real weight files would be given.

The real Inception and CLIP weights are not on test machines; the code that loads and runs
them is the same for these files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest


def random_fid_inception_state_dict(seed: int = 0) -> dict:
    """pytorch-fid's FID Inception v3 (torchvision's Inception with FID blocks), random weights.

    torch-fidelity's Inception has the same tensor names, so one file serves FID and IS.
    """
    import torch
    import torchvision
    from pytorch_fid import inception as pfi

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, weights=None, init_weights=False
    )
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    # Calibrate the batch-norm statistics on a few random images, so that activations keep
    # their scale through the depth and different images give clearly different features.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299) * 2 - 1)
    return net.state_dict()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_fid_inception_state_dict(), path)
    return path


TINY_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {},
}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """An open_clip ``local-dir:`` model folder: a tiny ViT CLIP config and random weights."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    return folder


def write_images(folder, count: int, size: int = 64, seed: int = 0, captions: list[str] | None = None):
    """``count`` random-noise PNGs named 000..., with the caption in the PNG parameters chunk."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        info = PngInfo()
        caption = captions[index] if captions else f"a photo number {index}"
        info.add_text("parameters", f"{caption}\nSteps: 2, Seed: {index}")
        Image.fromarray(pixels).save(folder / f"{index:03d}.png", pnginfo=info)
    return folder
