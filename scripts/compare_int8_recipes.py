"""Why an int8 U-Net is faster or slower than bf16 on this CPU: NNCF recipes side by side.

For each model (architecture names, random weights: speed does not depend on them), the
U-Net is exported once in fp32 (OpenVINO IR), its inputs are recorded once from the PyTorch
pipeline (as ``distilsd export --precision int8`` does), and the IR is quantized with each
recipe:

- ``all``: what ``distilsd export --precision int8`` does (with the bench's quick
  calibration): every Convolution and MatMul quantized (weights and activations), and the
  attention's query, key and value;
- ``attention-bf16``: the same but the attention (OpenVINO's ScaledDotProductAttention op,
  which the export keeps whole) left out: its inputs stay in the runtime precision;
- ``conv``: Convolutions only;
- ``full``: ``all`` with the calibration ``distilsd export --precision int8`` does by
  default (SmoothQuant and fast bias correction); the other recipes use the bench's quick one.

Then one call of each U-Net (bf16 runtime precision where the CPU has it, as ``generate``
runs int8 exports) is timed round-robin with the fp32 IR run in bf16, ``--repeats`` times,
so drift in machine speed hits all alike; a median and a 95% bootstrap interval of the
per-round ratio to bf16 are printed, and with ``--profile`` each model's time per operation
type and kernel (scripts/profile_openvino.py).

    python scripts/compare_int8_recipes.py --models sd-v1,bk-tiny --size 512 -o runs/int8-recipes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RECIPES = ("all", "attention-bf16", "conv", "full")


def quantize(ov_model, samples, recipe: str):
    import nncf

    if recipe in ("all", "full"):
        ignored = None
    elif recipe == "attention-bf16":
        ignored = nncf.IgnoredScope(types=["ScaledDotProductAttention"])
    elif recipe == "conv":
        ignored = nncf.IgnoredScope(types=["MatMul"])
    else:
        raise ValueError(recipe)
    if recipe == "full":
        return nncf.quantize(
            ov_model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
            fast_bias_correction=True,
        )  # fmt: skip
    # The bench's quick calibration (distilsd.evaluate.bench_backends): speed does not
    # depend on calibration quality.
    return nncf.quantize(
        ov_model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
        fast_bias_correction=True, ignored_scope=ignored,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            disable_bias_correction=True,
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
        ),
    )  # fmt: skip


def prepare(model_name: str, size: int, out: Path, recipes: list[str]) -> dict[str, Path]:
    """{variant: U-Net IR}: the fp32 export's U-Net and one int8 U-Net per recipe."""
    import openvino as ov

    from distilsd.deploy.export import ExportSettings, export_pipeline
    from distilsd.deploy.quantize import DEFAULT_CALIBRATION_PROMPTS, _replace_model, collect_unet_inputs
    from distilsd.models import random_pipeline

    folder = out / f"{model_name.replace(':', '-')}-{size}"
    files = {"bf16": folder / "fp32" / "unet" / "openvino_model.xml"}
    if not (folder / "fp32" / "distilsd-export.json").is_file():
        pipe = random_pipeline(model_name)
        settings = ExportSettings(precision="fp32", width=size, height=size, vae_encoder=False)
        export_pipeline(pipe, folder / "fp32", settings, {"name": model_name}, overwrite=True)
        manifest = json.loads((folder / "fp32" / "distilsd-export.json").read_text())
        files["bf16"] = folder / "fp32" / manifest["components"]["unet"]["model_file"]
        started = time.perf_counter()
        samples = collect_unet_inputs(pipe, DEFAULT_CALIBRATION_PROMPTS[:4], 1, 5, size, size)
        print(
            f"{model_name}: {len(samples)} calibration samples in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        np.savez(
            folder / "samples.npz", **{f"{i}:{k}": v for i, s in enumerate(samples) for k, v in s.items()}
        )
        del pipe
    manifest = json.loads((folder / "fp32" / "distilsd-export.json").read_text())
    files["bf16"] = folder / "fp32" / manifest["components"]["unet"]["model_file"]
    stored = np.load(folder / "samples.npz")
    count = 1 + max(int(key.split(":")[0]) for key in stored.files)
    samples = [
        {k.split(":")[1]: stored[k] for k in stored.files if k.startswith(f"{i}:")} for i in range(count)
    ]
    core = ov.Core()
    for recipe in recipes:
        target = folder / f"int8-{recipe}" / "unet.xml"
        files[f"int8-{recipe}"] = target
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        ov_model = core.read_model(str(files["bf16"]))
        quantized = quantize(ov_model, samples, recipe)
        _replace_model(ov, quantized, target)
        print(f"{model_name}: int8 recipe '{recipe}' in {time.perf_counter() - started:.0f} s", flush=True)
    return files


def time_round_robin(files: dict[str, Path], repeats: int, hint: str) -> dict[str, list[float]]:
    import openvino as ov

    sys.path.insert(0, str(Path(__file__).parent))
    from profile_openvino import _random_inputs

    core = ov.Core()
    requests = {}
    for variant, path in files.items():
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
        request = compiled.create_infer_request()
        feeds = _random_inputs(compiled)
        request.infer(feeds)  # warm-up: kernels built
        requests[variant] = (request, feeds)
    seconds: dict[str, list[float]] = {variant: [] for variant in files}
    for _ in range(repeats):
        for variant, (request, feeds) in requests.items():
            started = time.perf_counter()
            request.infer(feeds)
            seconds[variant].append(time.perf_counter() - started)
    return seconds


def ratio_interval(base: list[float], other: list[float], draws: int = 10000) -> tuple[float, float, float]:
    """Median of per-round ratios base/other and a 95% bootstrap interval (rounds resampled)."""
    ratios = np.array(base) / np.array(other)
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(ratios, size=(draws, len(ratios))), axis=1)
    return float(np.median(ratios)), float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd-v1,bk-tiny")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)

    from distilsd.deploy.runtime import cpu_supports_bf16

    hint = "bf16" if cpu_supports_bf16() else "f32"
    recipes = args.recipes.split(",")
    report = {"runtime_precision": hint, "models": {}}
    for model_name in args.models.split(","):
        files = prepare(model_name, args.size, args.output, recipes)
        seconds = time_round_robin(files, args.repeats, hint)
        rows = {}
        for variant, values in seconds.items():
            median, low, high = ratio_interval(seconds["bf16"], values)
            rows[variant] = {
                "seconds": values,
                "median_s": float(np.median(values)),
                "vs_bf16": [median, low, high],
            }
            print(
                f"{model_name} {args.size} px U-Net batch 2, {variant:<13} {np.median(values):7.3f} s/call "
                f"(median of {args.repeats}), vs bf16 {median:.2f}x [{low:.2f}, {high:.2f}]",
                flush=True,
            )
        report["models"][model_name] = rows
        if args.profile:
            sys.path.insert(0, str(Path(__file__).parent))
            from profile_openvino import print_profile, profile_model

            for variant, path in files.items():
                profile = profile_model(path, "bf16" if hint == "bf16" else "fp32", 3)
                rows[variant]["profile"] = profile
                print_profile(profile, f"{model_name} {variant}", 12)
    (args.output / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
