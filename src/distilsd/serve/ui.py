"""The Gradio web UI, mounted at ``/ui`` of the API's FastAPI app and sharing its service.

Two tabs: *Generate* (prompt, negative prompt, steps, guidance, seed, size, scheduler,
model, number of images; live progress; a gallery of PNGs that download with their
parameters embedded) and *Compare* (the same prompt and seed on two models side by side,
with their times: teacher vs student, as in BK-SDM's demo).
"""

from __future__ import annotations

import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

from distilsd.errors import DistilSDError, MissingDependencyError
from distilsd.models import default_guidance
from distilsd.schedulers import SCHEDULERS
from distilsd.serve.service import MIN_SIZE, GenerationRequest, Job, ServeSettings, Service

MODEL_SCHEDULER = "model default"
KEEP_FILES = 256  # PNGs kept on disk for the UI's gallery and downloads


class PngStore:
    """PNGs the UI hands to Gradio, in a private temp folder under names we choose.

    Nothing from a request becomes a path: names are the job id and an index. Only the
    newest KEEP_FILES files are kept (Gradio keeps its own copies in its cache).
    """

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="distilsd-serve-"))
        self._files: list[Path] = []
        self._lock = threading.Lock()

    def save(self, job: Job) -> list[str]:
        paths = []
        for k, image in enumerate(job.images):
            path = self.folder / f"{job.model[:40].replace('/', '_')}-{image.seed}-{job.id[:8]}-{k}.png"
            path.write_bytes(image.png)
            paths.append(str(path))
        with self._lock:
            self._files.extend(Path(p) for p in paths)
            while len(self._files) > KEEP_FILES:
                self._files.pop(0).unlink(missing_ok=True)
        return paths


def wait_with_progress(job: Job, progress: Any, desc: str) -> None:
    """Block until ``job`` is done, reporting its steps to Gradio's progress bar."""
    while not job.wait(0.2):
        if job.status == "queued":
            progress(0.0, desc=f"{desc}: waiting in the queue")
        else:
            progress((job.step, max(job.total_steps, 1)), desc=desc, unit="steps")


def build_ui(service: Service, settings: ServeSettings, store: PngStore):
    import gradio as gr

    models = list(service.pipelines)
    default_width, default_height = service.pipelines[service.default_model].default_size
    scheduler_choices = [MODEL_SCHEDULER, *SCHEDULERS]

    def run(request: GenerationRequest, progress: Any, desc: str) -> Job:
        try:
            job = service.submit(request)
            wait_with_progress(job, progress, desc)
            job.result()
        except DistilSDError as exc:
            raise gr.Error(str(exc)) from None
        return job

    def generate(
        prompt,
        negative,
        steps,
        guidance,
        seed,
        width,
        height,
        scheduler,
        model,
        num_images,
        progress=gr.Progress(),  # noqa: B008 (how Gradio injects progress)
    ):
        request = GenerationRequest(
            prompt=prompt or "",
            negative_prompt=negative or "",
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            width=int(width),
            height=int(height),
            seed=None if seed is None or int(seed) < 0 else int(seed),
            scheduler=None if scheduler == MODEL_SCHEDULER else scheduler,
            model=model,
            batch_size=int(num_images),
        )
        job = run(request, progress, f"generating on {model}")
        paths = store.save(job)
        gallery = [(path, f"seed {image.seed}") for path, image in zip(paths, job.images, strict=True)]
        info = f"{job.images[0].parameters}\n\n{len(job.images)} image(s) in {job.run_seconds:.2f} s on {job.model}"
        return gallery, paths, job.seeds[0], info

    def compare(prompt, negative, steps, guidance, seed, model_a, model_b, progress=gr.Progress()):  # noqa: B008 (how Gradio injects progress)
        seed = secrets.randbelow(2**32) if seed is None or int(seed) < 0 else int(seed)
        outputs = []
        # One after the other, so that each time is the model's own and not a shared CPU's.
        for label, model in (("A", model_a), ("B", model_b)):
            request = GenerationRequest(
                prompt=prompt or "", negative_prompt=negative or "", num_inference_steps=int(steps),
                guidance_scale=float(guidance), seed=seed, model=model,
            )  # fmt: skip
            job = run(request, progress, f"model {label}: {model}")
            outputs.append((store.save(job)[0], job))
        (path_a, job_a), (path_b, job_b) = outputs
        summary = (
            f"seed {seed}: **{job_a.model}** {job_a.run_seconds:.2f} s vs **{job_b.model}** {job_b.run_seconds:.2f} s "
            f"({job_a.run_seconds / max(job_b.run_seconds, 1e-9):.2f}x)"
        )
        return (
            gr.update(value=path_a, label=f"A: {job_a.model} ({job_a.run_seconds:.2f} s)"),
            gr.update(value=path_b, label=f"B: {job_b.model} ({job_b.run_seconds:.2f} s)"),
            summary,
            seed,
        )

    def model_guidance(model) -> float:
        return default_guidance(service.pipelines[model].source)

    def on_model_change(model):
        return (*service.pipelines[model].default_size, model_guidance(model))

    with gr.Blocks(title="distilsd", analytics_enabled=False, delete_cache=(600, 3600)) as blocks:
        gr.Markdown("## distilsd\nStable Diffusion, small and fast. The API is at [/docs](/docs).")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(
                        label="Prompt", lines=2, max_length=settings.max_prompt_length, elem_id="prompt"
                    )
                    negative = gr.Textbox(label="Negative prompt", max_length=settings.max_prompt_length)
                    with gr.Row():
                        model = gr.Dropdown(models, value=service.default_model, label="Model")
                        scheduler = gr.Dropdown(scheduler_choices, value=MODEL_SCHEDULER, label="Scheduler")
                    with gr.Row():
                        steps = gr.Slider(
                            1, settings.max_steps, value=min(25, settings.max_steps), step=1, label="Steps"
                        )
                        guidance = gr.Slider(
                            0,
                            20,
                            value=model_guidance(service.default_model),
                            step=0.5,
                            label="Guidance scale",
                        )
                    with gr.Row():
                        width = gr.Slider(
                            MIN_SIZE, settings.max_size, value=default_width, step=8, label="Width"
                        )
                        height = gr.Slider(
                            MIN_SIZE, settings.max_size, value=default_height, step=8, label="Height"
                        )
                    with gr.Row():
                        seed = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="seed")
                        reuse = gr.Button("Reuse last seed", size="sm")
                        num_images = gr.Slider(1, settings.max_images, value=1, step=1, label="Images")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=4):
                    gallery = gr.Gallery(
                        label="Images", columns=2, elem_id="gallery", buttons=["download", "fullscreen"]
                    )
                    files = gr.File(label="PNGs (parameters embedded)", file_count="multiple")
                    last_seed = gr.Number(
                        label="Seed used", precision=0, interactive=False, elem_id="seed-used"
                    )
                    info = gr.Textbox(label="Parameters", lines=4, interactive=False)
            inputs = [prompt, negative, steps, guidance, seed, width, height, scheduler, model, num_images]
            button.click(generate, inputs, [gallery, files, last_seed, info], api_name="generate")
            prompt.submit(generate, inputs, [gallery, files, last_seed, info], api_visibility="private")
            reuse.click(
                lambda used: used if used is not None else -1, last_seed, seed, api_visibility="private"
            )
            model.change(on_model_change, model, [width, height, guidance], api_visibility="private")
        with gr.Tab("Compare"):
            gr.Markdown(
                "The same prompt and seed on two models, one after the other, with their generation times."
            )
            with gr.Row():
                c_prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    max_length=settings.max_prompt_length,
                    scale=3,
                    elem_id="compare-prompt",
                )
                c_negative = gr.Textbox(
                    label="Negative prompt", max_length=settings.max_prompt_length, scale=2
                )
            with gr.Row():
                model_a = gr.Dropdown(models, value=models[0], label="Model A (e.g. the teacher)")
                model_b = gr.Dropdown(models, value=models[-1], label="Model B (e.g. the student)")
                c_steps = gr.Slider(
                    1,
                    settings.max_steps,
                    value=min(25, settings.max_steps),
                    step=1,
                    label="Steps",
                    elem_id="compare-steps",
                )
                c_guidance = gr.Slider(
                    0, 20, value=model_guidance(models[-1]), step=0.5, label="Guidance scale"
                )
                c_seed = gr.Number(-1, label="Seed (-1: random)", precision=0)
            c_button = gr.Button("Compare", variant="primary", elem_id="compare")
            summary = gr.Markdown(elem_id="compare-summary")
            with gr.Row():
                image_a = gr.Image(
                    label="A", type="filepath", format="png", interactive=False, elem_id="compare-a"
                )
                image_b = gr.Image(
                    label="B", type="filepath", format="png", interactive=False, elem_id="compare-b"
                )
            c_inputs = [c_prompt, c_negative, c_steps, c_guidance, c_seed, model_a, model_b]
            c_button.click(compare, c_inputs, [image_a, image_b, summary, c_seed], api_name="compare")
    return blocks


def mount_ui(app: Any, service: Service, settings: ServeSettings):
    """Mount the UI at ``/ui`` of ``app`` (a FastAPI app); returns the app."""
    try:
        import gradio as gr
    except ImportError:
        raise MissingDependencyError("gradio", "serve", "the distilsd web UI") from None

    store = PngStore()
    blocks = build_ui(service, settings, store)
    # Gradio's own queue only hands work to ours; our queue does the bounding (429).
    blocks.queue(default_concurrency_limit=max(settings.workers, 1) + settings.queue_size, api_open=False)
    # System fonts only: a localhost server should not make the browser fetch Google Fonts.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return gr.mount_gradio_app(
        app,
        blocks,
        path="/ui",
        server_name=settings.host,
        server_port=settings.port,
        footer_links=["api"],
        allowed_paths=[str(store.folder)],
        ssr_mode=False,
        theme=theme,
        mcp_server=False,
    )
