"""The trainer on tiny models: KD works, resume is exact, caching changes nothing, errors are clear."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from distilsd.distill import load_config, run_training
from distilsd.errors import InputError, OutputError

from .conftest import read_csv, tiny_run_overrides


def _run(**overrides):
    return run_training(load_config(overrides=overrides))


@torch.no_grad()
def _heldout_kd_terms(teacher, student, pairs) -> dict[str, float]:
    """Output and per-pair feature MSE on fixed held-out noise, timesteps and text."""
    from distilsd.distill.losses import FeatureRecorder

    generator = torch.Generator().manual_seed(1234)
    sample = torch.randn(8, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (8,), generator=generator)
    text = torch.randn(8, 77, teacher.config.cross_attention_dim, generator=generator)
    t_rec, s_rec = (
        FeatureRecorder(teacher, [t for t, _ in pairs]),
        FeatureRecorder(student, [s for _, s in pairs]),
    )
    t_out = teacher(sample, timesteps, encoder_hidden_states=text).sample
    s_out = student(sample, timesteps, encoder_hidden_states=text).sample
    terms = {"out": float(torch.nn.functional.mse_loss(s_out, t_out))}
    for (_, name), t_feat, s_feat in zip(pairs, t_rec.take(), s_rec.take(), strict=True):
        terms[name] = float(torch.nn.functional.mse_loss(s_feat, t_feat))
    t_rec.remove()
    s_rec.remove()
    return terms


@pytest.mark.slow
def test_50_kd_steps_lower_each_term_and_bring_the_student_closer(tiny_pipeline_dir, shapes_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from distilsd.compress import build_student, get_layout

    run = tmp_path / "run"
    # The tiny teacher has random weights, so it is no denoiser: the task term would pull the
    # student away from it. KD terms only, to see each of them fall.
    summary = _run(
        **tiny_run_overrides(
            tiny_pipeline_dir,
            shapes_dir,
            run,
            max_steps=50,
            checkpoint_every=25,
            keep_checkpoints=1,
            loss={"l_task": 0.0},
        )
    )
    assert summary.steps == 50

    rows = read_csv(run / "logs" / "train.csv")
    assert [r["step"] for r in rows] == list(range(1, 51))
    kd_columns = ["out_kd", "feat_kd"] + [k for k in rows[0] if k.startswith("feat/")]
    assert len(kd_columns) == 2 + 6  # BK-SDM-Tiny matches six blocks
    for column in kd_columns + ["loss"]:
        first = sum(r[column] for r in rows[:10]) / 10
        last = sum(r[column] for r in rows[-10:]) / 10
        assert last < first, (column, first, last)

    # Closer to the teacher on held-out noise, in the output and in every matched feature.
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    layout = get_layout("bk-tiny", teacher.config)
    before, _ = build_student(teacher, layout, init="teacher")
    after = UNet2DConditionModel.from_pretrained(run, subfolder="unet_raw")
    pairs = [tuple(p) for p in layout.feature_pairs]
    terms_before, terms_after = (
        _heldout_kd_terms(teacher, before, pairs),
        _heldout_kd_terms(teacher, after, pairs),
    )
    for name in terms_before:
        assert terms_after[name] < terms_before[name], (name, terms_before[name], terms_after[name])

    # Checkpoints: only the newest kept; unet/ + unet_ema/ in diffusers format.
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-50"]
    ema = UNet2DConditionModel.from_pretrained(run / "checkpoints" / "checkpoint-50", subfolder="unet_ema")

    # The run folder is a pipeline that plain diffusers loads; its unet/ holds the EMA weights.
    info = json.loads((run / "distill_info.json").read_text())
    assert info["unet"] == "ema" and info["steps"] == 50
    pipe = StableDiffusionPipeline.from_pretrained(run, safety_checker=None)
    assert pipe.unet.config.block_out_channels == after.config.block_out_channels
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, ema.state_dict()[name]), name
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and not math.isnan(float(image.mean()))


@pytest.mark.slow
def test_compiled_run_follows_the_eager_path_and_resumes_uncompiled(tiny_pipeline_dir, shapes_dir, tmp_path):
    # torch.compile (KD with feature hooks) takes the same steps as eager execution, and its
    # checkpoints resume without it: compiling is free to change on resume. The aot_eager backend
    # traces and differentiates the same graphs as inductor but generates no kernels, which for
    # inductor takes ~5 min with a cold cache on 2 cores (a fresh CI machine).
    reference = tmp_path / "eager"
    _run(**tiny_run_overrides(tiny_pipeline_dir, shapes_dir, reference, max_steps=4, checkpoint_every=2))
    run = tmp_path / "compiled"
    _run(
        **tiny_run_overrides(
            tiny_pipeline_dir, shapes_dir, run, max_steps=2, checkpoint_every=2, compile=True, compile_backend="aot_eager"
        )
    )
    _run(
        **tiny_run_overrides(
            tiny_pipeline_dir, shapes_dir, run, max_steps=4, checkpoint_every=2, resume="latest"
        )
    )
    expected, got = read_csv(reference / "logs" / "train.csv"), read_csv(run / "logs" / "train.csv")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for want, row in zip(expected, got, strict=True):
        for column in ("loss", "out_kd", "feat_kd"):
            assert row[column] == pytest.approx(want[column], rel=1e-3), (want["step"], column)


@pytest.mark.slow
def test_sigkill_and_resume_follows_the_uninterrupted_loss_curve(tiny_pipeline_dir, shapes_dir, tmp_path):
    steps = 12
    reference = tmp_path / "reference"
    _run(
        **tiny_run_overrides(
            tiny_pipeline_dir,
            shapes_dir,
            reference,
            max_steps=steps,
            checkpoint_every=3,
            optim={"lr_scheduler": "cosine", "lr_warmup_steps": 2},
        )
    )

    run = tmp_path / "killed"
    command = [
        sys.executable, "-m", "distilsd", "distill", "--teacher", str(tiny_pipeline_dir), "--arch", "bk-tiny",
        "--data", str(shapes_dir), "--resolution", "64", "--batch-size", "2", "--lr", "1e-3", "-o", str(run),
        "--max-steps", str(steps), "--checkpoint-every", "3", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2",
        "--log-with", "csv", "--no-progress", "validation.prompts=[]", f"data.cache_dir={tmp_path / 'latent-cache'}",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "checkpoint-3").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (run / "distill_info.json").exists()

    overrides = tiny_run_overrides(
        tiny_pipeline_dir,
        shapes_dir,
        run,
        max_steps=steps,
        checkpoint_every=3,
        resume="latest",
        optim={"lr_scheduler": "cosine", "lr_warmup_steps": 2},
    )
    _run(**overrides)
    expected, resumed = read_csv(reference / "logs" / "train.csv"), read_csv(run / "logs" / "train.csv")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for want, got in zip(expected, resumed, strict=True):
        for column in ("loss", "task", "out_kd", "feat_kd", "lr"):
            assert got[column] == pytest.approx(want[column], rel=1e-5, abs=1e-7), (want["step"], column)


def test_cached_and_uncached_runs_give_the_same_first_losses(tiny_pipeline_dir, shapes_dir, tmp_path):
    rows = {}
    for mode in ("uncached", "cached"):
        run = tmp_path / mode
        _run(
            **tiny_run_overrides(
                tiny_pipeline_dir, shapes_dir, run, max_steps=2, data={"cache_latents": mode == "cached"}
            )
        )
        rows[mode] = read_csv(run / "logs" / "train.csv")
    caches = list((tmp_path / "latent-cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "manifest.json").is_file()
    for want, got in zip(rows["uncached"], rows["cached"], strict=True):
        for column in ("loss", "task", "out_kd", "feat_kd"):
            assert got[column] == pytest.approx(want[column], rel=1e-4), (want["step"], column)


def test_text_encoder_training_on_cached_latents_matches_the_uncached_run(
    tiny_pipeline_dir, shapes_dir, tmp_path
):
    """Cached latents, live text: the encoder trains, and losses and weights match an uncached run."""
    from safetensors.torch import load_file

    rows, encoders = {}, {}
    for mode in ("uncached", "cached"):
        run = tmp_path / mode
        _run(
            **tiny_run_overrides(
                None, shapes_dir, run, model=str(tiny_pipeline_dir), train_text_encoder=True, max_steps=3,
                data={"cache_latents": mode == "cached", "caption_dropout": 0.5}, optim={"ema": False},
            )
        )  # fmt: skip
        rows[mode] = read_csv(run / "logs" / "train.csv")
        encoders[mode] = load_file(str(run / "text_encoder" / "model.safetensors"))
    assert len(rows["cached"]) == 3
    for want, got in zip(rows["uncached"], rows["cached"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), want["step"]
    initial = load_file(str(tiny_pipeline_dir / "text_encoder" / "model.safetensors"))
    name = next(key for key in initial if "layers.0.self_attn.q_proj.weight" in key)
    assert not torch.allclose(initial[name], encoders["cached"][name])
    for key, tensor in encoders["uncached"].items():
        torch.testing.assert_close(encoders["cached"][key], tensor, rtol=1e-3, atol=1e-5)


def test_cache_is_reused_and_keyed_by_the_data(tiny_pipeline_dir, tmp_path):
    from distilsd.distill.samples import write_shapes_folder

    data = write_shapes_folder(tmp_path / "data", num_images=4)
    cache_root = tmp_path / "latent-cache"
    for i, caption in enumerate(("first", "first", "changed")):
        lines = (data / "metadata.jsonl").read_text().splitlines()
        lines[0] = json.dumps({"file_name": "0000.png", "text": caption})
        (data / "metadata.jsonl").write_text("\n".join(lines))
        _run(
            **tiny_run_overrides(
                tiny_pipeline_dir,
                data,
                tmp_path / f"run{i}",
                max_steps=1,
                data={"cache_latents": True},
                optim={"ema": False},
            )
        )
        if i == 1:  # same model, data and resolution: the cache is found, not rebuilt
            (cache,) = cache_root.iterdir()
            manifest_time = (cache / "manifest.json").stat().st_mtime_ns
    assert len(list(cache_root.iterdir())) == 2  # a changed caption is not served stale
    assert (cache / "manifest.json").stat().st_mtime_ns == manifest_time


def test_cache_holds_every_caption_of_multi_caption_rows(tiny_pipeline_dir, tmp_path):
    """COCO-style rows: the cached run trains on the caption the uncached run picks (random,
    seeded), so their losses agree; caption_choice is part of the cache key."""
    from safetensors import safe_open

    from distilsd.distill.samples import write_shapes_folder

    data = write_shapes_folder(tmp_path / "data", num_images=4)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for k, row in enumerate(rows):  # row k: its caption plus k others
        row["text"] = [row["text"]] + [f"{row['text']} #{j}" for j in range(k)]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    losses = {}
    for mode in ("uncached", "cached", "first"):
        _run(
            **tiny_run_overrides(
                tiny_pipeline_dir, data, tmp_path / mode, max_steps=4, optim={"ema": False},
                data={"cache_latents": mode != "uncached", "caption_choice": "first" if mode == "first" else "random"},
            )
        )  # fmt: skip
        losses[mode] = [row["loss"] for row in read_csv(tmp_path / mode / "logs" / "train.csv")]
    assert losses["cached"] == pytest.approx(losses["uncached"], rel=1e-4)
    assert losses["first"] != pytest.approx(losses["cached"], rel=1e-4)
    caches = {
        json.loads((c / "manifest.json").read_text())["caption_choice"]: c
        for c in (tmp_path / "latent-cache").iterdir()
    }
    assert set(caches) == {"random", "first"}
    for choice, total in (("random", 4 + 0 + 1 + 2 + 3), ("first", 4)):
        with safe_open(str(caches[choice] / "shard-00000.safetensors"), framework="pt") as shard:
            assert shard.get_tensor("text_embeds").shape[0] == total
            assert shard.get_tensor("caption_count").sum() == total


def test_train_command_without_teacher(tiny_pipeline_dir, shapes_dir, tmp_path):
    from distilsd.cli import cli

    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_pipeline_dir), "--data", str(shapes_dir), "-o", str(run), "--resolution", "64", "--max-steps", "2",
            "--batch-size", "2", "--grad-accum", "2", "--no-progress", "--log-with", "csv", "--final-weights", "raw", "validation.prompts=[]",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = read_csv(run / "logs" / "train.csv")
    assert (
        len(rows) == 2 and "out_kd" not in rows[0] and rows[-1]["epoch"] == 0.5
    )  # 16 images, 4 per micro-batch x 2
    info = json.loads((run / "distill_info.json").read_text())
    assert info["unet"] == "raw" and info["teacher"] is None and (run / "unet_ema").is_dir()


def test_v_prediction_teacher_with_min_snr_noise_offset_feature_norm_and_logit_normal_timesteps(
    tiny_v2_pipeline_dir, shapes_dir, tmp_path
):
    run = tmp_path / "run"
    summary = _run(
        **tiny_run_overrides(
            tiny_v2_pipeline_dir, shapes_dir, run, arch="bk-small", max_steps=2, mixed_precision="bf16", gradient_checkpointing=True,
            loss={"snr_gamma": 5.0, "noise_offset": 0.05, "feature_norm": "teacher", "l_out": 0.5, "l_feat": 0.5,
                  "timestep_sampling": "logit_normal", "logit_mean": 1.0, "logit_std": 0.5},
        )
    )  # fmt: skip
    row = summary.losses[0]
    assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    assert len([k for k in row if k.startswith("feat/")]) == 8  # BK-SDM-Small: 4 down + 4 up blocks
    assert row["loss"] == pytest.approx(row["task"] + 0.5 * row["out_kd"] + 0.5 * row["feat_kd"], rel=1e-4)


def test_validation_grid_puts_student_beside_teacher(tiny_pipeline_dir, shapes_dir, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    validation = {"prompts": ["a red circle", "a blue square"], "every": 1, "num_inference_steps": 2}
    _run(
        **tiny_run_overrides(
            tiny_pipeline_dir,
            shapes_dir,
            run,
            max_steps=1,
            validation=validation,
            log_with=["csv", "tensorboard"],
        )
    )
    grid = Image.open(run / "validation" / "step-000001.png")
    assert grid.size == (2 * 64, 2 * 64)  # columns: teacher, student; one row per prompt
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_bad_inputs_are_refused_with_a_reason(tiny_pipeline_dir, tiny_v2_pipeline_dir, shapes_dir, tmp_path):
    with pytest.raises(InputError, match="48-d text embeddings.*32-d"):
        _run(
            **tiny_run_overrides(
                tiny_v2_pipeline_dir, shapes_dir, tmp_path / "a", model=str(tiny_pipeline_dir)
            )
        )

    run = tmp_path / "run"
    _run(
        **tiny_run_overrides(
            tiny_pipeline_dir, shapes_dir, run, max_steps=2, checkpoint_every=1, optim={"ema": False}
        )
    )
    with pytest.raises(OutputError, match="not empty") as info:
        _run(**tiny_run_overrides(tiny_pipeline_dir, shapes_dir, run, max_steps=2))
    assert "--resume latest" in info.value.hint
    import distilsd.distill.trainer as trainer_module

    def no_loading(self):
        raise AssertionError("the models were loaded before the config was checked")

    with (
        pytest.raises(
            InputError, match=r"different config.*optim.learning_rate: checkpoint has 0.001, now 0.01"
        ),
        pytest.MonkeyPatch.context() as patch,
    ):
        # Refused before the models and the latent cache (minutes on a real data set) are built.
        patch.setattr(trainer_module.Trainer, "_load_models", no_loading)
        _run(
            **tiny_run_overrides(
                tiny_pipeline_dir,
                shapes_dir,
                run,
                max_steps=3,
                resume="latest",
                optim={"ema": False, "learning_rate": 1e-2},
            )
        )
    # Same config and a longer max_steps: continues.
    assert (
        _run(
            **tiny_run_overrides(
                tiny_pipeline_dir, shapes_dir, run, max_steps=3, resume="latest", optim={"ema": False}
            )
        ).steps
        == 3
    )


def test_cli_reports_data_errors_in_one_line(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    from distilsd.cli import main

    monkeypatch.delenv("DISTILSD_DEBUG", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as info:
        main(
            [
                "distill",
                "--teacher",
                str(tiny_pipeline_dir),
                "--arch",
                "bk-tiny",
                "--data",
                str(empty),
                "-o",
                str(tmp_path / "run"),
            ]
        )
    assert info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: no images in") and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()


def _fail_writes_into(monkeypatch, fragment: str, writer: str) -> None:
    """Make the writes whose path holds ``fragment`` fail as on a full disk, as each writer reports it."""
    import safetensors.torch
    from safetensors import SafetensorError

    from distilsd.distill import checkpoint as ckpt

    real_torch_save, real_save_file = torch.save, safetensors.torch.save_file

    def torch_save(obj, path, *args, **kwargs):
        if fragment in str(path) and str(path).endswith("optimizer.pt"):
            Path(path).write_bytes(b"PK partial")
            if writer == "torch.save":  # torch's zip writer: a RuntimeError without errno
                monkeypatch.setattr(ckpt, "free_bytes", lambda folder: 0)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_torch_save(obj, path, *args, **kwargs)

    def save_file(tensors, path, *args, **kwargs):
        if fragment in str(path) and writer == "safetensors":
            Path(path).write_bytes(b"partial")
            raise SafetensorError(
                f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"'
            )
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("writer", ["safetensors", "torch.save", "OSError"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(
    tiny_pipeline_dir, shapes_dir, tmp_path, monkeypatch, run_cli, writer
):
    from distilsd.distill import checkpoint as ckpt

    monkeypatch.delenv("DISTILSD_DEBUG", raising=False)
    _fail_writes_into(monkeypatch, ".checkpoint-4.tmp", writer)
    run = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_pipeline_dir, shapes_dir, run, max_steps=6, checkpoint_every=2)
    with pytest.raises(
        OutputError,
        match=r"^could not save checkpoint 4: no space left on device; checkpoint 2 \(.*checkpoint-2\) is intact",
    ):
        _run(**overrides)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert ckpt.read_state(run / "checkpoints" / "checkpoint-2")["global_step"] == 2
    # The same through the CLI: one line, no traceback.
    args = ["distill", "--teacher", str(tiny_pipeline_dir), "--arch", "bk-tiny", "--data", str(shapes_dir),
            "--resolution", "64", "--batch-size", "2", "--max-steps", "4", "--checkpoint-every", "2",
            "--log-with", "csv", "--no-progress", "validation.prompts=[]", "data.cache_dir=" + str(tmp_path / "c"),
            "-o", str(tmp_path / "cli")]  # fmt: skip
    code, _, err = run_cli(args)
    assert code != 0 and "Traceback" not in err
    assert "\nerror: could not save checkpoint 4: no space left on device; checkpoint 2" in "\n" + err, err
    assert not list((tmp_path / "cli" / "checkpoints").glob(".*"))


def test_disk_full_while_writing_the_final_pipeline(tiny_pipeline_dir, shapes_dir, tmp_path, monkeypatch):
    from distilsd.distill import checkpoint as ckpt

    _fail_writes_into(monkeypatch, ".unet.tmp", "safetensors")
    run = tmp_path / "run"
    with pytest.raises(
        OutputError,
        match=r"could not write the final pipeline into .*: no space left on device; checkpoint 2 .* is intact",
    ):
        _run(**tiny_run_overrides(tiny_pipeline_dir, shapes_dir, run, max_steps=2, checkpoint_every=2))
    assert not list(run.glob(".*.tmp")) and not (run / "unet").exists()
    assert ckpt.read_state(run / "checkpoints" / "checkpoint-2")["global_step"] == 2


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_broken_checkpoints_are_named_skipped_by_latest_and_refused_by_path(
    tiny_pipeline_dir, shapes_dir, tmp_path, run_cli, caplog, monkeypatch
):
    import shutil

    from distilsd.distill import checkpoint as ckpt

    monkeypatch.delenv("DISTILSD_DEBUG", raising=False)
    run = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_pipeline_dir, shapes_dir, run, max_steps=4, checkpoint_every=2)
    _run(**overrides)
    for broken in ("unet/diffusion_pytorch_model.safetensors", "optimizer.pt", "trainer_state.json"):
        copy = tmp_path / f"copy-{broken.replace('/', '-')}"
        shutil.copytree(run, copy)
        _truncate(copy / "checkpoints" / "checkpoint-4" / broken)
        caplog.clear()
        with caplog.at_level("WARNING", logger="distilsd"):
            assert ckpt.find_checkpoint("latest", copy) == copy / "checkpoints" / "checkpoint-2"
        assert (
            f"checkpoint 4 is broken, skipped: {copy / 'checkpoints' / 'checkpoint-4' / broken}"
            in caplog.text
        )
        assert "resuming from checkpoint 2" in caplog.text
        with pytest.raises(InputError, match=f"the checkpoint is broken: .*checkpoint-4/{broken}"):
            ckpt.find_checkpoint(str(copy / "checkpoints" / "checkpoint-4"), copy)

    # Through the CLI: a broken optimizer state in the newest checkpoint and a stale temporary
    # folder of a killed save; the run continues from checkpoint 2 and rewrites checkpoint 4.
    _truncate(run / "checkpoints" / "checkpoint-4" / "optimizer.pt")
    (run / "checkpoints" / ".checkpoint-6.tmp" / "unet").mkdir(parents=True)
    args = ["distill", "--teacher", str(tiny_pipeline_dir), "--arch", "bk-tiny", "--data", str(shapes_dir),
            "--resolution", "64", "--batch-size", "2", "--lr", "1e-3", "--max-steps", "4", "--checkpoint-every", "2",
            "--log-with", "csv", "--no-progress", "validation.prompts=[]", f"data.cache_dir={tmp_path / 'latent-cache'}",
            "-o", str(run)]  # fmt: skip
    code, _, err = run_cli([*args, "--resume", str(run / "checkpoints" / "checkpoint-4")])
    assert code == 2 and "Traceback" not in err
    assert f"error: --resume {run / 'checkpoints' / 'checkpoint-4'}: the checkpoint is broken: " in err
    caplog.clear()
    with caplog.at_level("WARNING", logger="distilsd"):
        code, out, err = run_cli([*args, "--resume", "latest"])
    assert code == 0, err
    assert "checkpoint 4 is broken, skipped" in caplog.text and "trained 4 steps" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert ckpt.checkpoint_problem(run / "checkpoints" / "checkpoint-4") is None


def test_resume_latest_without_checkpoints_hints_what_works(tiny_pipeline_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match="no checkpoint in") as info:
        _run(**tiny_run_overrides(tiny_pipeline_dir, shapes_dir, run, resume="latest"))
    assert info.value.hint == "start without --resume"
    run.mkdir()
    (run / "notes.txt").write_text("an earlier run without checkpoints")
    with pytest.raises(InputError, match="no checkpoint in") as info:
        _run(**tiny_run_overrides(tiny_pipeline_dir, shapes_dir, run, resume="latest"))
    assert info.value.hint == "start over with --overwrite, or give a new -o folder"
    # The hint works: --overwrite starts over in that folder.
    assert (
        _run(**tiny_run_overrides(tiny_pipeline_dir, shapes_dir, run, max_steps=1, overwrite=True)).steps == 1
    )


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_loss_stops_naming_the_step_or_is_skipped(
    tiny_pipeline_dir, shapes_dir, tmp_path, monkeypatch, policy
):
    from distilsd.distill.trainer import Trainer, TrainingDivergedError

    real = Trainer.compute_loss

    def nan_at_step_3(self, batch, step, micro):
        terms = real(self, batch, step, micro)
        if step == 2:  # the third optimizer step
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(Trainer, "compute_loss", nan_at_step_3)
    run = tmp_path / "run"
    overrides = tiny_run_overrides(
        tiny_pipeline_dir, shapes_dir, run, max_steps=4, checkpoint_every=2, nan_policy=policy
    )
    if policy == "stop":
        with pytest.raises(
            TrainingDivergedError, match=r"not finite at step 3 .*last good checkpoint is .*checkpoint-2"
        ):
            _run(**overrides)
    else:
        summary = _run(**overrides)
        assert summary.steps == 4 and summary.skipped_steps == 1
        assert read_csv(run / "logs" / "train.csv")[-1]["skipped_steps"] == 1


@pytest.mark.slow
def test_two_processes_match_one_process_at_the_same_global_batch(tiny_pipeline_dir, shapes_dir, tmp_path):
    common = ["--teacher", str(tiny_pipeline_dir), "--arch", "bk-tiny", "--data", str(shapes_dir), "--resolution", "64", "--lr", "1e-3",
              "--max-steps", "3", "--grad-accum", "2", "--log-with", "csv", "--no-progress", "validation.prompts=[]"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "distilsd",
        "distill",
    ]
    result = subprocess.run(
        [*torchrun, *common, "--batch-size", "2", "-o", str(two)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _run(
        **tiny_run_overrides(
            tiny_pipeline_dir,
            shapes_dir,
            tmp_path / "one",
            max_steps=3,
            train_batch_size=4,
            gradient_accumulation_steps=2,
        )
    )
    one_rows, two_rows = (
        read_csv(tmp_path / "one" / "logs" / "train.csv"),
        read_csv(two / "logs" / "train.csv"),
    )
    assert len(two_rows) == 3
    for want, got in zip(one_rows, two_rows, strict=True):
        assert got["epoch"] == want["epoch"]
        for column in ("loss", "task", "out_kd", "feat_kd", "grad_norm"):
            assert got[column] == pytest.approx(want[column], rel=1e-4), (want["step"], column)
    assert (two / "model_index.json").is_file()


def test_multi_stage_recipe_from_one_yaml(tiny_pipeline_dir, shapes_dir, tmp_path):
    """OFA-style: plain training of the student, then KD from a teacher, each from the last."""
    import yaml
    from diffusers import UNet2DConditionModel

    from distilsd.cli import cli

    run = tmp_path / "run"
    recipe = tiny_run_overrides(
        tiny_pipeline_dir, shapes_dir, run, max_steps=2, model=str(tiny_pipeline_dir), optim={"ema": False}
    )
    nested: dict = {}
    for key, value in recipe.items():
        section, _, field = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[field] = value
    nested["stages"] = [
        {"name": "plain", "teacher": None, "loss": {"l_out": 0.0, "l_feat": 0.0}},
        {"name": "kd", "max_steps": 3},
    ]
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(yaml.safe_dump(nested))
    result = CliRunner().invoke(cli, ["distill", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    plain, kd = run / "stages" / "01-plain", run / "stages" / "02-kd"
    assert "out_kd" not in read_csv(plain / "logs" / "train.csv")[0]
    kd_rows = read_csv(kd / "logs" / "train.csv")
    assert len(kd_rows) == 3 and len([k for k in kd_rows[0] if k.startswith("feat/")]) == 6
    assert yaml.safe_load((kd / "config.yaml").read_text())["student"] == str(plain / "unet")
    # The run folder holds the last stage's pipeline.
    final = UNet2DConditionModel.from_pretrained(run, subfolder="unet")
    last = UNet2DConditionModel.from_pretrained(kd, subfolder="unet")
    assert all(
        torch.equal(a, b)
        for a, b in zip(final.state_dict().values(), last.state_dict().values(), strict=True)
    )
    # Run again with --resume: finished stages are skipped.
    result = CliRunner().invoke(cli, ["distill", "--config", str(config_file), "--resume", "latest"])
    assert result.exit_code == 0, result.output


def test_bench_train_prints_both_throughputs():
    from distilsd.cli import cli

    result = CliRunner().invoke(
        cli, ["bench-train", "--steps", "3", "--num-images", "16", "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.strip().startswith("samples/s"))
    uncached, cached = (float(x) for x in line.split()[1:])
    assert uncached > 0 and cached > 0
    assert "one-time cache build" in result.output


def test_pickle_only_models_are_refused_unless_allowed(
    tiny_pipeline_dir, pickle_only_pipeline_dir, shapes_dir, tmp_path
):
    from distilsd.errors import UnsafeCheckpointError

    pickled = str(pickle_only_pipeline_dir)
    for overrides in (
        {"teacher": pickled},  # distill --teacher
        {"student": pickled},  # distill --student
        {
            "teacher": None,
            "arch": None,
            "model": pickled,
            "loss.l_out": 0.0,
            "loss.l_feat": 0.0,
        },  # train --model
    ):
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        with pytest.raises(UnsafeCheckpointError, match="has only pickled weights"):
            _run(**{**tiny_run_overrides(tiny_pipeline_dir, shapes_dir, run, max_steps=1), **overrides})
        assert not run.exists()
    # The opt-in, as in `compress --allow-pickle`: the config key (and the --allow-pickle flag).
    run = tmp_path / "allowed"
    summary = _run(
        **tiny_run_overrides(pickle_only_pipeline_dir, shapes_dir, run, max_steps=1, allow_pickle=True)
    )
    assert summary.steps == 1


def test_a_file_given_as_a_model_is_a_path_not_a_hub_id(tiny_pipeline_dir, shapes_dir, tmp_path, run_cli):
    from distilsd.errors import ModelLoadError

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not a pipeline")
    with pytest.raises(ModelLoadError, match=r"model.ckpt is a file, expected a pipeline folder"):
        _run(**tiny_run_overrides(checkpoint, shapes_dir, tmp_path / "run"))
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    code, _, err = run_cli(["generate", "x", "-m", str(truncated), "-o", str(tmp_path / "out")])
    assert code == 2 and "is not a readable .safetensors checkpoint" in err, err


def test_a_model_stored_in_fp16_trains_exactly_like_its_fp32_copy(tiny_pipeline_dir, shapes_dir, tmp_path):
    """The text encoder, VAE and teacher run in the training precision (fp32 here), not in the
    dtype their weights were stored in; so do the cached embeddings."""
    import shutil

    from safetensors.torch import load_file, save_file

    def copy_as(dtypes, name):
        folder = tmp_path / name
        shutil.copytree(tiny_pipeline_dir, folder)
        for path in folder.rglob("*.safetensors"):
            tensors = {k: v.to(torch.float16).to(dtypes) for k, v in load_file(str(path)).items()}
            save_file(tensors, str(path), metadata={"format": "pt"})
        return folder

    half, full = copy_as(torch.float16, "fp16"), copy_as(torch.float32, "fp32")  # same values
    losses = []
    for teacher, cached in ((half, False), (full, False), (half, True)):
        run = tmp_path / f"run-{teacher.name}-{cached}"
        _run(**tiny_run_overrides(teacher, shapes_dir, run, max_steps=3, data={"cache_latents": cached}))
        losses.append(
            [
                (row["loss"], row["task"], row["out_kd"], row["feat_kd"])
                for row in read_csv(run / "logs" / "train.csv")
            ]
        )
    assert losses[0] == losses[1]
    assert [v for row in losses[2] for v in row] == pytest.approx(
        [v for row in losses[1] for v in row], rel=1e-5
    )


def test_a_run_on_a_builtin_model_resumes_by_name(shapes_dir, tmp_path):
    """Checkpoints record a built-in name's folder; the resume check compares it with the name resolved
    the same way (it compared 'shapes-tiny' with the folder and refused)."""
    run = tmp_path / "run"
    common = dict(model="shapes-tiny", checkpoint_every=1, optim={"ema": False})
    _run(**tiny_run_overrides(None, shapes_dir, run, max_steps=1, **common))
    assert (
        _run(**tiny_run_overrides(None, shapes_dir, run, max_steps=2, resume="latest", **common)).steps == 2
    )


def test_a_kd_student_keeps_its_compression_record_for_lora_transfer(tiny_pipeline_dir, shapes_dir, tmp_path):
    """A student built by `distill --arch` records which teacher tensor each of its tensors came
    from, as `distilsd compress` does, so a teacher's LoRA can be carried over to it."""
    from diffusers import UNet2DConditionModel

    from distilsd.compress import build_student, get_layout
    from distilsd.lora.transfer import transfer_lora
    from distilsd.testing import save_random_lora

    run = tmp_path / "run"
    _run(**tiny_run_overrides(tiny_pipeline_dir, shapes_dir, run, max_steps=1))
    record = json.loads((run / "unet" / "distilsd_compress.json").read_text())
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    _, mapping = build_student(teacher, get_layout("bk-tiny", teacher.config), init="teacher")
    assert record["arch"] == "bk-tiny" and record["mapping"] == mapping
    lora = save_random_lora(tiny_pipeline_dir, tmp_path / "teacher-lora.safetensors")
    report = transfer_lora(lora, run, tmp_path / "moved")
    assert report.kept_modules > 0 and report.dropped_modules > 0
    # A student trained further from this one (--student) keeps the record.
    again = tmp_path / "again"
    _run(**tiny_run_overrides(tiny_pipeline_dir, shapes_dir, again, max_steps=1, arch=None, student=str(run)))
    assert json.loads((again / "unet" / "distilsd_compress.json").read_text())["mapping"] == mapping
