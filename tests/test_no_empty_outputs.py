"""A run that fails on bad input leaves no output behind (issue 22, item 7).

Every command that writes an output path is run in-process with a failing input: a missing
model, a model with only pickled weights (refused without --allow-pickle), a bad flag value
or key=value, missing or unusable data. Each must exit non-zero with one error line and no
traceback, and leave its output folder or file uncreated. Cases covered (75):

- generate: missing model, pickle-only model, --json, missing / unreadable LoRA, unreadable
  init image, missing --unet, bad --vae, empty prompt file, --width 30, --steps 0
- compress: missing teacher, pickle-only teacher (U-Net and --pipeline), unknown --arch,
  a layout spec that is not one
- distill: missing teacher, pickle-only teacher, missing --student, missing / empty data
  folder, fewer samples than one batch, --resume latest with no checkpoint, --resume of a
  folder that is not a checkpoint
- train: missing model, pickle-only model (U-Net and --component vae), missing data,
  missing --student
- dreambooth: missing model, pickle-only model (training, and class-image generation),
  missing instance folder, unknown key=value; also into an existing empty folder
- lora transfer: missing LoRA file, unreadable LoRA file, student without a mapping
- export: missing model, pickle-only model, missing LoRA, missing --unet, --width 30, an
  empty --calibration-prompts file (it used to fall back to the default prompts unnoticed)
- eval generate: missing model, pickle-only model, missing / malformed caption file,
  --size 30; eval sweep: missing model, pickle-only model; eval score: missing / empty
  images folder (with --record and --save-reference-stats)
- bench: pickle-only model, unknown backend, unknown --baseline, --resolution 30
- convert: missing folder, pickle-only folder, an output that is not .safetensors
- shapes make-data: --count 0, --resolution 7, unknown --shape, --two-object-fraction 2;
  shapes init: bad --unet-channels; shapes eval: missing model, pickle-only model, bad --vae;
  shapes eval-hexagon: missing model, pickle-only model, missing LoRA; shapes train-text:
  missing model, pickle-only model, missing data; shapes train-judge: --train-images 0

Commands that write no file (arch, bench-train, schedulers, check-judge, check-text,
check-vae, serve-loadtest: they print) have no output path to leave behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY, PICKLE, DATA, INST, STUDENT = "{tiny}", "{pickle}", "{data}", "{inst}", "{student}"
NOMODEL = "/nonexistent-model"

CASES: dict[str, list[str]] = {
    "generate-missing-model": ["generate", "x", "-m", NOMODEL, "-o", "out"],
    "generate-pickle-model": ["generate", "x", "-m", PICKLE, "-o", "out", "--steps", "1"],
    "generate-json": ["generate", "x", "-m", NOMODEL, "-o", "out", "--json"],
    "generate-missing-lora": ["generate", "x", "-m", TINY, "--lora", "missing.safetensors", "-o", "out"],
    "generate-unreadable-lora": ["generate", "x", "-m", TINY, "--lora", "garbage.safetensors", "-o", "out"],
    "generate-unreadable-init-image": ["generate", "x", "-m", TINY, "--init-image", "garbage.png", "-o", "out"],
    "generate-missing-unet": ["generate", "x", "-m", TINY, "--unet", NOMODEL, "-o", "out"],
    "generate-bad-vae": ["generate", "x", "-m", TINY, "--vae", NOMODEL, "-o", "out"],
    "generate-empty-prompt-file": ["generate", "-m", TINY, "-f", "empty.txt", "-o", "out"],
    "generate-bad-width": ["generate", "x", "-m", TINY, "-W", "30", "-o", "out"],
    "generate-zero-steps": ["generate", "x", "-m", TINY, "--steps", "0", "-o", "out"],
    "compress-missing-teacher": ["compress", "-t", NOMODEL, "-a", "bk-tiny", "-o", "out"],
    "compress-pickle-teacher": ["compress", "-t", PICKLE, "-a", "bk-tiny", "-o", "out"],
    "compress-pickle-pipeline": ["compress", "-t", PICKLE, "-a", "bk-tiny", "--pipeline", "-o", "out"],
    "compress-unknown-arch": ["compress", "-t", TINY, "-a", "nope", "-o", "out"],
    "compress-bad-spec": ["compress", "-t", TINY, "-a", "garbage.png", "-o", "out"],
    "distill-missing-teacher": ["distill", "--teacher", NOMODEL, "--data", DATA, "-o", "out"],
    "distill-pickle-teacher": ["distill", "--teacher", PICKLE, "--arch", "bk-tiny", "--data", DATA, "-o", "out"],
    "distill-missing-student": ["distill", "--teacher", TINY, "--student", NOMODEL, "--data", DATA, "-o", "out"],
    "distill-missing-data": ["distill", "--teacher", TINY, "--arch", "bk-tiny", "--data", "nodata", "-o", "out"],
    "distill-empty-data": ["distill", "--teacher", TINY, "--arch", "bk-tiny", "--data", "emptydir", "-o", "out"],
    "distill-data-under-one-batch": ["distill", "--teacher", TINY, "--arch", "bk-tiny", "--data", DATA, "--batch-size", "8", "-o", "out"],
    "distill-resume-latest-of-nothing": ["distill", "--teacher", TINY, "--arch", "bk-tiny", "--data", DATA, "--resume", "latest", "-o", "out"],
    "distill-resume-not-a-checkpoint": ["distill", "--teacher", TINY, "--arch", "bk-tiny", "--data", DATA, "--resume", "emptydir", "-o", "out"],
    "train-missing-model": ["train", "--model", NOMODEL, "--data", DATA, "-o", "out"],
    "train-pickle-model": ["train", "--model", PICKLE, "--data", DATA, "-o", "out"],
    "train-vae-pickle-model": ["train", "--model", PICKLE, "--component", "vae", "--data", DATA, "-o", "out"],
    "train-missing-data": ["train", "--model", TINY, "--data", "nodata", "-o", "out"],
    "train-missing-student": ["train", "--model", TINY, "--student", NOMODEL, "--data", DATA, "-o", "out"],
    "dreambooth-missing-model": ["dreambooth", "-m", NOMODEL, "--instance-data", INST, "--instance-prompt", "a sks dog", "-o", "out"],
    "dreambooth-pickle-model": ["dreambooth", "-m", PICKLE, "--instance-data", INST, "--instance-prompt", "a sks dog", "-o", "out"],
    "dreambooth-pickle-class-images": ["dreambooth", "-m", PICKLE, "--instance-data", INST, "--instance-prompt", "a sks dog", "--class-prompt", "a dog", "--num-class-images", "1", "-o", "out"],
    "dreambooth-missing-instances": ["dreambooth", "-m", TINY, "--instance-data", "nodata", "--instance-prompt", "a sks dog", "-o", "out"],
    "dreambooth-unknown-key": ["dreambooth", "-m", TINY, "--instance-data", INST, "--instance-prompt", "a sks dog", "-o", "out", "resolution=64"],
    "dreambooth-into-existing-empty-folder": ["dreambooth", "-m", NOMODEL, "--instance-data", INST, "--instance-prompt", "a sks dog", "-o", "emptydir"],
    "lora-transfer-missing-lora": ["lora", "transfer", "--lora", "missing.safetensors", "--student", STUDENT, "-o", "out"],
    "lora-transfer-unreadable-lora": ["lora", "transfer", "--lora", "garbage.safetensors", "--student", STUDENT, "-o", "out"],
    "lora-transfer-student-without-mapping": ["lora", "transfer", "--lora", "garbage.safetensors", "--student", TINY, "-o", "out"],
    "export-missing-model": ["export", "-m", NOMODEL, "-o", "out"],
    "export-pickle-model": ["export", "-m", PICKLE, "-o", "out"],
    "export-missing-lora": ["export", "-m", TINY, "--lora", "missing.safetensors", "-o", "out"],
    "export-missing-unet": ["export", "-m", TINY, "--unet", NOMODEL, "-o", "out"],
    "export-bad-width": ["export", "-m", TINY, "-W", "30", "-o", "out"],
    "export-empty-calibration-prompts": ["export", "-m", TINY, "--precision", "int8", "--calibration-prompts", "empty.txt", "-o", "out"],
    "eval-generate-missing-model": ["eval", "generate", "-m", NOMODEL, "-p", "captions.csv", "-o", "out"],
    "eval-generate-pickle-model": ["eval", "generate", "-m", PICKLE, "-p", "captions.csv", "-o", "out"],
    "eval-generate-missing-captions": ["eval", "generate", "-m", TINY, "-p", "missing.csv", "-o", "out"],
    "eval-generate-malformed-captions": ["eval", "generate", "-m", TINY, "-p", "bad.csv", "-o", "out"],
    "eval-generate-bad-size": ["eval", "generate", "-m", TINY, "-p", "captions.csv", "--size", "30", "-o", "out"],
    "eval-sweep-missing-model": ["eval", "sweep", "-m", NOMODEL, "-p", "captions.csv", "-r", "ref", "-o", "out"],
    "eval-sweep-pickle-model": ["eval", "sweep", "-m", PICKLE, "-p", "captions.csv", "-r", "ref", "-o", "out"],
    "eval-score-missing-images": ["eval", "score", "-i", "nodata", "-r", "ref", "--record", "out.json", "--save-reference-stats", "out.npz"],
    "eval-score-no-images": ["eval", "score", "-i", "emptydir", "-r", "ref", "--record", "out.json", "--save-reference-stats", "out.npz"],
    "bench-pickle-model": ["bench", "-m", PICKLE, "-r", "64", "-c", "unet", "-o", "out"],
    "bench-unknown-backend": ["bench", "-m", TINY, "--backend", "nope", "-o", "out"],
    "bench-unknown-baseline": ["bench", "-m", TINY, "--baseline", "nope", "-o", "out"],
    "bench-bad-resolution": ["bench", "-m", TINY, "-r", "30", "-o", "out"],
    "convert-missing-folder": ["convert", NOMODEL, "-o", "out.safetensors"],
    "convert-pickle-folder": ["convert", PICKLE, "-o", "out.safetensors"],
    "convert-output-not-safetensors": ["convert", TINY, "-o", "out"],
    "shapes-make-data-zero-count": ["shapes", "make-data", "--count", "0", "-o", "out"],
    "shapes-make-data-bad-resolution": ["shapes", "make-data", "--count", "2", "--resolution", "7", "-o", "out"],
    "shapes-make-data-unknown-shape": ["shapes", "make-data", "--count", "2", "--shape", "blob", "-o", "out"],
    "shapes-make-data-bad-fraction": ["shapes", "make-data", "--count", "2", "--two-object-fraction", "2", "-o", "out"],
    "shapes-init-bad-channels": ["shapes", "init", "--unet-channels", "x", "-o", "out"],
    "shapes-eval-missing-model": ["shapes", "eval", "-m", NOMODEL, "-o", "out"],
    "shapes-eval-pickle-model": ["shapes", "eval", "-m", PICKLE, "-o", "out"],
    "shapes-eval-bad-vae": ["shapes", "eval", "-m", TINY, "--vae", NOMODEL, "-o", "out"],
    "shapes-eval-hexagon-missing-model": ["shapes", "eval-hexagon", "-m", NOMODEL, "-o", "out"],
    "shapes-eval-hexagon-pickle-model": ["shapes", "eval-hexagon", "-m", PICKLE, "-o", "out"],
    "shapes-eval-hexagon-missing-lora": ["shapes", "eval-hexagon", "-m", TINY, "--lora", "missing.safetensors", "-o", "out"],
    "shapes-train-text-missing-model": ["shapes", "train-text", "-m", NOMODEL, "--data", DATA, "-o", "out"],
    "shapes-train-text-pickle-model": ["shapes", "train-text", "-m", PICKLE, "--data", DATA, "-o", "out"],
    "shapes-train-text-missing-data": ["shapes", "train-text", "-m", TINY, "--data", "nodata", "-o", "out"],
    "shapes-train-judge-no-images": ["shapes", "train-judge", "--train-images", "0", "-o", "out"],
}  # fmt: skip


def _quiet_library_log_handlers(monkeypatch) -> None:
    """diffusers' and transformers' log handlers keep the stream they were made with: made
    during an earlier test, that is its finished (closed) capture, and their next log line
    would print a logging traceback into this test's stderr. Run without them (warnings and
    errors still reach stderr through logging's last resort): what is checked here is
    distilsd's error line."""
    import logging

    for name in ("diffusers", "transformers"):
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_pipeline_dir, pickle_only_pipeline_dir) -> dict[str, str]:
    """The tiny models, 4 captioned images, one instance image and a compressed student."""
    import shutil

    from distilsd.cli import main
    from distilsd.distill.samples import write_shapes_folder

    root = tmp_path_factory.mktemp("inputs")
    data = write_shapes_folder(root / "data", num_images=4, size=64)
    (root / "inst").mkdir()
    shutil.copy(next(data.rglob("*.png")), root / "inst" / "a.png")
    main(["compress", "-t", str(tiny_pipeline_dir), "-a", "bk-tiny", "-o", str(root / "student")])
    return {
        TINY: str(tiny_pipeline_dir),
        PICKLE: str(pickle_only_pipeline_dir),
        DATA: str(data),
        INST: str(root / "inst"),
        STUDENT: str(root / "student"),
    }


SLOW = {"bench-pickle-model"}  # bench loads models in a worker process


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=[pytest.mark.slow] if case in SLOW else []) for case in CASES]
)
def test_a_failed_run_leaves_no_output(case, inputs, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "captions.csv").write_text("file_name,text\na.png,a cat\n")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "r.png").write_bytes(Path(next(Path(inputs[DATA]).rglob("*.png"))).read_bytes())
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}

    _quiet_library_log_handlers(monkeypatch)
    code, out, err = run_cli([inputs.get(arg, arg) for arg in CASES[case]])

    assert code not in (0, None), (out, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, err
    assert {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} == before, err
