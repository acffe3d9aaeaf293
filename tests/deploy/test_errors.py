"""Bad input: partial exports, other sizes, missing runtimes, CPUs without bf16."""

from __future__ import annotations

import builtins
import shutil

import pytest
import torch


def test_folder_without_manifest_is_refused(openvino_export, tmp_path):
    from distilsd.deploy import MANIFEST_NAME, exported_pipeline
    from distilsd.errors import ModelLoadError

    partial = tmp_path / "partial"
    shutil.copytree(openvino_export, partial)
    (partial / MANIFEST_NAME).unlink()
    with pytest.raises(ModelLoadError, match="did not finish"):
        exported_pipeline(partial)


def test_truncated_component_is_refused(openvino_export, tmp_path):
    from distilsd.deploy import load_exported_pipeline
    from distilsd.errors import ModelLoadError

    damaged = tmp_path / "damaged"
    shutil.copytree(openvino_export, damaged)
    weights = damaged / "unet" / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="incomplete or damaged"):
        load_exported_pipeline(damaged)


def test_other_size_than_exported_is_refused(openvino_export):
    from distilsd.deploy import exported_pipeline, load_exported_pipeline
    from distilsd.errors import InputError

    with pytest.raises(InputError, match="static shapes for 64x64 px, not 128x64"):
        load_exported_pipeline(openvino_export, width=128)
    # Called directly, the pipeline refuses it at the first component that sees the size.
    pipe = exported_pipeline(openvino_export)
    with pytest.raises(InputError, match="static shapes"):
        pipe(
            "a red circle",
            height=128,
            width=128,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(0),
        )


def test_export_refuses_a_non_empty_output(tiny_pipeline_dir, tmp_path):
    from distilsd.deploy import ExportSettings, export_model
    from distilsd.errors import OutputError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        export_model(str(tiny_pipeline_dir), tmp_path / "out", ExportSettings(format="onnx"))


@pytest.mark.parametrize(
    ("package", "fmt"), [("openvino", "openvino"), ("onnxruntime", "onnx"), ("nncf", "openvino")]
)
def test_missing_runtime_names_the_extra(package, fmt, tiny_pipeline_dir, tmp_path, monkeypatch):
    from distilsd.deploy import ExportSettings, export_model
    from distilsd.errors import MissingDependencyError

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named '{package}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    precision = "int8" if package == "nncf" else "fp32"
    with pytest.raises(MissingDependencyError) as caught:
        export_model(
            str(tiny_pipeline_dir), tmp_path / "out", ExportSettings(format=fmt, precision=precision)
        )
    assert caught.value.package == package
    assert "pip install 'distilsd[deploy]'" in str(caught.value)


def test_missing_runtime_when_loading(openvino_export, monkeypatch):
    from distilsd.deploy import exported_pipeline
    from distilsd.errors import MissingDependencyError

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(MissingDependencyError, match=r"distilsd\[deploy\]"):
        exported_pipeline(openvino_export)


def test_bf16_falls_back_to_f32_without_cpu_support(monkeypatch, capsys):
    from distilsd.deploy import runtime

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert runtime.resolve_inference_precision("bf16", "openvino") == "fp32"
    assert "no bf16 support" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert runtime.resolve_inference_precision("bf16", "openvino") == "bf16"
    assert runtime.resolve_inference_precision("fp32", "openvino") == "fp32"
    assert runtime.resolve_inference_precision("f32", "openvino") == "fp32"  # the old spelling


def test_onnx_refuses_bf16_and_int8_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from distilsd.cli import cli

    result = CliRunner().invoke(
        cli,
        ["export", "-m", "tiny-random", "--format", "onnx", "--precision", "bf16", "-o", str(tmp_path / "x")],
    )
    assert result.exit_code != 0
    assert "not available for ONNX" in str(result.exception)
    assert not (tmp_path / "x").exists()
