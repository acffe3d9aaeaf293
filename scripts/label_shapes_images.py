"""Label generated Shapes images for checking the judge: two independent readers, a person on every disagreement.

    # 1. Read the images with the judge and with the classical reader (distilsd.shapes.classic);
    #    write candidates.jsonl and contact sheets of every image where they disagree.
    python scripts/label_shapes_images.py propose -o outputs/labelling --per-group 80 \\
        outputs/shapes-eval/shapes outputs/shapes-eval/shapes-tiny
    # 2. Look at each sheet; write decisions.json: {"<model>/<file>": [["red", "star"], ...]}, the
    #    object set the image holds, for every disagreement.
    # 3. Build the labelled set: the images, labels.jsonl (agreed readings and decisions).
    python scripts/label_shapes_images.py build -o src/distilsd/shapes/assets/labelled \\
        outputs/labelling/candidates.jsonl outputs/labelling/decisions.json

The images are those of `distilsd shapes eval` (files <n>obj-<index>.png), first --per-group of each group.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def _pairs(objects) -> list[list[str]]:
    return sorted([o.color, o.shape] for o in objects)


def propose(
    folders: list[Path], per_group: int, prompt_seed: int, output: Path, judge_dir: str | None
) -> None:
    from PIL import Image, ImageDraw

    from distilsd.shapes.classic import read_classic
    from distilsd.shapes.evaluate import heldout_scenes
    from distilsd.shapes.judge import JUDGE_DIR, load_judge, read_images

    judge = load_judge(judge_dir or JUDGE_DIR)
    output.mkdir(parents=True, exist_ok=True)
    candidates = []
    prompts = {
        f"{objects}obj-{i:04d}.png": scene.caption
        for objects in (1, 2)
        for i, scene in enumerate(heldout_scenes(objects, per_group, seed=prompt_seed))
    }
    for folder in folders:
        for objects in (1, 2):
            files = [f"{objects}obj-{i:04d}.png" for i in range(per_group)]
            images = [Image.open(folder / name).convert("RGB") for name in files]
            for name, image, reading in zip(files, images, read_images(judge, images), strict=True):
                judge_pairs = _pairs(reading.objects)
                classic_pairs = _pairs(read_classic(image))
                candidates.append(
                    {
                        "key": f"{folder.name}/{name}",
                        "model": folder.name,
                        "file": name,
                        "prompt": prompts[name],
                        "objects_asked": objects,
                        "judge": judge_pairs,
                        "classic": classic_pairs,
                        "agree": judge_pairs == classic_pairs,
                    }
                )
    (output / "candidates.jsonl").write_text("".join(json.dumps(c) + "\n" for c in candidates))
    disagreements = [c for c in candidates if not c["agree"]]
    tile, per_sheet = 192, 24
    for sheet_index in range(0, len(disagreements), per_sheet):
        batch = disagreements[sheet_index : sheet_index + per_sheet]
        sheet = Image.new("RGB", (6 * tile, 4 * (tile + 40)), "white")
        draw = ImageDraw.Draw(sheet)
        for k, c in enumerate(batch):
            folder = next(f for f in folders if f.name == c["model"])
            x, y = (k % 6) * tile, (k // 6) * (tile + 40)
            sheet.paste(
                Image.open(folder / c["file"]).convert("RGB").resize((tile, tile), Image.Resampling.NEAREST),
                (x, y),
            )
            describe = lambda pairs: ", ".join(" ".join(p) for p in pairs) or "-"  # noqa: E731
            draw.text((x + 2, y + tile + 1), f"{sheet_index + k}. J: {describe(c['judge'])}", fill="black")
            draw.text((x + 2, y + tile + 13), f"C: {describe(c['classic'])}", fill="black")
            draw.text((x + 2, y + tile + 25), c["prompt"][:34], fill="gray")
        sheet.save(output / f"disagreements-{sheet_index // per_sheet:02d}.png")
    print(f"{len(candidates)} images, {len(disagreements)} disagreements -> {output}", file=sys.stderr)


def build(candidates_path: Path, decisions_path: Path, output: Path, folders_root: Path | None) -> None:
    candidates = [json.loads(line) for line in candidates_path.read_text().splitlines() if line.strip()]
    decisions = json.loads(decisions_path.read_text())
    undecided = [c["key"] for c in candidates if not c["agree"] and c["key"] not in decisions]
    if undecided:
        sys.exit(f"error: no decision for {len(undecided)} disagreement(s), e.g. {undecided[:3]}")
    output.mkdir(parents=True, exist_ok=True)
    lines = []
    for c in candidates:
        source = Path(c["source"]) if "source" in c else (folders_root or Path(".")) / c["model"] / c["file"]
        name = f"{c['model']}-{c['file']}"
        shutil.copyfile(source, output / name)
        by_eye = not c["agree"]
        objects = sorted(decisions[c["key"]]) if by_eye else c["judge"]
        record = {"file": name, "model": c["model"], "prompt": c["prompt"], "objects_asked": c["objects_asked"],
                  "objects": objects, "labelled_by": "eye" if by_eye else "both readers"}  # fmt: skip
        if by_eye:
            record["readers"] = {"judge": c["judge"], "classic": c["classic"]}
        lines.append(json.dumps(record))
    (output / "labels.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} labelled images -> {output}", file=sys.stderr)


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
    p.add_argument("--judge", default=None, help="Judge folder (default: the shipped one).")
    b = commands.add_parser("build")
    b.add_argument("candidates", type=Path)
    b.add_argument("decisions", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument(
        "--images-root", type=Path, default=None, help="Folder holding the <model>/ image folders."
    )
    args = parser.parse_args()
    if args.command == "propose":
        propose(args.folders, args.per_group, args.prompt_seed, args.output, args.judge)
    else:
        build(args.candidates, args.decisions, args.output, args.images_root)


if __name__ == "__main__":
    main()
