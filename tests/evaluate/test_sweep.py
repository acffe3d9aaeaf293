"""``distilsd eval sweep`` on the tiny pipeline with stand-in scoring networks."""

from __future__ import annotations

import json

from .conftest import write_images
from .test_cli_eval import CAPTIONS, expect_error, run_cli, write_metadata_csv


def test_sweep_bad_guidance_and_model(tmp_path, capsys):
    captions = write_metadata_csv(tmp_path / "metadata.csv", CAPTIONS)
    common = ["eval", "sweep", "-p", str(captions), "-r", str(tmp_path), "-o", str(tmp_path / "out")]
    expect_error([*common, "-m", "x", "-g", "1.5,high"], capsys, "--guidance takes comma-separated numbers")
    expect_error([*common, "-m", "x+", "--no-plot"], capsys, "PIPELINE or PIPELINE::UNET")


def test_sweep_writes_a_table_a_record_and_a_plot(
    tiny_pipeline_dir, tmp_path, capsys, inception_weights, tiny_clip_dir
):
    captions = write_metadata_csv(tmp_path / "metadata.csv", CAPTIONS)
    reference = write_images(tmp_path / "reference", 3, size=32, seed=5)
    out = tmp_path / "sweep"
    args = [
        "eval", "sweep", "-m", str(tiny_pipeline_dir), "-p", str(captions), "-r", str(reference), "-o", str(out),
        "-g", "1.5,7.5", "--steps", "2", "--size", "64", "--copy-size", "32", "--score-size", "32", "--device", "cpu", "-q",
        "--fid-dims", "64", "--inception-weights", str(inception_weights), "--clip-model", f"local-dir:{tiny_clip_dir}",
    ]  # fmt: skip
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[0] == "| model | guidance | FID | CLIP |" and len(lines) == 4
    record = json.loads((out / "sweep.json").read_text())
    rows = record["results"]["rows"]
    assert [row["guidance_scale"] for row in rows] == [1.5, 7.5]
    assert all(row["fid"] > 0 and -1 <= row["clip_score"] <= 1 and row["num_images"] == 3 for row in rows)
    assert rows[0]["fid"] != rows[1]["fid"]  # different guidance, different images
    assert (out / "reference-stats.npz").exists() and (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "pipeline" / "g1.5" / "im32").glob("*.jpg"))) == 3


def test_sweep_checks_every_input_before_the_first_image(
    tiny_pipeline_dir, tmp_path, capsys, inception_weights, tiny_clip_dir, monkeypatch
):
    from distilsd.evaluate import sweep

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started before the inputs were checked")

    monkeypatch.setattr(sweep, "generate_eval_images", no_generation)
    captions = write_metadata_csv(tmp_path / "metadata.csv", CAPTIONS)
    reference = write_images(tmp_path / "reference", 3, size=32, seed=5)
    out = tmp_path / "sweep"
    base = ["eval", "sweep", "-m", str(tiny_pipeline_dir), "-p", str(captions), "-o", str(out), "--no-plot",
            "--fid-dims", "64", "--clip-model", f"local-dir:{tiny_clip_dir}"]  # fmt: skip
    weights = ["--inception-weights", str(inception_weights)]
    for args, fragment in (
        ([*base, *weights, "-r", str(tmp_path / "stats.npz")], f"cannot read the statistics file {tmp_path / 'stats.npz'}"),
        ([*base, *weights, "-r", str(tmp_path / "nowhere")], f"the --reference folder {tmp_path / 'nowhere'} does not exist"),
        ([*base, "-r", str(reference), "--inception-weights", str(tmp_path / "w.pth")], "expected the file w.pth"),
        ([*base, *weights, "-r", str(reference), "-m", "/nonexistent"], "model '/nonexistent' does not exist"),
        ([*base, *weights, "-r", str(reference), "--clip-model", f"local-dir:{tmp_path}"], "has no open_clip_config.json"),
    ):  # fmt: skip
        expect_error(args, capsys, fragment)
        assert not out.exists()
