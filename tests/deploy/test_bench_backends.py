"""``distilsd bench --backend openvino,onnx``: exported runtimes measured beside PyTorch."""

from __future__ import annotations

import pytest


def test_bench_compares_exported_backends_with_pytorch(tiny_pipeline_dir, bench_scratch_folders):
    from distilsd.evaluate.bench import BenchSettings, markdown_table, run_benchmark

    # Each worker's exports go to a temporary folder of the parent's, which must be gone
    # afterwards (before, each bench run with an exported backend left its exports in /tmp).
    settings = BenchSettings(
        models=[str(tiny_pipeline_dir)],
        backends=["pytorch", "openvino", "onnx"],
        resolutions=[64],
        components=["unet", "pipeline"],
        steps=2,
        warmup=1,
        repeats=1,
        device="cpu",
    )
    results = run_benchmark(settings)
    rows = {row["backend"]: row for row in results["rows"]}
    assert set(rows) == {"pytorch", "openvino", "onnx"}
    base = rows["pytorch"]["median_seconds"]
    for backend in ("openvino", "onnx"):
        row = rows[backend]
        # Sizes are taken before the exported backend drops the PyTorch modules.
        assert row["unet_params"] == rows["pytorch"]["unet_params"] > 0
        assert set(row["median_seconds"]) == {"unet", "pipeline"}
        assert row["speedup_vs_baseline"]["unet"] == pytest.approx(
            base["unet"] / row["median_seconds"]["unet"]
        )
        assert row["peak_ram_gib"] > 0
    assert "vs " in markdown_table(results, settings) and "pytorch fp32" in markdown_table(results, settings)
    assert len(bench_scratch_folders) == 3 and not any(folder.exists() for folder in bench_scratch_folders)
