"""Label generated Shapes images for checking the judge: two independent readers, a person on every disagreement.

    # 0. Generate the images (each model's folder gets <n>obj-<index>.png and judged.jsonl):
    distilsd shapes eval -m shapes -m shapes-tiny -g 4.5 --prompts-per-group 80 -o outputs/labelset
    # 1. Read them with the judge and with the classical reader (distilsd.shapes.classic); write
    #    candidates.jsonl, contact sheets of every disagreement and of a random sample of agreements.
    python scripts/label_shapes_images.py propose -o outputs/labelling --per-group 80 \\
        outputs/labelset/shapes outputs/labelset/shapes-tiny
    # 2. Look at every sheet; write decisions.json, for every disagreement (and any agreement found
    #    wrong or unclear): {"<model>/<file>": {"objects": [["red", "star"], ...], "clear": true,
    #    "note": "..."}}, the object set the image holds. An object is placed at the centre of a
    #    reading of its colour; one with none is given as ["red", "star", 0.3, 0.6]. The rules a
    #    person follows (what is "clear", the shape "other") are in docs/shapes-eval.md.
    # 3. Build the labelled set: the images and labels.jsonl (agreed readings and decisions).
    python scripts/label_shapes_images.py build -o src/distilsd/shapes/assets/labelled \\
        --images-root outputs/labelset outputs/labelling/candidates.jsonl outputs/labelling/decisions.json

The images are those of `distilsd shapes eval` (files <n>obj-<index>.png), the first --per-group of each group.
To label a large set in chunks, decide a smaller --per-group first, then propose the whole set
with `--decided` that decisions.json: its disagreements are left off the new sheets, and the
file, grown with the new decisions, builds the whole set.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

AGREEMENT_SAMPLE = 64  # agreed images drawn (seeded) onto sheets to be looked at too


def _objects(found) -> list[list]:
    """Readings as sorted [colour, shape, x, y] lists (centres to 0.01), the classical reader's with solidity."""
    return sorted(
        [o.color, o.shape, round(o.x, 2), round(o.y, 2)]
        + ([round(o.solidity, 2)] if hasattr(o, "solidity") else [])
        for o in found
    )


def _pairs(objects: list[list]) -> list[list[str]]:
    return sorted(o[:2] for o in objects)


def _describe(objects: list[list]) -> str:
    """'red star, blue diamond 0.91': each object, with the classical reader's solidity for four-pointed ones."""
    return (
        ", ".join(
            " ".join(o[:2]) + (f" {o[4]:.2f}" if len(o) > 4 and o[1] in ("cross", "diamond") else "")
            for o in objects
        )
        or "-"
    )


def _sheet(entries: list[dict], folders: dict[str, Path], path: Path, first_number: int) -> None:
    """A contact sheet: each image at 4x with its number, both readings and its prompt."""
    from PIL import Image, ImageDraw

    tile, columns, text_lines = 256, 4, 5
    rows = (len(entries) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * (tile + 12 * text_lines)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, c in enumerate(entries):
        x, y = (k % columns) * tile, (k // columns) * (tile + 12 * text_lines)
        image = Image.open(folders[c["model"]] / c["file"]).convert("RGB")
        sheet.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        text = f"{first_number + k}. J: {_describe(c['judge'])}\nC: {_describe(c['classic'])}\n{c['prompt']}"
        wrapped = [line[i : i + 42] for line in text.split("\n") for i in range(0, len(line), 42)]
        for n, line in enumerate(wrapped[:text_lines]):
            draw.text((x + 2, y + tile + 1 + 12 * n), line, fill="gray" if line in c["prompt"] else "black")
    sheet.save(path)


def _groups(per_group: int, prompt_seed: int, subject: str | None) -> dict[int, dict[str, str]]:
    """{objects asked: {file name: prompt}} of a `shapes eval` folder, or of an `eval-hexagon` one (``subject``)."""
    from distilsd.shapes.evaluate import heldout_scenes
    from distilsd.shapes.personalise import subject_scenes

    if subject:  # `shapes eval-hexagon` writes <shape>-<index>.png for its subject prompts
        scenes = subject_scenes(per_group, subject, seed=prompt_seed)
        return {1: {f"{subject}-{i:04d}.png": scene.caption for i, scene in enumerate(scenes)}}
    return {
        objects: {
            f"{objects}obj-{i:04d}.png": scene.caption
            for i, scene in enumerate(heldout_scenes(objects, per_group, seed=prompt_seed))
        }
        for objects in (1, 2)
    }


def read_both(
    folders: list[Path], per_group: int, prompt_seed: int, judge_dir: str | None, subject: str | None = None
) -> list[dict]:
    """Every image of the `shapes eval` (or `eval-hexagon`) folders read by the judge and by the classical reader."""
    from PIL import Image

    from distilsd.shapes.classic import read_classic
    from distilsd.shapes.judge import JUDGE_DIR, load_judge, read_images

    judge = load_judge(judge_dir or JUDGE_DIR)
    candidates = []
    groups = _groups(per_group, prompt_seed, subject)
    for folder in folders:
        for objects, prompts in groups.items():
            files = list(prompts)
            images = [Image.open(folder / name).convert("RGB") for name in files]
            for name, image, reading in zip(files, images, read_images(judge, images), strict=True):
                judge_objects, classic_objects = _objects(reading.objects), _objects(read_classic(image))
                candidates.append(
                    {
                        "key": f"{folder.name}/{name}",
                        "model": folder.name,
                        "file": name,
                        "prompt": prompts[name],
                        "objects_asked": objects,
                        "judge": judge_objects,
                        "classic": classic_objects,
                        "agree": _pairs(judge_objects) == _pairs(classic_objects),
                    }
                )
    return candidates


def propose(
    folders: list[Path],
    per_group: int,
    prompt_seed: int,
    output: Path,
    judge_dir: str | None,
    subject: str | None = None,
    all_agreements: bool = False,
    decided: Path | None = None,
) -> None:
    # Labelling in chunks: disagreements a decisions file already holds (e.g. of a smaller
    # --per-group run of the same images) are left off the sheets; build takes that file
    # grown with the new decisions. Checked before the images are read.
    already: set[str] = set()
    if decided:
        if not decided.is_file():
            sys.exit(f"error: --decided {decided}: no such file; give the decisions.json of an earlier chunk")
        try:
            decisions = json.loads(decided.read_text())
        except json.JSONDecodeError:
            decisions = None
        if not isinstance(decisions, dict):
            sys.exit(
                f"error: --decided {decided} is not a decisions.json (a JSON object keyed by model/file)"
            )
        already = set(decisions)
    output.mkdir(parents=True, exist_ok=True)
    candidates = read_both(folders, per_group, prompt_seed, judge_dir, subject)
    (output / "candidates.jsonl").write_text("".join(json.dumps(c) + "\n" for c in candidates))
    by_name = {folder.name: folder for folder in folders}
    per_sheet = 16
    disagreements = [c for c in candidates if not c["agree"] and c["key"] not in already]
    agreements = [c for c in candidates if c["agree"]]
    sample = sorted(random.Random(0).sample(range(len(agreements)), min(AGREEMENT_SAMPLE, len(agreements))))
    if all_agreements:  # a person looks at every agreement, not a sample
        sample = list(range(len(agreements)))
    for kind, entries in (("disagreements", disagreements), ("agreements", [agreements[i] for i in sample])):
        (output / f"{kind}.txt").write_text("".join(f"{n}. {c['key']}\n" for n, c in enumerate(entries)))
        for start in range(0, len(entries), per_sheet):
            _sheet(
                entries[start : start + per_sheet],
                by_name,
                output / f"{kind}-{start // per_sheet:02d}.png",
                start,
            )
    print(
        f"{len(candidates)} images, {len(disagreements)} disagreements"
        + (f" to decide ({len(already)} already in {decided})" if decided else "")
        + f", {len(sample)} agreements sampled -> {output}",
        file=sys.stderr,
    )


def pseudo(
    folders: list[Path],
    per_group: int,
    prompt_seed: int,
    output: Path,
    judge_dir: str | None,
    subject: str | None = None,
) -> None:
    """Pseudo-labels for training the judge: the images where both readers agree, no person involved.

    Only for images made from another prompt seed than the labelled set's (303), so that the
    judge never trains on the images it is checked on.
    """
    import shutil

    if prompt_seed == 303:
        sys.exit("error: prompt seed 303 made the labelled set; pseudo-label images of another seed")
    if subject and prompt_seed in (404, 505):
        sys.exit(
            f"error: prompt seed {prompt_seed} is eval-hexagon's reported set (404) or made the hexagon "
            "labelled set (505); pseudo-label images of another seed"
        )
    output.mkdir(parents=True, exist_ok=True)
    candidates = [c for c in read_both(folders, per_group, prompt_seed, judge_dir, subject) if c["agree"]]
    by_name = {folder.name: folder for folder in folders}
    lines = []
    for c in candidates:
        name = f"{c['model']}-{c['file']}"
        shutil.copyfile(by_name[c["model"]] / c["file"], output / name)
        record = {"file": name, "model": c["model"], "prompt": c["prompt"], "objects_asked": c["objects_asked"],
                  "objects": [o[:4] for o in c["judge"]], "clear": True, "labelled_by": "both readers"}  # fmt: skip
        lines.append(json.dumps(record))
    (output / "labels.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} pseudo-labelled images -> {output}", file=sys.stderr)


def _decided_objects(decision: list[list], candidate: dict) -> list[list]:
    """A person's object set with centres.

    Each object's centre is that of a reading (the judge's first, then the classical
    reader's) of the same colour and shape, else of the same colour, not within 0.1 of an
    object already placed; or as given: [colour, shape, x, y].
    """
    readings = candidate["judge"] + candidate["classic"]
    objects: list[list] = []
    for entry in decision:
        if len(entry) == 4:
            objects.append([entry[0], entry[1], float(entry[2]), float(entry[3])])
            continue
        free = [o for o in readings if all(math.hypot(o[2] - p[2], o[3] - p[3]) > 0.1 for p in objects)]
        match = [o for o in free if o[:2] == list(entry)] or [o for o in free if o[0] == entry[0]]
        if not match:
            sys.exit(f"error: {candidate['key']}: no reading to place {entry} at; give [colour, shape, x, y]")
        objects.append([*entry, *match[0][2:4]])
    return sorted(objects)


def build(candidates_path: Path, decisions_path: Path, output: Path, images_root: Path | None) -> None:
    from PIL import Image

    candidates = [json.loads(line) for line in candidates_path.read_text().splitlines() if line.strip()]
    decisions = json.loads(decisions_path.read_text())
    undecided = [c["key"] for c in candidates if not c["agree"] and c["key"] not in decisions]
    if undecided:
        sys.exit(f"error: no decision for {len(undecided)} disagreement(s), e.g. {undecided[:3]}")
    unknown = set(decisions) - {c["key"] for c in candidates}
    if unknown:
        sys.exit(f"error: decisions for images that are not candidates: {sorted(unknown)[:3]}")
    output.mkdir(parents=True, exist_ok=True)
    lines = []
    for c in candidates:
        name = f"{c['model']}-{c['file']}"
        # Re-encoded with the strongest PNG compression: the same pixels, a smaller file to ship.
        Image.open((images_root or Path(".")) / c["model"] / c["file"]).convert("RGB").save(
            output / name, optimize=True
        )
        record = {
            "file": name,
            "model": c["model"],
            "prompt": c["prompt"],
            "objects_asked": c["objects_asked"],
        }
        decision = decisions.get(c["key"])
        if decision is None:
            record |= {"objects": [o[:4] for o in c["judge"]], "clear": True, "labelled_by": "both readers"}
        else:
            if isinstance(decision, list):  # a bare object set: clear
                decision = {"objects": decision, "clear": True}
            record |= {
                "objects": _decided_objects(decision["objects"], c),
                "clear": bool(decision["clear"]),
                "labelled_by": "eye",
                "readers": {"judge": _pairs(c["judge"]), "classic": _pairs(c["classic"])},
            }
            if decision.get("note"):
                record["note"] = decision["note"]
        lines.append(json.dumps(record))
    (output / "labels.jsonl").write_text("\n".join(lines) + "\n")
    unclear = sum(not json.loads(line)["clear"] for line in lines)
    print(
        f"{len(lines)} labelled images ({len(decisions)} by eye, {unclear} unclear) -> {output}",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("propose")
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--per-group", type=int, default=80)
    p.add_argument("--prompt-seed", type=int, default=303, help="The --prompt-seed of the shapes eval run.")
    p.add_argument(
        "--judge",
        default=None,
        help="Judge folder or name (default: one-stage, which the shipped labels used).",
    )
    p.add_argument(
        "--subject",
        default=None,
        help="The folders are `shapes eval-hexagon` outputs of this shape (<shape>-<index>.png, "
        "subject prompts of --prompt-seed) instead of `shapes eval` ones.",
    )
    p.add_argument(
        "--all-agreements", action="store_true", help="Sheets of every agreement, not a seeded sample of 64."
    )
    p.add_argument(
        "--decided",
        type=Path,
        default=None,
        help="A decisions.json whose disagreements are already decided: left off the sheets.",
    )
    q = commands.add_parser(
        "pseudo", help="Pseudo-label images of another prompt seed for training the judge."
    )
    q.add_argument("folders", nargs="+", type=Path)
    q.add_argument("-o", "--output", type=Path, required=True)
    q.add_argument("--per-group", type=int, default=150)
    q.add_argument("--prompt-seed", type=int, required=True, help="The --prompt-seed of the shapes eval run.")
    q.add_argument(
        "--judge",
        default=None,
        help="Judge folder or name (default: one-stage, which the shipped labels used).",
    )
    q.add_argument("--subject", default=None, help="As for propose: `shapes eval-hexagon` folders.")
    b = commands.add_parser("build")
    b.add_argument("candidates", type=Path)
    b.add_argument("decisions", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument(
        "--images-root", type=Path, default=None, help="Folder holding the <model>/ image folders."
    )
    args = parser.parse_args()
    if args.command == "propose":
        propose(
            args.folders,
            args.per_group,
            args.prompt_seed,
            args.output,
            args.judge,
            args.subject,
            args.all_agreements,
            args.decided,
        )
    elif args.command == "pseudo":
        pseudo(args.folders, args.per_group, args.prompt_seed, args.output, args.judge, args.subject)
    else:
        build(args.candidates, args.decisions, args.output, args.images_root)


if __name__ == "__main__":
    main()
