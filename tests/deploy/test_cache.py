"""The export cache behind ``generate --backend``: reused, and invalidated by weights, shape and precision."""

from __future__ import annotations

import os


def test_second_call_reuses_the_export(tiny_pipeline_dir, onnx_cached_export, monkeypatch):
    from distilsd.deploy import MANIFEST_NAME, cache, exported_pipeline_for

    def no_export(*args, **kwargs):
        raise AssertionError("the cached export should have been reused")

    monkeypatch.setattr(cache, "export_model", no_export)
    stamp = (onnx_cached_export / MANIFEST_NAME).stat().st_mtime_ns
    again = exported_pipeline_for(str(tiny_pipeline_dir), "onnx", progress=False)
    assert again == onnx_cached_export
    assert (again / MANIFEST_NAME).stat().st_mtime_ns == stamp


def test_key_changes_with_shape_precision_format_and_weights(tiny_pipeline_dir, tmp_path):
    import shutil

    from distilsd.deploy import ExportSettings, export_cache_key

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    base = ExportSettings(format="openvino")
    group, key = export_cache_key(str(model), base)
    assert export_cache_key(str(model), ExportSettings(format="openvino")) == (group, key)
    for other in (
        ExportSettings(format="openvino", width=128, height=128),
        ExportSettings(format="openvino", batch_size=2),
        ExportSettings(format="openvino", precision="bf16"),
        ExportSettings(format="openvino", precision="int8"),
        ExportSettings(format="onnx"),
        ExportSettings(format="openvino", dynamic=True),
    ):
        other_group, other_key = export_cache_key(str(model), other)
        assert other_group != group and other_key != key
    # New weights: same group (the old entry is replaced), other key.
    weights = next((model / "unet").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert export_cache_key(str(model), base)[0] == group
    assert export_cache_key(str(model), base)[1] != key
    assert export_cache_key("bk-tiny", base) != export_cache_key("sd-v1", base)


def test_changed_weights_export_again_and_replace_the_stale_entry(tiny_pipeline_dir, export_cache, tmp_path):
    import shutil

    from distilsd.deploy import exported_pipeline_for
    from distilsd.deploy.cache import exports_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    first = exported_pipeline_for(str(model), "onnx", progress=False)
    weights = next((model / "unet").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = exported_pipeline_for(str(model), "onnx", progress=False)
    assert second != first and second.exists()
    assert not first.exists()  # the stale export of the same model and shape is gone
    assert second.parent == exports_dir()


def test_damaged_cache_entry_is_exported_again(tiny_pipeline_dir, onnx_cached_export, tmp_path, monkeypatch):
    """A cache entry that fails the manifest check is deleted and exported again."""
    import shutil

    from distilsd.deploy import cache, exported_pipeline_for

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    calls = []

    def copy_export(model, folder, *args, **kwargs):  # stands in for a real export: same files
        calls.append(folder)
        shutil.copytree(onnx_cached_export, folder)
        return folder

    monkeypatch.setattr(cache, "export_model", copy_export)
    entry = exported_pipeline_for(str(model), "onnx", progress=False)
    assert exported_pipeline_for(str(model), "onnx", progress=False) == entry and len(calls) == 1
    (entry / "unet" / "model.onnx").unlink()
    assert exported_pipeline_for(str(model), "onnx", progress=False) == entry
    assert len(calls) == 2 and (entry / "unet" / "model.onnx").exists()
