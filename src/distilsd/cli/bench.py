"""``distilsd bench``: speed and memory of models x dtypes x backends, per component."""

from __future__ import annotations

import click

from distilsd.cli.options import device_option
from distilsd.models import DTYPES


def _split(values: tuple[str, ...]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


@click.command("bench", context_settings={"show_default": True})
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    help="Model (repeat or comma-separate): sd-v1, sd-v2, bk-base/bk-small/bk-tiny (= sd-v1:bk-*), sd-v2:bk-tiny (random weights), or a pipeline folder / hub id / built-in name.",
)
@click.option(
    "--row",
    "rows",
    multiple=True,
    help="One configuration (repeatable), after the --model grid: 'MODEL key=value ...' with dtype, backend, steps, guidance (cfg: U-Net batch 2 | none: batch 1 | embedded: an LCM student's guidance embedding, batch 1, LCMScheduler), decoder (full | tiny | a tiny VAE folder), deepcache (N), tome (token merging ratio). Rows measure the whole image with --components ...,pipeline.",
)
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    default=("fp32",),
    help=", ".join(DTYPES) + " (repeat or comma-separate).",
)
@click.option(
    "--backend",
    "backends",
    multiple=True,
    default=("pytorch",),
    help="Backends (repeat or comma-separate): pytorch, and with distilsd[deploy] openvino, openvino-int8, onnx. The --dtype of an exported backend is its inference precision.",
)
@click.option(
    "-r",
    "--resolution",
    "resolutions",
    multiple=True,
    default=("512",),
    help="Image sizes in pixels (repeat or comma-separate).",
)
@click.option(
    "-c",
    "--components",
    "components",
    multiple=True,
    default=("unet",),
    help="text_encoder, unet, vae_decode, pipeline (repeat or comma-separate).",
)
@click.option(
    "--batch-size",
    default=None,
    type=int,
    show_default="2; an LCM model: 1, guidance embedded",
    help="U-Net / text encoder batch (2 = one image with classifier-free guidance).",
)
@click.option(
    "--steps",
    default=None,
    type=int,
    show_default="25; an LCM model: its own",
    help="Steps per image for the end-to-end estimate and the pipeline component.",
)
@click.option("--warmup", default=1, type=int, help="Warm-up rounds (not measured).")
@click.option("--repeats", default=3, type=int, help="Measured rounds; the report gives medians.")
@click.option(
    "--baseline",
    default=None,
    help="Model the speed-ups are computed against, on the first --dtype and --backend (default: the first model).",
)
@device_option()
@click.option("--threads", default=None, type=int, help="torch threads per worker (default: torch's choice).")
@click.option(
    "--max-workers",
    default=None,
    type=int,
    help="Models in memory at once (default: all); configurations then run in groups, dtype by dtype.",
)
@click.option(
    "--worker-start",
    type=click.Choice(["spawn", "forkserver"]),
    default=None,
    help="How workers start. spawn (default): a fresh process each, whose peak RAM is a standalone "
    "process's. forkserver: they fork from one process that imported torch and diffusers once (~8 s "
    "less per configuration on 2 cores); their peak RAM then leaves out library pages a worker never "
    "touched (~0.3 GiB), so it reads lower.",
)
@click.option(
    "-o",
    "--output-dir",
    default="bench-results",
    type=click.Path(file_okay=False),
    help="Folder for bench.json, bench.md and bench.png.",
)
@click.option("--no-chart", is_flag=True, help="Do not draw bench.png (needs matplotlib).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def bench_command(
    models, rows, dtypes, backends, resolutions, components, output_dir, no_chart, quiet, **options
):
    """Measure latency and memory: every model x dtype x backend, interleaved, medians.

    Each configuration runs in its own worker process; rounds go over all configurations
    in turn. Prints the Markdown table on stdout and writes bench.json (with versions and
    hardware), bench.md and bench.png into --output-dir.

    \b
    Example:
      distilsd bench -m sd-v1,bk-base,bk-small,bk-tiny --dtype fp32,bf16 -r 256,512 --warmup 1 --repeats 3
      distilsd bench --row "sd-v1 steps=50" --row "bk-tiny steps=25 decoder=tiny" \
          -c text_encoder,unet,vae_decode,pipeline      # whole images, docs/fast.md
    """
    from distilsd.errors import InputError
    from distilsd.evaluate.bench import BenchSettings, markdown_table, run_benchmark, write_reports

    try:
        resolution_values = [int(value) for value in _split(resolutions)]
    except ValueError:
        raise InputError(
            f"--resolution takes whole numbers of pixels, got {', '.join(resolutions)}"
        ) from None
    settings = BenchSettings(
        models=_split(models),
        dtypes=_split(dtypes),
        backends=_split(backends),
        resolutions=resolution_values,
        components=_split(components),
        rows=list(rows),
        **options,
    )
    settings.validate()
    if not no_chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from distilsd.errors import MissingDependencyError

            raise MissingDependencyError(
                "matplotlib", "eval", "the benchmark chart (or pass --no-chart)"
            ) from None
    say = None if quiet else (lambda text: click.echo(text, err=True))
    # After each group of workers the reports so far are written (marked incomplete), so a
    # long run that is stopped or runs out of memory keeps what it measured.
    results = run_benchmark(
        settings,
        progress=say,
        on_group_done=lambda partial: write_reports(partial, settings, output_dir, chart=False),
    )
    paths = write_reports(results, settings, output_dir, chart=not no_chart)
    click.echo(markdown_table(results, settings), nl=False)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}", err=True)
    if results["failed"]:
        from distilsd.errors import ModelLoadError

        raise ModelLoadError(
            f"not measured (the worker died): {', '.join(results['failed'])}; the reports hold the rest",
            hint="usually out of memory: lower --max-workers, or benchmark those configurations on their own",
        )
