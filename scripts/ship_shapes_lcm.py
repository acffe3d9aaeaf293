"""Copy the Shapes LCM student (``distilsd distill -c shapes-tiny-lcm``) into the package, in fp16.

    python scripts/ship_shapes_lcm.py --run runs/shapes/tiny-lcm

Writes src/distilsd/shapes/assets/models/shapes-tiny-lcm/: unet/ (fp16 safetensors, as
shapes-tiny/unet), scheduler/ (the run's LCMScheduler), model_index.json (the teacher's, with
that scheduler) and distill_info.json (steps, guidance: what generate, serve and shapes eval
default to), and its entry in provenance.json. The VAE and text encoder are the shipped
teacher's, which the recipe's run copied from the built-in ``shapes-tiny``: this refuses a run
whose vae/ or text_encoder/ differs from them. The run folder's final unet/ is what the run
was trained to give: the EMA of the trained weights where the run kept one (the recipe does),
else the trained weights. ``--step N`` takes that U-Net from checkpoints/checkpoint-N/ instead
(unet_ema/ or unet/; never unet_target/, LCD's slow target network). Run it after
ship_shapes_model.py, which rewrites the assets folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "distilsd" / "shapes" / "assets" / "models"
NAME = "shapes-tiny-lcm"
RECIPE_COMMAND = "distilsd distill -c shapes-tiny-lcm"


def _check_same_weights(run: Path, component: str, cls) -> None:
    """The run's ``component`` must be the shipped teacher's (up to the fp16 it is stored in)."""
    shipped = cls.from_pretrained(SHIPPED / "shapes", subfolder=component).state_dict()
    trained = cls.from_pretrained(run, subfolder=component).to(torch.float16).state_dict()
    for key, tensor in shipped.items():
        if not torch.equal(tensor.to(torch.float16), trained[key]):
            raise SystemExit(f"{run}/{component} is not the shipped teacher's ({key} differs)")


def write_provenance(name: str, entry: dict) -> None:
    """Set ``name``'s entry of the shipped provenance.json (atomically; its "note" stays last)."""
    path = SHIPPED / "provenance.json"
    provenance = json.loads(path.read_text())
    note = provenance.pop("note", None)
    provenance[name] = entry
    if note is not None:
        provenance["note"] = note
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", required=True, type=Path, help="The LCM run folder (distill_info.json method lcm)."
    )
    parser.add_argument(
        "--step",
        type=int,
        help="Ship checkpoint-STEP's U-Net (unet_ema/ or unet/) instead of the final unet/.",
    )
    args = parser.parse_args()

    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from distilsd.models import builtin_folder

    info = json.loads((args.run / "distill_info.json").read_text())
    if info.get("method") != "lcm" or info.get("unet") not in ("raw", "ema"):
        raise SystemExit(f"{args.run} is not an LCM run whose unet/ holds the trained or EMA weights")
    for component, cls in (("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        _check_same_weights(args.run, component, cls)
    unet_dir = args.run / "unet"
    if args.step is not None:
        checkpoint = args.run / "checkpoints" / f"checkpoint-{args.step}"
        unet_dir = checkpoint / ("unet_ema" if info["unet"] == "ema" else "unet")
        if not (checkpoint / "trainer_state.json").is_file() or not unet_dir.is_dir():
            raise SystemExit(f"{checkpoint} is not a checkpoint of {args.run} with {unet_dir.name}/")
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if state["global_step"] != args.step:
            raise SystemExit(f"{checkpoint} holds step {state['global_step']}, not {args.step}")
        info["steps"] = args.step
    info["unet_raw"] = None  # the run's unet_raw/ (an EMA run's trained weights) is not shipped
    scheduler = LCMScheduler.from_pretrained(args.run, subfolder="scheduler")

    out = SHIPPED / NAME
    tmp = SHIPPED / f"{NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float16)
    if unet.config.time_cond_proj_dim is None:
        raise SystemExit(f"{unet_dir} has no guidance embedding (time_cond_proj_dim): not an LCM U-Net")
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    # The LCM student starts from shapes-tiny: the same layout, so its compression record
    # (for `distilsd lora transfer`) is shapes-tiny's.
    shutil.copy2(SHIPPED / "shapes-tiny" / "unet" / "distilsd_compress.json", tmp / "unet")
    scheduler.save_pretrained(tmp / "scheduler")
    index = json.loads((SHIPPED / "shapes" / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    # The run recorded cache folders; say which built-ins they are, as the recipe does.
    names = {str(builtin_folder(name)): name for name in ("shapes", "shapes-tiny")}
    info["teacher"] = names.get(info["teacher"], info["teacher"])
    info["model"] = names.get(info["model"], info["model"])
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    student = names.get(config["student"], config["student"])
    (tmp / "distill_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

    ship = f"python scripts/ship_shapes_lcm.py --run {args.run}" + (
        f" --step {args.step}" if args.step is not None else ""
    )
    before = json.loads((SHIPPED / "provenance.json").read_text())["shapes-tiny"]["commands"]
    write_provenance(
        NAME,
        {
            **info,
            "student": student,
            "unet_from": str(unet_dir),
            # From scratch: the built-ins the recipe starts from (make shapes-model), then the
            # recipe and this script. Numbers measured on the shipped weights are added by hand
            # ("measured", docs/lcm.md): shipping new weights drops them.
            "commands": [*before, RECIPE_COMMAND, ship],
        },
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
