"""Where an exported OpenVINO model spends its time, per operation type and kernel.

Compiles one component of a ``distilsd export`` folder (the U-Net by default) with
OpenVINO's per-node performance counters, runs it on random inputs of the export's static
shapes, and prints the time per operation type split by the kernel OpenVINO chose
(``exec_type``: e.g. ``brgconv_avx512_amx_I8`` for an int8 AMX convolution, ``..._bf16`` for
bf16), so two exports (int8 against bf16) show which layers ran in which precision and where
the difference comes from.

    python scripts/profile_openvino.py exported/ov-int8 exported/ov-bf16 --repeats 3

The precision hint is the one ``generate`` would use for the folder (bf16 where the CPU has
it, for int8 and bf16 exports); ``--precision`` overrides it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def _random_inputs(compiled) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for port in compiled.inputs:
        shape = [int(d) for d in port.get_shape()]
        element = port.get_element_type().to_dtype()
        name = port.get_any_name()
        if np.issubdtype(element, np.integer):
            feeds[name] = np.zeros(shape, dtype=element)
        elif name == "timestep":
            feeds[name] = np.full(shape, 500.0, dtype=element)
        else:
            feeds[name] = rng.standard_normal(shape).astype(element)
    return feeds


def profile_model(model_file: Path, hint: str, repeats: int) -> dict:
    """Time per (operation type, kernel) of one OpenVINO IR, averaged over ``repeats`` calls."""
    import openvino as ov

    from distilsd.deploy.runtime import _OPENVINO_HINTS

    compiled = ov.Core().compile_model(
        str(model_file), "CPU", {"INFERENCE_PRECISION_HINT": _OPENVINO_HINTS[hint], "PERF_COUNT": True}
    )
    request = compiled.create_infer_request()
    feeds = _random_inputs(compiled)
    request.infer(feeds)  # first call: kernels compiled, not counted
    per_kind: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        request.infer(feeds)
        walls.append(time.perf_counter() - started)
        for info in request.get_profiling_info():
            if info.status != info.Status.EXECUTED:
                continue
            kind = per_kind[(info.node_type, info.exec_type)]
            kind[0] += info.real_time.total_seconds() / repeats
            kind[1] += 1 / repeats
    return {
        "model_file": str(model_file),
        "inference_precision": hint,
        "wall_seconds_median": float(np.median(walls)),
        "kinds": sorted(
            (
                {"node_type": t, "exec_type": e, "seconds": s, "nodes": round(n)}
                for (t, e), (s, n) in per_kind.items()
            ),
            key=lambda row: -row["seconds"],
        ),
    }


def print_profile(result: dict, title: str, top: int) -> None:
    total = sum(row["seconds"] for row in result["kinds"])
    print(
        f"\n{title}: {result['inference_precision']} hint, one call {result['wall_seconds_median']:.3f} s "
        f"(median; per-node counters sum to {total:.3f} s)"
    )
    print(f"{'node type':<28} {'kernel (exec_type)':<36} {'nodes':>5} {'s/call':>8} {'share':>6}")
    for row in result["kinds"][:top]:
        print(
            f"{row['node_type']:<28} {row['exec_type']:<36} {row['nodes']:>5} "
            f"{row['seconds']:>8.3f} {row['seconds'] / total:>6.1%}"
        )


def profile_export(folder: Path, component: str, precision: str | None, repeats: int) -> dict:
    """:func:`profile_model` on one component of a ``distilsd export`` folder, at the precision ``generate`` uses."""
    from distilsd.deploy.runtime import resolve_inference_precision

    manifest = json.loads((folder / "distilsd-export.json").read_text())
    hint = precision or resolve_inference_precision(manifest["precision"], "openvino", warn=False)
    result = profile_model(folder / manifest["components"][component]["model_file"], hint, repeats)
    return {"folder": str(folder), "export_precision": manifest["precision"], **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="distilsd export folders (OpenVINO)")
    parser.add_argument("--component", default="unet")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], help="runtime precision hint (default: the folder's)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="rows per folder")
    parser.add_argument("--json", type=Path, help="also write the full profiles here")
    args = parser.parse_args(argv)
    results = []
    for folder in args.folders:
        if not (folder / "distilsd-export.json").is_file():
            print(
                f"error: {folder} is not a distilsd export folder (no distilsd-export.json)", file=sys.stderr
            )
            return 2
        result = profile_export(folder, args.component, args.precision, args.repeats)
        results.append(result)
        print_profile(result, f"{folder} ({result['export_precision']} export, {args.component})", args.top)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
