"""Single-file checkpoints: .safetensors loads (with --config offline); pickles only when allowed."""

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def single_file(tiny_pipeline_dir, tmp_path_factory):
    from distilsd.convert import convert_pipeline_to_single_file

    return convert_pipeline_to_single_file(
        tiny_pipeline_dir, tmp_path_factory.mktemp("single") / "tiny.safetensors"
    )


def test_single_file_gives_the_folders_image(single_file, tiny_pipeline_dir, tmp_path, run_cli):
    common = ["generate", "a red circle", "--steps", "2", "--seed", "4", "--json", "-q"]
    code, out, err = run_cli(
        common
        + ["--model", str(single_file), "--config", str(tiny_pipeline_dir), "-o", str(tmp_path / "file")]
    )
    assert code == 0, err
    from_file = json.loads(out)["images"][0]
    assert from_file["model"] == "tiny"
    code, out, err = run_cli(common + ["--model", str(tiny_pipeline_dir), "-o", str(tmp_path / "folder")])
    from_folder = json.loads(out)["images"][0]
    a = np.asarray(Image.open(from_file["path"]), dtype=np.int16)
    b = np.asarray(Image.open(from_folder["path"]), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_pickled_checkpoint_needs_allow_pickle(single_file, tiny_pipeline_dir, tmp_path, run_cli):
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(single_file)}, ckpt)
    args = [
        "generate",
        "x",
        "--model",
        str(ckpt),
        "--config",
        str(tiny_pipeline_dir),
        "--steps",
        "1",
        "-o",
        str(tmp_path / "o"),
        "-q",
    ]
    code, _, err = run_cli(args)
    assert code != 0 and "pickled checkpoint" in err and "Traceback" not in err
    code, out, err = run_cli(args + ["--allow-pickle"])
    assert code == 0, err
    assert out.strip().endswith(".png")
