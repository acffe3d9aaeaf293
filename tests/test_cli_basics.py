import subprocess
import sys

from click.testing import CliRunner

from distilsd.cli import COMMANDS, cli


def test_every_command_has_help():
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
        sub = runner.invoke(cli, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage:" in sub.output


def test_help_does_not_import_torch():
    # `distilsd --help` must stay fast: the heavy stages are imported lazily.
    code = "import sys; from distilsd.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_tokenizer_gives_standard_clip_ids():
    from distilsd.assets import clip_tokenizer

    tokenizer = clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
