import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from distilsd.distill.config import DataConfig
from distilsd.distill.data import GlobalBatchSampler, ImageCaptionDataset, open_source, prepare_image
from distilsd.errors import InputError


def _png(colour=(200, 20, 20), size=(40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_folder_counts_missing_captions_and_files(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png())
    lines = [
        {"file_name": "0.png", "text": "red"},
        {"file_name": "1.png"},
        {"file_name": "2.png", "text": ""},
        {"file_name": "gone.png", "text": "x"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    source = open_source(DataConfig(source=str(tmp_path)))
    assert len(source) == 1 and source.caption(0) == "red"
    assert source.skipped == {"missing caption": 2, "missing image file": 1, "bad metadata line": 1}


def test_folder_errors_say_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="no images"):
        open_source(DataConfig(source=str(tmp_path)))
    (tmp_path / "a.png").write_bytes(_png())
    with pytest.raises(InputError, match="no captions"):
        open_source(DataConfig(source=str(tmp_path)))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(InputError, match="no 'text' key") as info:
        open_source(DataConfig(source=str(tmp_path)))
    assert "--caption-column" in info.value.hint
    assert len(open_source(DataConfig(source=str(tmp_path), caption_column="caption"))) == 1


def test_sidecar_captions(tmp_path):
    (tmp_path / "00000").mkdir()
    (tmp_path / "00000" / "k1.jpg").write_bytes(_png())
    (tmp_path / "00000" / "k1.txt").write_text("a red square\n")
    (tmp_path / "00000" / "k2.jpg").write_bytes(_png())
    source = open_source(DataConfig(source=str(tmp_path)))
    assert len(source) == 1 and source.caption(0) == "a red square" and source.skipped["missing caption"] == 1


def test_unreadable_image_is_replaced_and_counted(tmp_path):
    (tmp_path / "0.png").write_bytes(b"not a png")
    (tmp_path / "1.png").write_bytes(_png((0, 0, 255)))
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"c{i}"}) for i in range(2))
    )
    dataset = ImageCaptionDataset(open_source(DataConfig(source=str(tmp_path))), 16, "center", False, seed=0)
    sample = dataset[(0, 0)]
    assert sample["bad"] == 1 and sample["index"] == 1 and sample["caption"] == "c1"
    assert sample["pixel_values"].shape == (3, 16, 16)
    assert sample["pixel_values"][2].min() == pytest.approx(1.0)  # blue channel of a blue image


def test_prepare_image_crops_and_flips():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    plain = prepare_image(image, 8, "center", flip=False)
    flipped = prepare_image(image, 8, "center", flip=True)
    assert plain.shape == (3, 8, 8)
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))


def test_sampler_is_deterministic_and_splits_the_global_batch():
    one = GlobalBatchSampler(10, global_batch=4, rank=0, per_process=4, seed=3)
    two = [GlobalBatchSampler(10, global_batch=4, rank=r, per_process=2, seed=3) for r in range(2)]
    batches_one = [b for _, b in zip(range(5), one, strict=False)]
    batches_two = [list(zip(range(5), s, strict=False)) for s in two]
    for k in range(5):
        assert batches_one[k] == batches_two[0][k][1] + batches_two[1][k][1]
    # Two batches per epoch (10 // 4), the third starts epoch 1 with a new permutation.
    assert [b[0][0] for b in batches_one] == [0, 0, 1, 1, 2]
    resumed = GlobalBatchSampler(10, global_batch=4, rank=0, per_process=4, seed=3, start=3)
    assert next(iter(resumed)) == batches_one[3]
    with pytest.raises(InputError, match="fewer than one global batch"):
        GlobalBatchSampler(3, global_batch=4, rank=0, per_process=4, seed=0)


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, data in samples:
            for ext, payload in data.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(
        shards / "00000.tar",
        [("000000000", {"jpg": _png(), "txt": b"first"}), ("000000001", {"jpg": _png(), "json": b"{}"})],
    )
    _write_shard(
        shards / "00001.tar",
        [
            ("000000002", {"png": _png((0, 255, 0)), "txt": b"third"}),
            ("000000003", {"jpg": b"broken", "txt": b"bad"}),
        ],
    )
    for pattern in (str(shards), str(shards / "{00000..00001}.tar"), str(shards / "*.tar")):
        source = open_source(DataConfig(source=pattern))
        assert source.kind == "webdataset" and len(source) == 3
    assert source.skipped == {"missing caption": 1}
    image, caption = source.load(1)
    assert caption == "third" and image.getpixel((0, 0)) == (0, 255, 0)
    dataset = ImageCaptionDataset(source, 16, "center", True, seed=0)
    assert dataset[(0, 2)]["bad"] == 1  # the broken jpg is replaced by the next sample
    with pytest.raises(InputError, match="no .tar shards"):
        open_source(DataConfig(source=str(tmp_path / "none-{0..3}.tar")))


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    files = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        path.write_bytes(_png((i * 100, 0, 0)))
        files.append(str(path))
    dataset = datasets.Dataset.from_dict({"img": files, "caption": ["zero", None, "two"]}).cast_column(
        "img", datasets.Image()
    )
    dataset.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(InputError, match="no column 'image'"):
        open_source(DataConfig(source=str(tmp_path / "ds")))
    source = open_source(
        DataConfig(source=str(tmp_path / "ds"), image_column="img", caption_column="caption")
    )
    assert source.kind == "hf" and len(source) == 2 and source.skipped["missing caption"] == 1
    image, caption = source.load(1)
    assert caption == "two" and image.getpixel((0, 0)) == (200, 0, 0)
