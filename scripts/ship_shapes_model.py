"""Copy the trained Shapes teacher and bk-tiny student into the package, as fp16 safetensors.

    python scripts/ship_shapes_model.py --teacher runs/shapes/teacher --student runs/shapes/tiny-kd \
        --vae runs/shapes/vae-decoder

Writes src/distilsd/shapes/assets/models/shapes/ (vae, text_encoder, unet, scheduler,
model_index.json) and shapes-tiny/unet/; the tokenizer is distilsd's CLIP tokenizer asset,
padding to distilsd.shapes.model.TEXT_TOKENS (the teacher's tokenizer must agree).
fp16 halves the size; the weights are loaded back into fp32 (or the dtype asked for).
Commit the result once, when final: every retrained copy in git history costs every clone.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "distilsd" / "shapes" / "assets" / "models"
DATA_COMMANDS = [
    "distilsd shapes make-data -o runs/shapes/data --count 60000 --seed 0",
    "distilsd shapes init -o runs/shapes/init",
    "distilsd train -c shapes-vae",
    "distilsd shapes train-text -m runs/shapes/vae --data runs/shapes/data -o runs/shapes/text",
]
TEACHER_COMMANDS = [*DATA_COMMANDS, "distilsd train -c shapes-teacher", "distilsd train -c shapes-teacher-ln"]


def write_compress_record(unet_dir: Path, teacher: Path, arch: str) -> None:
    """The student's compression record (a dry-run `distilsd compress` of the teacher): which
    teacher tensor each student tensor came from, what `distilsd lora transfer` reads."""
    from distilsd.compress import compress

    record = compress(teacher, arch, dry_run=True).record()
    record["teacher"] = {"name": "shapes", "kind": "builtin", "description": "the built-in Shapes teacher"}
    record["made_by"] = (
        f"distilsd compress --teacher shapes --arch {arch}: the student's layout and initialisation"
    )
    (unet_dir / "distilsd_compress.json").write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, type=Path, help="Teacher pipeline folder.")
    parser.add_argument("--student", required=True, type=Path, help="Distilled student pipeline folder.")
    parser.add_argument(
        "--vae",
        type=Path,
        help="Pipeline folder whose vae/ to ship instead of the teacher's (the decoder fine-tune, "
        "shapes-vae-decoder; its encoder must be the teacher's).",
    )
    args = parser.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from distilsd.shapes.model import TEXT_TOKENS

    tokens = json.loads((args.teacher / "tokenizer" / "tokenizer_config.json").read_text())[
        "model_max_length"
    ]
    if tokens != TEXT_TOKENS:
        raise SystemExit(
            f"{args.teacher} pads prompts to {tokens} tokens; the shipped tokenizer pads to {TEXT_TOKENS}"
        )

    tmp = SHIPPED.with_name("models.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    teacher_out, student_out = tmp / "shapes", tmp / "shapes-tiny"
    for cls, name in (
        (AutoencoderKL, "vae"),
        (CLIPTextModel, "text_encoder"),
        (UNet2DConditionModel, "unet"),
    ):
        model = cls.from_pretrained(args.teacher, subfolder=name).to(torch.float16)
        if name == "vae" and args.vae:
            tuned = cls.from_pretrained(args.vae, subfolder="vae").to(torch.float16)
            # The U-Net was trained in the teacher VAE's latent space: the encoders must agree.
            for key, tensor in model.encoder.state_dict().items():
                if not torch.equal(tensor, tuned.encoder.state_dict()[key]):
                    raise SystemExit(f"{args.vae}/vae has another encoder than the teacher's ({key})")
            if tuned.config.scaling_factor != model.config.scaling_factor:
                raise SystemExit(f"{args.vae}/vae has another scaling factor than the teacher's")
            model = tuned
        model.save_pretrained(teacher_out / name, safe_serialization=True)
    shutil.copytree(args.teacher / "scheduler", teacher_out / "scheduler")
    index = json.loads((args.teacher / "model_index.json").read_text())
    for unused in ("safety_checker", "feature_extractor", "image_encoder"):
        index[unused] = [None, None]
    (teacher_out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    unet = UNet2DConditionModel.from_pretrained(args.student, subfolder="unet").to(torch.float16)
    unet.save_pretrained(student_out / "unet", safe_serialization=True)
    arch = json.loads((args.student / "distill_info.json").read_text())["arch"]
    write_compress_record(student_out / "unet", args.teacher, arch)
    provenance = {
        "shapes": json.loads((args.teacher / "distill_info.json").read_text()),
        "shapes/vae": json.loads(((args.vae or args.teacher) / "distill_info.json").read_text()),
        "shapes-tiny": json.loads((args.student / "distill_info.json").read_text()),
    }
    # The commands that rerun each model from scratch (the Makefile's shapes-model target).
    ship = "python scripts/ship_shapes_model.py " + " ".join(
        f"--{flag} {path}"
        for flag, path in (("teacher", args.teacher), ("student", args.student), ("vae", args.vae))
        if path
    )
    provenance["shapes"]["commands"] = [*TEACHER_COMMANDS, ship]
    provenance["shapes/vae"]["commands"] = [*DATA_COMMANDS, "distilsd train -c shapes-vae-decoder", ship]
    provenance["shapes-tiny"]["commands"] = [*TEACHER_COMMANDS, "distilsd distill -c shapes-tiny-kd", ship]
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if SHIPPED.exists():
        shutil.rmtree(SHIPPED)
    tmp.rename(SHIPPED)
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    print(f"wrote {SHIPPED} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
