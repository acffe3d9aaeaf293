"""Copy the Shapes tiny decoder (``distilsd train -c shapes-tiny-vae``) into the package, in fp16.

    python scripts/ship_shapes_tiny_vae.py --run runs/shapes/tiny-vae-ft

Writes src/distilsd/shapes/assets/models/shapes/tiny_vae/: the run's AutoencoderTiny (fp16
safetensors) and its distill_info.json (what it was trained against: latent channels and
scaling, checked when it is attached to a pipeline), and its entry in provenance.json, whose
commands are read back from the run's config.yaml: a run that fine-tuned another tiny VAE
(``--student RUN``) is preceded by that run's command, so a two-stage decoder names both. The
built-in ``shapes`` and ``shapes-tiny`` folders copy it, so ``generate --vae tiny`` picks it
for either. Run it after ship_shapes_model.py, which rewrites the assets folder. The gate,
``distilsd shapes check-vae -m shapes --tiny-vae RUN``, is checked by hand before shipping
(docs/fast.md has its numbers); shipping new weights drops the "measured" numbers there.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from ship_shapes_lcm import SHIPPED, write_provenance  # scripts/ is on the path when run from it

NAME = "shapes/tiny_vae"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="The tiny VAE run folder.")
    args = parser.parse_args()

    from diffusers import AutoencoderTiny

    info = json.loads((args.run / "distill_info.json").read_text())
    if info.get("trained") != "tiny-vae" or info.get("model") != "shapes":
        raise SystemExit(f"{args.run} is not a tiny VAE trained against the built-in shapes VAE")
    out = SHIPPED / "shapes" / "tiny_vae"
    tmp = out.with_name("tiny_vae.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny = AutoencoderTiny.from_pretrained(args.run, torch_dtype=torch.float16)
    tiny.save_pretrained(tmp, safe_serialization=True)
    (tmp / "distill_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

    stages = training_commands(args.run)
    ship = f"python scripts/ship_shapes_tiny_vae.py --run {args.run}"
    # The data the recipe reads, then the recipe's stage(s) against the built-in shapes VAE, then this.
    data = "distilsd shapes make-data -o runs/shapes/data --count 20000 --seed 0"
    total = sum(steps for _, steps in stages)
    write_provenance(
        NAME, {**info, "total_steps": total, "commands": [data, *(command for command, _ in stages), ship]}
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")


# Settings that do not change what is trained (or are given as flags): left out of the commands.
BOOKKEEPING = {"output_dir", "student", "max_steps", "resume", "overwrite", "checkpoint_every",
               "keep_checkpoints", "log_every", "progress_bar"}  # fmt: skip


def training_commands(run: Path) -> list[tuple[str, int]]:
    """``(command, steps)`` of each stage that made ``run``, first stage first, from the config.yaml files.

    A stage's command is the recipe plus every setting that differs from it; a ``student`` (a
    tiny VAE fine-tuned further) that is itself a run folder adds that run's stages before.
    """
    from distilsd.distill import load_config
    from distilsd.distill.config import TrainConfig, to_flat_dict

    saved = load_config(run / "config.yaml")
    train_defaults = TrainConfig()  # as `distilsd train` starts: task loss only
    train_defaults.loss.l_out = train_defaults.loss.l_feat = 0.0
    recipe = to_flat_dict(load_config("shapes-tiny-vae", base=train_defaults))
    changed = {
        key: value
        for key, value in to_flat_dict(saved).items()
        if key not in BOOKKEEPING and value != recipe.get(key)
    }
    command = "distilsd train -c shapes-tiny-vae"
    earlier: list[tuple[str, int]] = []
    if saved.student:
        command += f" --student {saved.student}"
        if (Path(saved.student) / "config.yaml").is_file():
            earlier = training_commands(Path(saved.student))
    command += f" --max-steps {saved.max_steps}"
    command += "".join(
        f" {key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in changed.items()
    )
    steps = json.loads((run / "distill_info.json").read_text())["steps"]
    return [*earlier, (f"{command} -o {run}", steps)]


if __name__ == "__main__":
    main()
