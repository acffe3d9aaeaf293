"""Copy the Shapes tiny decoder (``distilsd train -c shapes-tiny-vae``) into the package, in fp16.

    python scripts/ship_shapes_tiny_vae.py --run runs/shapes/tiny-vae-12k --max-steps 12000

Writes src/distilsd/shapes/assets/models/shapes/tiny_vae/: the run's AutoencoderTiny (fp16
safetensors) and its distill_info.json (what it was trained against: latent channels and
scaling, checked when it is attached to a pipeline), and its entry in provenance.json. The
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
    parser.add_argument(
        "--max-steps",
        type=int,
        help="The run's --max-steps, when it differs from the recipe's (for provenance).",
    )
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

    recipe = "distilsd train -c shapes-tiny-vae" + (
        f" --max-steps {args.max_steps} -o {args.run}" if args.max_steps else ""
    )
    ship = f"python scripts/ship_shapes_tiny_vae.py --run {args.run}" + (
        f" --max-steps {args.max_steps}" if args.max_steps else ""
    )
    # The data the recipe reads, then the recipe against the built-in shapes VAE, then this.
    data = "distilsd shapes make-data -o runs/shapes/data --count 20000 --seed 0"
    write_provenance(NAME, {**info, "commands": [data, recipe, ship]})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
