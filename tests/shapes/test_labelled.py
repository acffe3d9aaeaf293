"""The shipped labelled set of generated images, and the shipped judge's agreement with it."""

import json
import shutil

import pytest
from PIL import Image

from distilsd.errors import InputError
from distilsd.shapes import render, scene_for_index
from distilsd.shapes.captions import parse_caption
from distilsd.shapes.judge import is_aligned, load_judge
from distilsd.shapes.labelled import (
    HEXAGON_LABELLED_DIR,
    LABELLED_DIR,
    LabelledImage,
    check_on_labelled,
    label_reading,
    load_labels,
)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def _decisions_match_labels(folder, labels):
    decisions = json.loads((folder / "decisions.json").read_text())
    by_eye = {
        f"{label.model}/{label.file.removeprefix(label.model + '-')}": label
        for label in labels
        if label.labelled_by == "eye"
    }
    assert set(decisions) == set(by_eye)
    for key, decision in decisions.items():
        assert sorted(tuple(o[:2]) for o in decision["objects"]) == by_eye[key].pairs, key
        assert decision["clear"] == by_eye[key].clear, key


def test_shipped_labelled_set_is_consistent():
    labels = load_labels()  # checks the vocabulary, the centres, objects_asked against the prompt, the images
    assert len(labels) >= 300 and len({label.file for label in labels}) == len(labels)
    groups = {(label.model, label.objects_asked) for label in labels}
    assert groups == {("shapes", 1), ("shapes", 2), ("shapes-tiny", 1), ("shapes-tiny", 2)}
    assert sum(label.clear for label in labels) >= 250
    # Every image in the folder is labelled, and each is a small 64 px PNG.
    images = sorted(p.name for p in LABELLED_DIR.glob("*.png"))
    assert images == sorted(label.file for label in labels)
    assert sum(p.stat().st_size for p in LABELLED_DIR.iterdir()) < 2_000_000
    assert all(Image.open(LABELLED_DIR / name).size == (64, 64) for name in images[::40])
    # The decisions a person made are the labels of exactly the images labelled by eye.
    _decisions_match_labels(LABELLED_DIR, labels)


def test_shipped_hexagon_set_is_consistent():
    labels = load_labels(HEXAGON_LABELLED_DIR)
    assert len(labels) == 240 and len({label.file for label in labels}) == len(labels)
    assert {(label.model, label.objects_asked) for label in labels} == {
        (f"shapes-tiny-lora-{name}", 1) for name in "DEGH"
    }
    assert all("hexagon" in label.prompt for label in labels)
    assert sum(label.clear for label in labels) >= 100
    images = sorted(p.name for p in HEXAGON_LABELLED_DIR.glob("*.png"))
    assert images == sorted(label.file for label in labels)
    assert sum(p.stat().st_size for p in HEXAGON_LABELLED_DIR.iterdir()) < 1_500_000
    _decisions_match_labels(HEXAGON_LABELLED_DIR, labels)


# Agreement with the first set's labels (docs/shapes-eval.md): two-stage 0.952 [0.919, 0.972] (257 of
# 270 clear images), one-stage 0.919 [0.880, 0.946] (248). The issue's >= 0.97 is above what the labels
# themselves repeat (0.956 against a blind relabelling); raise these floors with a better judge.
@pytest.mark.parametrize("name, floor", [("two-stage", 0.95), ("one-stage", 0.91)])
def test_shipped_judges_agree_with_the_labels(name, floor):
    report = check_on_labelled(load_judge(name))
    assert report["clear_images"] >= 250
    assert report["object_set_agreement"] >= floor, report
    # Its alignment verdicts, the numbers the evaluation reports, follow the labels' too.
    for model in ("shapes", "shapes-tiny"):
        for group in ("1 obj", "2 obj"):
            for mode in ("exact", "contains"):
                assert report["alignment"][model][group][mode]["same_verdict"] >= 0.8, (model, group, mode)


def test_labels_are_scored_like_readings():
    """Alignment by the labels: 'exact' refuses an extra object, 'contains' does not, positions count."""
    star = ("red", "star", 0.3, 0.5)
    label = LabelledImage("x.png", "m", "a red star on the left", 1, (star,), True, "eye")
    target = parse_caption(label.prompt)
    assert is_aligned(label_reading(label), target, "exact")
    extra = LabelledImage("x.png", "m", label.prompt, 1, (star, ("red", "other", 0.8, 0.5)), False, "eye")
    assert not is_aligned(label_reading(extra), target, "exact")
    assert is_aligned(label_reading(extra), target, "contains")
    right = LabelledImage("x.png", "m", label.prompt, 1, (("red", "star", 0.7, 0.5),), True, "eye")
    assert not is_aligned(label_reading(right), target, "contains")


def test_check_on_labelled_counts_misses_and_mistakes(judge, tmp_path):
    """On renders labelled by their scenes, with one label the image does not bear out."""
    scenes = [scene_for_index(11, i) for i in range(6)]
    labels = []
    for i, scene in enumerate(scenes):
        render(scene).save(tmp_path / f"{i}.png")
        objects = [[o.color, o.shape, o.x, o.y] for o in scene.objects]
        if i == 0:
            objects.append(["cyan", "hexagon", 0.9, 0.9])  # not in the image: one miss
        labels.append(
            {
                "file": f"{i}.png",
                "model": "renders",
                "prompt": scene.caption,
                "objects_asked": len(scene.objects),
                "objects": objects,
                "clear": True,
            }  # fmt: skip
        )
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(label) + "\n" for label in labels))
    report = check_on_labelled(judge, tmp_path)
    assert report["images"] == report["clear_images"] == 6
    assert report["objects_missed"] >= 1 and report["missed_shapes"].get("hexagon", 0) >= 1
    assert report["object_set_agreement"] <= 5 / 6
    assert 0 <= report["object_set_agreement_interval"][0] <= report["object_set_agreement"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(objects=[["red", "blob", 0.5, 0.5]]), "not a Shapes object"),
        (lambda r: r.update(objects=[["red", "other", 0.5, 0.5]], clear=True), "clear image cannot"),
        (lambda r: r.update(objects=[["red", "star", 1.5, 0.5]]), "outside the image"),
        (lambda r: r.update(file="missing.png"), "is missing"),
        (lambda r: r.update(objects_asked=2), "objects_asked"),
        (lambda r: r.pop("objects"), "not a label record"),
    ],
)
def test_load_labels_rejects_bad_records(tmp_path, change, message):
    first = json.loads((LABELLED_DIR / "labels.jsonl").read_text().splitlines()[0])
    shutil.copyfile(LABELLED_DIR / first["file"], tmp_path / first["file"])
    change(first)
    (tmp_path / "labels.jsonl").write_text(json.dumps(first) + "\n")
    with pytest.raises(InputError, match=message):
        load_labels(tmp_path)


@pytest.mark.slow
def test_labelling_script_end_to_end(tmp_path):
    """propose -> decisions -> build on a tiny 'eval folder' of renders; pseudo refuses the labelled set's seed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from distilsd.shapes.evaluate import heldout_scenes

    script = Path(__file__).parents[2] / "scripts" / "label_shapes_images.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    model = tmp_path / "renders"
    model.mkdir()
    for objects in (1, 2):
        for i, scene in enumerate(heldout_scenes(objects, 3, seed=303)):
            render(scene).save(model / f"{objects}obj-{i:04d}.png")
    # One image holds a stray blob no reader names the same way: a disagreement to decide.
    image = Image.open(model / "1obj-0000.png")
    image.paste((20, 20, 20), (2, 2, 10, 10))
    image.save(model / "1obj-0000.png")

    def run(*args):
        return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)

    done = run("propose", "-o", str(tmp_path / "work"), "--per-group", "3", "--all-agreements", str(model))
    assert done.returncode == 0, done.stderr
    candidates = [
        json.loads(line) for line in (tmp_path / "work" / "candidates.jsonl").read_text().splitlines()
    ]
    assert len(candidates) == 6 and (tmp_path / "work" / "agreements-00.png").is_file()
    listed = (tmp_path / "work" / "agreements.txt").read_text().splitlines()
    assert len(listed) == sum(c["agree"] for c in candidates)  # every agreement on a sheet
    first = candidates[0]
    decisions = {first["key"]: {"objects": [o[:2] for o in first["judge"]], "clear": True, "note": "checked"}}
    decisions |= {c["key"]: [o[:2] for o in c["judge"]] for c in candidates if not c["agree"]}
    (tmp_path / "work" / "decisions.json").write_text(json.dumps(decisions))
    done = run("build", "-o", str(tmp_path / "set"), "--images-root", str(tmp_path),
               str(tmp_path / "work" / "candidates.jsonl"), str(tmp_path / "work" / "decisions.json"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    labels = load_labels(tmp_path / "set")
    assert len(labels) == 6 and labels[0].labelled_by == "eye"
    assert sum(label.labelled_by == "eye" for label in labels) == len(decisions)
    # Labelling in chunks: what a decisions file already decides is left off the new sheets.
    done = run("propose", "-o", str(tmp_path / "work2"), "--per-group", "3", str(model),
               "--decided", str(tmp_path / "work" / "decisions.json"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    first_sheets = (tmp_path / "work" / "disagreements.txt").read_text().splitlines()
    assert len(first_sheets) == sum(not c["agree"] for c in candidates) >= 1  # the blob
    assert (tmp_path / "work2" / "disagreements.txt").read_text() == ""
    assert "already in" in done.stderr
    done = run("propose", "-o", str(tmp_path / "work3"), "--per-group", "3", str(model),
               "--decided", str(tmp_path / "missing.json"))  # fmt: skip
    assert done.returncode != 0 and "no such file" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "broken.json").write_text("{not json")
    done = run("propose", "-o", str(tmp_path / "work4"), "--per-group", "3", str(model),
               "--decided", str(tmp_path / "broken.json"))  # fmt: skip
    assert done.returncode != 0 and "not a decisions.json" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "work4").exists()  # refused before anything is written
    # Undecided disagreements, and pseudo-labels for the labelled set's own prompts, are refused.
    (tmp_path / "work" / "decisions.json").write_text("{}")
    undecided = [c for c in candidates if not c["agree"]]
    done = run("build", "-o", str(tmp_path / "set2"), "--images-root", str(tmp_path),
               str(tmp_path / "work" / "candidates.jsonl"), str(tmp_path / "work" / "decisions.json"))  # fmt: skip
    assert (done.returncode != 0) == bool(undecided)
    done = run(
        "pseudo", "-o", str(tmp_path / "pseudo"), "--per-group", "3", "--prompt-seed", "303", str(model)
    )
    assert done.returncode != 0 and "303" in done.stderr


def test_check_judge_cli_reads_the_shipped_set(capsys):
    from distilsd.cli import main

    main(["shapes", "check-judge", "--count", "40"])
    results = json.loads(capsys.readouterr().out)
    assert results["renders"]["heldout_images"] == 40
    generated = results["generated"]
    assert generated["images"] == len(load_labels()) and generated["clear_images"] >= 250
    assert set(generated["alignment"]) == {"shapes", "shapes-tiny"}
    hexagon = results["generated_hexagon"]
    assert hexagon["images"] == 240 and set(hexagon["alignment"]) == {
        f"shapes-tiny-lora-{name}" for name in "DEGH"
    }
    # The default (two-stage) judge: 0.924 [0.861, 0.959] (109 of 118 clear images; one-stage 0.856),
    # its mistakes mostly hexagons read as diamonds (docs/shapes-eval.md); a floor to raise.
    assert hexagon["object_set_agreement"] >= 0.92, hexagon
    assert hexagon["shape_mistakes"].get("hexagon read as diamond", 0) <= 6


def test_train_judge_refuses_the_labelled_set(capsys):
    from distilsd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["shapes", "train-judge", "-o", "unused", "--generated", str(LABELLED_DIR)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "must not train on them" in err and "Traceback" not in err


def test_train_judge_refuses_the_hexagon_set(capsys):
    from distilsd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["shapes", "train-judge", "-o", "unused", "--generated", str(HEXAGON_LABELLED_DIR)])
    assert exit_info.value.code != 0
    assert "must not train on them" in capsys.readouterr().err


def test_train_judge_refuses_a_fraction_outside_0_1(capsys):
    from distilsd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["shapes", "train-judge", "-o", "unused", "--clipped-fraction", "2"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: --clipped-fraction 2.0 is not a fraction") and "Traceback" not in err


def test_compare_judges_script_pairs_seeds_and_refuses_unpaired_lists():
    """scripts/compare_judges.py: a judge against itself differs by exactly 0 on both sets; lists of
    different lengths are refused (each A judge needs its B judge of the same seed)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "scripts" / "compare_judges.py"
    out = subprocess.run(
        [sys.executable, str(script), "--a", "one-stage", "--b", "one-stage", "--draws", "50"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("first set (") and lines[1].startswith("hexagon set (")
    assert all("A - B +0.000 [+0.000, +0.000] (per pair: +0.000)" in line for line in lines), lines
    refused = subprocess.run(
        [sys.executable, str(script), "--a", "one-stage", "one-stage", "--b", "one-stage"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "give one of each per seed" in refused.stderr
    missing = subprocess.run(
        [sys.executable, str(script), "--a", "no-such-judge", "--b", "one-stage"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 1 and missing.stderr.startswith("error: the Shapes judge weights")
    assert "Traceback" not in missing.stderr
