"""scripts/profile_openvino.py reads OpenVINO's per-node counters of a real export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "profile_openvino.py"


def test_profile_names_the_kernels_of_an_export(openvino_export, tmp_path):
    report = tmp_path / "profile.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(openvino_export), "--precision", "fp32", "--repeats", "2", "--json", str(report)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (profile,) = json.loads(report.read_text())
    kinds = {row["node_type"] for row in profile["kinds"]}
    assert "Convolution" in kinds  # the U-Net's convolutions ran, each under a named kernel
    assert all(row["exec_type"] and row["seconds"] >= 0 for row in profile["kinds"])
    assert profile["inference_precision"] == "fp32" and profile["export_precision"] == "fp32"
    assert "Convolution" in run.stdout and "s/call" in run.stdout


def test_profile_refuses_a_folder_that_is_not_an_export(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "not a distilsd export folder" in run.stderr and "Traceback" not in run.stderr
