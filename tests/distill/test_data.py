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


# ---- rows with several captions (issue 22, item 13): BK-SDM picks one at random per use ----


def _multi_caption_folder(root, rows=6, per_row=5):
    root.mkdir(exist_ok=True)
    lines = []
    for i in range(rows):
        (root / f"{i}.png").write_bytes(_png((i * 40, 0, 0)))
        lines.append({"file_name": f"{i}.png", "text": [f"row{i} caption{k}" for k in range(per_row)]})
    lines.append({"file_name": "0.png", "text": ["", "   "]})  # a list of nothing usable
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def _captions(dataset, sampler, batches):
    return [
        [dataset[key]["caption"] for key in batch] for _, batch in zip(range(batches), sampler, strict=False)
    ]


def test_multi_caption_rows_keep_every_caption_and_vary_by_epoch(tmp_path):
    source = open_source(DataConfig(source=str(_multi_caption_folder(tmp_path))))
    assert len(source) == 6 and source.skipped == {"missing caption": 1}
    assert source.captions_of(2) == tuple(f"row2 caption{k}" for k in range(5))
    assert source.caption(2) == "row2 caption0"  # load() / caption() still give the first
    dataset = ImageCaptionDataset(source, 16, "center", False, seed=0)
    per_epoch = [dataset[(epoch, 3)]["caption"] for epoch in range(12)]
    assert all(c.startswith("row3 ") for c in per_epoch)
    assert len(set(per_epoch)) >= 3  # one of five at random each epoch, not always the first
    again = ImageCaptionDataset(open_source(DataConfig(source=str(tmp_path))), 16, "center", False, seed=0)
    assert [again[(epoch, 3)]["caption"] for epoch in range(12)] == per_epoch  # seeded, not global state
    other_seed = ImageCaptionDataset(source, 16, "center", False, seed=1)
    assert [other_seed[(epoch, 3)]["caption"] for epoch in range(12)] != per_epoch
    first = ImageCaptionDataset(source, 16, "center", False, seed=0, caption_choice="first")
    assert {first[(epoch, 3)]["caption"] for epoch in range(12)} == {"row3 caption0"}


def test_caption_choice_survives_resume_and_process_count(tmp_path):
    dataset = ImageCaptionDataset(
        open_source(DataConfig(source=str(_multi_caption_folder(tmp_path)))), 16, "center", False, seed=7
    )
    one = _captions(dataset, GlobalBatchSampler(6, global_batch=2, rank=0, per_process=2, seed=7), 9)
    resumed = _captions(
        dataset, GlobalBatchSampler(6, global_batch=2, rank=0, per_process=2, seed=7, start=4), 5
    )
    assert resumed == one[4:]
    ranks = [_captions(dataset, GlobalBatchSampler(6, 2, rank, 1, seed=7), 9) for rank in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == one
    # The same row got different captions in different epochs (3 batches an epoch here).
    by_row: dict[str, set[str]] = {}
    for caption in (c for batch in one for c in batch):
        by_row.setdefault(caption.split()[0], set()).add(caption)
    assert max(len(v) for v in by_row.values()) > 1


def test_hf_list_caption_column_keeps_every_caption(tmp_path):
    import datasets

    files = []
    for i in range(2):
        path = tmp_path / f"{i}.png"
        path.write_bytes(_png())
        files.append(str(path))
    captions = [["a cat", "", "a small cat"], ["a dog"]]
    dataset = datasets.Dataset.from_dict({"image": files, "sentences": captions}).cast_column(
        "image", datasets.Image()
    )
    dataset.save_to_disk(str(tmp_path / "coco"))
    source = open_source(DataConfig(source=str(tmp_path / "coco"), caption_column="sentences"))
    assert [source.captions_of(i) for i in range(2)] == [("a cat", "a small cat"), ("a dog",)]
    chosen = {ImageCaptionDataset(source, 16, "center", False, seed=0)[(e, 0)]["caption"] for e in range(10)}
    assert chosen == {"a cat", "a small cat"}


def test_bilinear_resize_matches_bk_sdm_torchvision_transforms():
    transforms = pytest.importorskip("torchvision.transforms")
    generator = torch.Generator().manual_seed(0)
    for size in ((37, 23), (23, 37), (64, 41)):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy())
        bk_sdm = transforms.Compose(
            [
                transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(16),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )(image)
        ours = prepare_image(image, 16, "center", flip=False, resize="bilinear")
        torch.testing.assert_close(ours, bk_sdm, atol=1e-6, rtol=0)
        bicubic = prepare_image(image, 16, "center", flip=False, resize="bicubic")
        assert not torch.allclose(bicubic, bk_sdm)


def test_checkpoints_from_before_the_caption_and_resize_keys_resume_as_trained():
    from distilsd.distill.config import TrainConfig, config_differences

    diffs = config_differences({}, TrainConfig())
    assert "data.caption_choice: checkpoint has 'first', now 'random'" in diffs
    assert "data.resize: checkpoint has 'bicubic', now 'bilinear'" in diffs
    old_way = TrainConfig()
    old_way.data.caption_choice, old_way.data.resize = "first", "bicubic"
    assert not [d for d in config_differences({}, old_way) if d.startswith("data.")]
