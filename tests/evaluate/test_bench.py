"""``distilsd bench`` on the tiny pipeline, and model specs of architecture-only models."""

from __future__ import annotations

import json
import os

import pytest

from distilsd.errors import InputError
from distilsd.evaluate import bench

from .test_cli_eval import expect_error, run_cli


def test_model_names():
    assert bench.parse_model("sd-v1") == bench.ModelSpec("sd-v1", architecture="sd-v1")
    assert bench.parse_model("bk-tiny") == bench.ModelSpec("bk-tiny", architecture="sd-v1", layout="bk-tiny")
    assert bench.parse_model("sd-v2:bk-sdm-small") == bench.ModelSpec(
        "sd-v2:bk-sdm-small", architecture="sd-v2", layout="bk-small"
    )
    assert bench.parse_model("path/to/pipeline") == bench.ModelSpec(
        "path/to/pipeline", source="path/to/pipeline"
    )
    with pytest.raises(InputError, match="unknown student layout 'bk-huge'"):
        bench.parse_model("sd-v1:bk-huge")


def test_architecture_only_students_have_the_published_sizes():
    from distilsd.compress.analysis import count_parameters
    from distilsd.compress.teacher import empty_unet
    from distilsd.models import architecture_configs

    # BK-SDM's U-Net parameter counts (the reference table), built on the meta device.
    expected = {"sd-v1": 859_520_964, "bk-base": 579_384_964, "bk-small": 482_346_884, "bk-tiny": 323_384_964}
    for name, params in expected.items():
        config = architecture_configs(bench.parse_model(name).name)["unet"]
        assert count_parameters(empty_unet(config)) == params, name


def test_bad_bench_input(capsys, tiny_pipeline_dir):
    expect_error(
        ["bench", "-m", "sd-v1", "--baseline", "bk-tiny"],
        capsys,
        "baseline 'bk-tiny' is not one of the models",
    )
    expect_error(
        ["bench", "-m", "sd-v1", "--backend", "no-such-backend"],
        capsys,
        "unknown backend 'no-such-backend'",
        "pytorch",
    )
    expect_error(["bench", "-m", "sd-v1", "-r", "500"], capsys, "multiple of 8")
    with pytest.raises(InputError, match="unknown worker start 'fork'"):
        bench.BenchSettings(models=["sd-v1"], worker_start="fork").validate()
    expect_error(["bench", "-m", "sd-v1", "-c", "unet,safety"], capsys, "unknown component 'safety'")


@pytest.mark.slow
def test_bench_on_the_tiny_pipeline_writes_json_markdown_and_chart(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code, stdout, stderr = run_cli(
        [
            "bench",
            "-m",
            str(tiny_pipeline_dir),
            "-r",
            "64",
            "-c",
            "text_encoder,unet,vae_decode,pipeline",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--device",
            "cpu",
            "--worker-start",
            "spawn",  # the default, which the other bench tests leave for forkserver (tests/conftest.py)
            "-o",
            str(out),
        ],
        capsys,
    )
    assert code == 0, stderr
    assert stdout.startswith("| model | dtype | backend | px | text enc. (s) |")
    assert stdout == (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "bench.json").read_text())
    assert record["kind"] == "bench" and record["hardware"]["cpu"] and record["versions"]["diffusers"]
    (row,) = record["results"]["rows"]
    assert row["dtype"] == "fp32" and row["resolution"] == 64 and row["weights"] == "real"
    assert {name: len(values) for name, values in row["times_seconds"].items()} == {
        "text_encoder": 2,
        "unet": 2,
        "vae_decode": 2,
        "pipeline": 2,
    }
    medians = row["median_seconds"]
    assert row["end_to_end_estimate_seconds"] == pytest.approx(
        medians["text_encoder"] + 2 * medians["unet"] + medians["vae_decode"]
    )
    assert row["images_per_minute"] == pytest.approx(60 / medians["pipeline"])
    assert row["speedup_vs_baseline"]["unet"] == pytest.approx(1.0)  # the only model is the baseline
    assert row["peak_ram_gib"] > 0.1 and row["unet_params"] > 0 and row["unet_gmacs"] > 0


def test_bench_reports_each_finished_group(tiny_pipeline_dir):
    """With --max-workers, results so far are handed out after every group but the last."""
    from distilsd.evaluate.bench import BenchSettings, run_benchmark

    settings = BenchSettings(
        models=[str(tiny_pipeline_dir), "tiny-random"],
        resolutions=[64],
        components=["unet"],
        warmup=0,
        repeats=1,
        device="cpu",
        max_workers=1,
    )
    partials = []
    results = run_benchmark(settings, on_group_done=partials.append)
    assert len(partials) == 1 and partials[0]["complete"] is False
    assert [row["model"] for row in partials[0]["rows"]] == [results["rows"][0]["model"]]
    assert results["complete"] is True and len(results["rows"]) == 2


def test_speedups_are_against_the_baseline_on_the_first_backend_and_dtype(tiny_pipeline_dir):
    """A bf16 (or OpenVINO) row shows its gain over the baseline's fp32 PyTorch row, not over itself."""
    from distilsd.evaluate.bench import BenchSettings, markdown_table, run_benchmark

    settings = BenchSettings(
        models=[str(tiny_pipeline_dir)],
        dtypes=["fp32", "bf16"],
        resolutions=[64],
        components=["unet"],
        warmup=0,
        repeats=1,
        device="cpu",
    )
    results = run_benchmark(settings)
    fp32, bf16 = results["rows"]
    assert (fp32["dtype"], bf16["dtype"]) == ("fp32", "bf16")
    assert fp32["speedup_vs_baseline"]["unet"] == pytest.approx(1.0)
    assert bf16["speedup_vs_baseline"]["unet"] == pytest.approx(
        fp32["median_seconds"]["unet"] / bf16["median_seconds"]["unet"]
    )
    assert f"vs {settings.baseline} pytorch fp32" in markdown_table(results, settings).splitlines()[0]


def test_a_worker_that_dies_costs_only_its_own_configuration(tiny_pipeline_dir, bench_scratch_folders):
    """Killed mid-run (as the OOM killer does), one worker is reported; the others are measured.
    Neither leaves its temporary folder behind (the parent removes it, killed or not)."""
    import psutil

    from distilsd.evaluate.bench import BenchSettings, markdown_table, run_benchmark

    settings = BenchSettings(
        models=[str(tiny_pipeline_dir), "tiny-random"],
        resolutions=[64],
        components=["unet"],
        warmup=1,
        repeats=2,
        device="cpu",
    )

    def kill_the_second_worker(line: str) -> None:
        if line.startswith("round 2/"):
            # Spawned workers are children of this process; forked ones, of the forkserver (its child).
            workers = [
                p
                for p in psutil.Process().children(recursive=True)
                if p.ppid() != os.getpid() or "spawn_main" in " ".join(p.cmdline())
            ]
            sorted(workers, key=lambda p: p.create_time())[1].kill()

    results = run_benchmark(settings, progress=kill_the_second_worker)
    assert [row["model"] for row in results["rows"]] == [settings.baseline]
    assert len(results["rows"][0]["times_seconds"]["unet"]) == 2
    (label,) = results["failed"]
    assert "tiny-random" in label and "died" in results["failed"][label]
    assert "Not measured (the worker died" in markdown_table(results, settings)
    assert len(bench_scratch_folders) == 2 and not any(folder.exists() for folder in bench_scratch_folders)


def test_bad_rows(capsys):
    expect_error(["bench", "--row", "sd-v1 stepz=4"], capsys, "'stepz=4' is not key=value")
    expect_error(["bench", "--row", "sd-v1 guidance=lcm"], capsys, "guidance must be one of cfg, none, embedded")
    expect_error(["bench", "--row", "sd-v1 steps=0"], capsys, "steps must be a whole number >= 1")
    expect_error(
        ["bench", "--row", "sd-v1 deepcache=3 backend=openvino-int8"],
        capsys,
        "deepcache needs backend=pytorch",
    )
    expect_error(["bench", "--row", "sd-v1", "--row", "sd-v1 steps=25"], capsys, "given twice")


@pytest.mark.slow
def test_rows_differ_in_steps_guidance_and_decoder(tiny_pipeline_dir, tmp_path):
    """Each row runs its own steps, U-Net batch and decoder; the whole image is measured beside the parts."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from distilsd.evaluate.bench import BenchSettings, markdown_table, run_benchmark
    from distilsd.tiny_vae import random_tiny_vae

    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir, subfolder="vae")
    tiny_folder = tmp_path / "tiny"
    random_tiny_vae(vae).save_pretrained(tiny_folder)
    model = str(tiny_pipeline_dir)
    settings = BenchSettings(
        models=[],
        rows=[f"{model} steps=4", f"{model} steps=2 guidance=none decoder={tiny_folder} deepcache=2"],
        resolutions=[64],
        components=["text_encoder", "unet", "vae_decode", "pipeline"],
        warmup=0,
        repeats=1,
        device="cpu",
    )
    results = run_benchmark(settings)
    full, fast = results["rows"]
    assert (full["steps"], full["batch_size"], full["decoder"]) == (4, 2, "full")
    assert (fast["steps"], fast["batch_size"], fast["deepcache"]) == (2, 1, 2)
    # The tiny decoder was swapped in.
    assert fast["params"]["vae"] == sum(
        p.numel() for p in AutoencoderTiny.from_pretrained(tiny_folder).parameters()
    )
    assert fast["end_to_end_estimate_seconds"] == pytest.approx(
        sum(fast["median_seconds"][c] for c in ("text_encoder", "vae_decode"))
        + 2 * fast["median_seconds"]["unet"]
    )
    assert fast["speedup_vs_baseline"]["pipeline"] == pytest.approx(
        full["median_seconds"]["pipeline"] / fast["median_seconds"]["pipeline"]
    )
    table = markdown_table(results, settings)
    assert "| steps | guidance | decoder | deepcache | tome |" in table and "whole image, measured (s)" in table
    assert f"Baseline: {model} fp32 pytorch steps=4 guidance=cfg." in table


@pytest.mark.slow  # one ONNX export of a tiny random model
def test_guidance_embedded_rows_run_an_lcm_student():
    """guidance=embedded: batch 1, a guidance-embedding U-Net and LCMScheduler, also exported."""
    from distilsd.evaluate.bench import BenchSettings, run_benchmark

    settings = BenchSettings(
        models=[],
        rows=["tiny-random steps=2 guidance=embedded", "tiny-random steps=2 guidance=embedded backend=onnx"],
        resolutions=[64],
        components=["text_encoder", "unet", "vae_decode", "pipeline"],
        warmup=0,
        repeats=1,
        device="cpu",
    )
    results = run_benchmark(settings)
    assert not results.get("failed"), results.get("failed")
    torch_row, onnx_row = results["rows"]
    for row in (torch_row, onnx_row):
        assert (row["steps"], row["batch_size"], row["guidance"]) == (2, 1, "embedded")
        assert row["median_seconds"]["pipeline"] > 0
    # tiny-random's U-Net has no guidance embedding: a random projection is added (speed only).
    plain = run_benchmark(BenchSettings(models=[], rows=["tiny-random steps=2 guidance=none"], resolutions=[64],
                                        components=["unet"], warmup=0, repeats=1, device="cpu"))  # fmt: skip
    assert torch_row["params"]["unet"] > plain["rows"][0]["params"]["unet"]


def test_an_lcm_model_is_benched_at_its_own_steps_with_embedded_guidance():
    """shapes-tiny-lcm: 4 steps and one U-Net batch (guidance as an embedding) unless --steps / --batch-size / a row say otherwise."""
    from distilsd.evaluate.bench import BenchSettings, markdown_table, run_benchmark

    def planned(**options):
        settings = BenchSettings(**options)
        return [(c.model.name, c.num_steps(settings), c.batch_size(settings)) for c in settings.validate()]

    assert planned(models=["shapes-tiny-lcm", "shapes-tiny", "bk-tiny"]) == [
        ("shapes-tiny-lcm", 4, 1), ("shapes-tiny", 25, 2), ("bk-tiny", 25, 2),
    ]  # fmt: skip
    assert planned(models=["shapes-tiny-lcm"], steps=8) == [("shapes-tiny-lcm", 8, 1)]
    assert planned(models=["shapes-tiny-lcm"], batch_size=2) == [("shapes-tiny-lcm", 4, 2)]
    assert planned(models=[], rows=["shapes-tiny-lcm", "shapes-tiny-lcm steps=8 guidance=cfg"]) == [
        ("shapes-tiny-lcm", 4, 1), ("shapes-tiny-lcm", 8, 2),
    ]  # fmt: skip

    settings = BenchSettings(models=["shapes-tiny-lcm"], resolutions=[64], components=["text_encoder", "unet", "vae_decode"],
                             warmup=0, repeats=1, device="cpu")  # fmt: skip
    results = run_benchmark(settings)
    (row,) = results["rows"]
    assert (row["steps"], row["batch_size"], row["guidance"]) == (4, 1, "embedded")
    medians = row["median_seconds"]
    estimate = medians["text_encoder"] + 4 * medians["unet"] + medians["vae_decode"]
    assert row["end_to_end_estimate_seconds"] == pytest.approx(estimate)
    assert "| steps | guidance |" in markdown_table(results, settings)
