"""Shared fixtures: tiny SD pipelines saved in plain diffusers format, built once per session."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The tests run tiny models, for which one thread is fastest: more threads mostly spin-wait,
# badly so on a shared 2-core machine. Set before torch starts (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test runs torch on one thread, and the count it found is put back afterwards.

    One thread is fastest for the tiny models, and in-process images are then bit-identical to
    those of launched processes (OMP_NUM_THREADS=1). Per test, because code under test may set
    its own count (serve's ``torch_threads``); restoring it keeps that from leaking into the
    next test and into module fixtures, which start from OMP_NUM_THREADS above.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def bench_workers_fork():
    """`distilsd bench` workers fork from a forkserver in the tests: each configuration then starts
    without importing torch and diffusers again (~8 s each). The tests check no RAM values, the one
    thing forked workers read differently; one test runs the default (spawn) explicitly."""
    from distilsd.evaluate import bench

    default, bench.DEFAULT_WORKER_START = bench.DEFAULT_WORKER_START, "forkserver"
    yield
    bench.DEFAULT_WORKER_START = default


@pytest.fixture
def bench_scratch_folders(monkeypatch):
    """The scratch folders `distilsd bench` makes for its workers in this test, recorded as made
    (by name: multiprocessing makes its own there too), to check they are gone afterwards."""
    import tempfile
    from pathlib import Path

    folders: list[Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        folder = real_mkdtemp(*args, **kwargs)
        if Path(folder).name.startswith("distilsd-bench-"):
            folders.append(Path(folder))
        return folder

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    return folders


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny SD v1-topology pipeline folder (random weights, real tokenizer, no safety checker)."""
    from distilsd.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_pipeline_with_checker_dir(tmp_path_factory):
    """Like tiny_pipeline_dir, with a (random, never-flagging) safety checker."""
    from distilsd.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-checker") / "pipeline", safety_checker=True)


@pytest.fixture(scope="session")
def pickle_only_pipeline_dir(tmp_path_factory, tiny_pipeline_dir):
    """The tiny pipeline with every weight file re-saved as a pickle (.bin) and no safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("tiny-sd-pickle") / "pipeline"
    shutil.copytree(tiny_pipeline_dir, folder)
    for path in list(folder.rglob("*.safetensors")):
        name = "pytorch_model.bin" if path.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(str(path)), path.parent / name)
        path.unlink()
    return folder


@pytest.fixture(scope="session")
def tiny_v2_pipeline_dir(tmp_path_factory):
    """A tiny SD v2-topology pipeline (linear projection, per-block heads, v-prediction)."""
    from distilsd.testing import save_tiny_pipeline

    return save_tiny_pipeline(
        tmp_path_factory.mktemp("tiny-sd2") / "pipeline", sd_version=2, cross_attention_dim=48
    )


@pytest.fixture
def run_cli(capsys):
    """Run the distilsd CLI in-process: ``run_cli(args) -> (exit code, stdout, stderr)``."""
    from distilsd.cli import main

    def run(args: list[str]) -> tuple[int, str, str]:
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def expect_cli_error(run_cli):
    """``expect_cli_error(args, *fragments)``: a non-zero exit with one ``error:`` line holding every fragment."""

    def expect(args: list[str], *fragments: str) -> str:
        code, out, err = run_cli(args)
        assert code != 0, out
        assert "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
        for fragment in fragments:
            assert fragment in err, err
        return err

    return expect
