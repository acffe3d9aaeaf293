"""`distilsd dreambooth` end to end on the tiny pipeline: class images made once and reused,
LoRA and full modes, bad instance data refused; `shapes eval-hexagon` reports its scores."""

from __future__ import annotations

import json

import pytest
from PIL import Image


def _instance_folder(path, captions):
    path.mkdir()
    for i, caption in enumerate(captions):
        Image.new("RGB", (64, 64), (40 * i, 200, 30)).save(path / f"{i}.png")
        if caption:
            (path / f"{i}.txt").write_text(caption)
    return path


@pytest.mark.slow
def test_dreambooth_lora_with_prior_then_full(tiny_pipeline_dir, tmp_path, run_cli):
    instance = _instance_folder(tmp_path / "instance", ["a red sks hexagon", "", "a sks hexagon on the left"])
    out = tmp_path / "db"
    prompts_file = tmp_path / "class_prompts.txt"
    prompts_file.write_text("# the class\n\na hexagon\n")
    args = ["dreambooth", "-m", str(tiny_pipeline_dir), "--instance-data", str(instance),
            "--instance-prompt", "a sks hexagon", "--class-prompts-file", str(prompts_file), "--num-class-images", "3",
            "--max-steps", "2", "--batch-size", "2", "-o", str(out), "-q"]  # fmt: skip
    code, stdout, err = run_cli([*args, "--lora-targets", "to_q,to_v", "--lora-targets", "conv1", "--refine-latents", "2"])
    assert code == 0, err
    assert "LoRA in" in stdout
    from safetensors.torch import load_file

    adapted = {
        key.split(".lora_")[0].rsplit(".", 1)[-1]
        for key in load_file(out / "pytorch_lora_weights.safetensors")
    }
    assert adapted == {"to_q", "to_v", "conv1"}, "the adapters sit on the --lora-targets modules only"
    classes = sorted((out / "class_images").glob("class-*.png"))
    assert [p.name for p in classes] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    listing = [
        json.loads(line) for line in (out / "dreambooth_data" / "metadata.jsonl").read_text().splitlines()
    ]
    texts = [row["text"] for row in listing]
    # Three instance images (one without a caption file gets the instance prompt), each listed once
    # (3 class images / (w=1 x 3 instance images)), then the class images.
    assert texts == ["a red sks hexagon", "a sks hexagon", "a sks hexagon on the left"] + ["a hexagon"] * 3
    # The class images are marked, for loss.prior_target (--prior-target base).
    assert [row.get("prior", False) for row in listing] == [False] * 3 + [True] * 3
    info = json.loads((out / "dreambooth_info.json").read_text())
    assert info["instance_tokens"] == ["sks"] and info["mode"] == "lora rank 4" and info["refine_latents"] == 2

    # A rerun reuses the class images; asking for more generates only the missing ones.
    stamps = [p.stat().st_mtime_ns for p in classes]
    code, _, err = run_cli([*args[:-7], "--num-class-images", "4", "--max-steps", "1", "--full", "--overwrite",
                            "-o", str(out), "-q"])  # fmt: skip
    assert code == 0, err
    assert [p.stat().st_mtime_ns for p in classes] == stamps
    assert (out / "class_images" / "class-00003.png").is_file()
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir(), (
        "full DreamBooth writes a pipeline"
    )


def test_bad_dreambooth_inputs(tiny_pipeline_dir, tmp_path, expect_cli_error):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    (empty / "broken.png").write_bytes(b"not a png")
    base = ["dreambooth", "-m", str(tiny_pipeline_dir), "--max-steps", "1", "-o", str(tmp_path / "out")]
    expect_cli_error(
        [*base, "--instance-data", str(empty), "--instance-prompt", "a sks hexagon"],
        "no readable images in the instance folder",
    )
    instance = _instance_folder(tmp_path / "instance", ["a red hexagon", ""])
    expect_cli_error(
        [
            *base,
            "--instance-data",
            str(instance),
            "--instance-prompt",
            "a sks hexagon",
            "--class-prompt",
            "a hexagon",
        ],
        "lacks the instance token (sks)",
    )
    expect_cli_error(
        [
            *base,
            "--instance-data",
            str(instance),
            "--instance-prompt",
            "a hexagon",
            "--class-prompt",
            "a hexagon",
        ],
        "has no word that the class prompt lacks",
    )
    expect_cli_error(
        [*base, "--instance-data", str(instance), "--instance-prompt", "a sks hexagon", "--lora-rank", "0"],
        "--lora-rank 0 must be at least 1",
    )
    expect_cli_error(
        [
            *base,
            "--instance-data",
            str(instance),
            "--instance-prompt",
            "a hexagon",
            "--full",
            "--lora-targets",
            "conv1",
        ],
        "--lora-targets chooses LoRA adapters",
    )
    comments_only = tmp_path / "prompts.txt"
    comments_only.write_text("# nothing yet\n\n")
    with_instance = [*base, "--instance-data", str(instance), "--instance-prompt", "a sks hexagon"]
    for prompts_file, message in [
        (comments_only, "holds no prompts"),
        (tmp_path / "missing.txt", "cannot read the class prompts file"),
    ]:
        expect_cli_error([*with_instance, "--class-prompts-file", str(prompts_file)], message)
    expect_cli_error([*with_instance, "--prior-target", "base"], "there are no class images to keep")
    # A bad trainer setting is refused before any class image is generated.
    uncaptioned = _instance_folder(tmp_path / "uncaptioned", ["", ""])
    expect_cli_error(
        [*base, "--instance-data", str(uncaptioned), "--instance-prompt", "a sks hexagon",
         "--class-prompt", "a hexagon", "--prior-target", "base", "--full"],
        "base is the model with its LoRA adapters off",
    )  # fmt: skip
    expect_cli_error(
        [
            *base,
            "--instance-data",
            str(uncaptioned),
            "--instance-prompt",
            "a sks hexagon",
            "--class-prompt",
            "a hexagon",
            "--train-token-embeddings",
            "--token-embedding-lr",
            "-1",
        ],  # fmt: skip
        "token_embedding_lr must be more than 0",
    )
    assert not (tmp_path / "out").exists()


def test_eval_hexagon_reports_scores_with_intervals(tiny_pipeline_dir, tmp_path, run_cli):
    from distilsd.shapes.personalise import subject_scenes, wilson_interval

    scenes = subject_scenes(5)
    assert all(s.objects[0].shape == "hexagon" and "hexagon" in s.caption for s in scenes)
    low, high = wilson_interval(80, 100)
    assert 0.70 < low < 0.80 < high < 0.88
    code, out, err = run_cli(
        ["shapes", "eval-hexagon", "-m", str(tiny_pipeline_dir), "-o", str(tmp_path / "img"), "--prompts", "2",
         "--prior-prompts", "2", "--steps", "1", "-q"]
    )  # fmt: skip
    assert code == 0, err
    scores = json.loads(out)
    assert scores["prompts"] == 2 and 0 <= scores["right_shape_and_colour"] <= 1
    assert scores["single_object_alignment"] is not None
    assert len(list((tmp_path / "img").glob("*.png"))) == 4
    # judged.jsonl: per image what the judge read and its verdicts, which add up to the scores.
    records = [json.loads(line) for line in (tmp_path / "img" / "judged.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["subject", "subject", "usual", "usual"]
    assert all((tmp_path / "img" / r["file"]).is_file() and isinstance(r["read"], list) for r in records)
    assert sum(r["found"] for r in records[:2]) / 2 == scores["right_shape_and_colour"]
    assert sum(r["aligned"] for r in records[2:]) / 2 == scores["single_object_alignment"]


def test_eval_hexagon_compares_a_lora_with_its_base_pairwise(tiny_pipeline_dir, tmp_path, run_cli):
    from distilsd.testing import save_random_lora

    lora = save_random_lora(tiny_pipeline_dir, tmp_path / "lora.safetensors")
    args = ["shapes", "eval-hexagon", "-m", str(tiny_pipeline_dir), "-o", str(tmp_path / "img"),
            "--prompts", "3", "--prior-prompts", "3", "--steps", "1", "-q"]  # fmt: skip
    code, out, err = run_cli([*args, "--lora", str(lora), "--compare-base"])
    assert code == 0, err
    scores = json.loads(out)
    assert len(list((tmp_path / "img" / "base").glob("*.png"))) == 6, "the base model drew the same prompts"
    base_alone = json.loads(run_cli([*args[:5], str(tmp_path / "alone"), *args[6:]])[1])
    assert scores["base"]["right_shape_and_colour"] == base_alone["right_shape_and_colour"]
    assert scores["base"]["single_object_alignment"] == base_alone["single_object_alignment"]
    for key, tuned, base in (
        ("subject_gain", "right_shape_and_colour", "right_shape_and_colour"),
        ("prior_change", "single_object_alignment", "single_object_alignment"),
    ):
        gain = scores[key]
        assert gain["low"] <= gain["value"] <= gain["high"]
        assert abs(gain["value"] - (scores[tuned] - scores["base"][base])) < 1e-9


@pytest.mark.slow
def test_bench_train_measures_lora_and_dreambooth_on_teacher_and_student(tiny_pipeline_dir, run_cli):
    code, out, err = run_cli(
        ["bench-train", "--teacher", str(tiny_pipeline_dir), "--arch", "bk-tiny", "--lora-rank", "4",
         "--steps", "2", "--batch-size", "2", "--num-images", "4"]
    )  # fmt: skip
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[4:]}
    for label in ("LoRA", "DreamBooth"):
        teacher, student = float(rows[label][2]), float(rows[label][3])
        assert teacher > 0 and student > 0


def test_the_python_api_leaves_nothing_behind_when_the_model_fails(pickle_only_pipeline_dir, tmp_path):
    """dreambooth() itself (not only the CLI) removes the listing it wrote before the model was refused."""
    from distilsd.errors import DistilSDError
    from distilsd.lora.dreambooth import dreambooth

    instance = _instance_folder(tmp_path / "instance", ["a sks hexagon", ""])
    with pytest.raises(DistilSDError, match="only pickled weights"):
        dreambooth(str(pickle_only_pipeline_dir), instance, "a sks hexagon", tmp_path / "out",
                   max_steps=1, progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()
