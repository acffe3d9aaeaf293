"""Every weight load goes through distilsd.models, which refuses pickles without --allow-pickle."""

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "distilsd"

# from_pretrained calls outside distilsd.models, and why each cannot load a pickle.
ALLOWED = {
    "shapes/model.py": "the tokenizer shipped in the package (no weights)",
    "assets/__init__.py": "the tokenizer shipped in the package (no weights)",
    "deploy/runtime.py": "a text encoder config and a tokenizer of an export (no weights)",
    "compress/teacher.py": "passes use_safetensors after its own pickle check (compress --allow-pickle)",
    "compress/export.py": "reloads the pipeline compress itself just wrote with safetensors",
    "tiny_vae.py": "use_safetensors=True: a pickle is never read",
    "distill/trainer.py": "the scheduler config of the base model (JSON, no weights)",
    "testing.py": "use_safetensors=True on the test pipelines it builds (models imports it: no cycle)",
}


def test_no_stray_from_pretrained():
    stray = []
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        if name == "models.py":
            continue
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        code = re.sub(r'""".*?"""', "", code, flags=re.S)
        if re.search(r"\.(from_pretrained|from_single_file)\(", code) and name not in ALLOWED:
            stray.append(name)
    assert stray == [], f"load weights with distilsd.models.load_component or load_torch_pipeline: {stray}"
