"""The Gradio web UI, mounted at ``/ui`` of the API's FastAPI app and sharing its service.

Three tabs: *Generate* (prompt, negative prompt, steps, guidance, seed, size, scheduler,
model, number of images, a LoRA picker when the server has ``--lora-dir``; live progress; a gallery of PNGs that download with their
parameters embedded), *Compare* (the same prompt and seed on up to four models side by
side with their times, the teacher first: "student 3.1x faster", as in BK-SDM's demo) and
*History* (every image made since the page was opened, with its parameters).
"""

from __future__ import annotations

import re
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

from distilsd.errors import DistilSDError, MissingDependencyError
from distilsd.schedulers import SCHEDULERS
from distilsd.serve.loras import LoRATag
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


MAX_COMPARE = 4  # models one Compare run can take
UNCONDITIONAL_NOTE = (
    "The prompt is empty: the images are unconditional (guided away from the negative prompt only)."
)
CSS = """
/* Small native sizes (the 64 px Shapes models) shown large, with crisp pixels. */
.big-image img, #gallery img, #history img { image-rendering: pixelated; }
.big-image img { width: 100% !important; height: 100% !important; object-fit: contain; }
/* The gallery grows with its images instead of cropping them in a scrolled box. */
#gallery .grid-wrap { height: auto !important; max-height: none !important; }
"""


def unet_parameters(service: Service, model: str) -> int:
    """Parameters of ``model``'s U-Net (0 when it is not a PyTorch module, e.g. an OpenVINO export)."""
    unet = service.pipelines[model].pipeline.unet
    parameters = getattr(unet, "parameters", None)
    return sum(p.numel() for p in parameters()) if callable(parameters) else 0


def compare_defaults(service: Service) -> list[str]:
    """The models Compare starts with: the largest U-Net first (the teacher), then the smallest (the student)."""
    by_size = sorted(service.pipelines, key=lambda name: -unet_parameters(service, name))
    return by_size[:1] + by_size[-1:] if len(by_size) > 1 else by_size


def speed_summary(seed: int, jobs: list[Job]) -> str:
    """Markdown: each model's time, and how much faster (or slower) than the first (the reference).

    The steps are said once when every model ran the same, else per model (an LCM model's own 4).
    """
    reference = jobs[0]
    steps = {job.request.num_inference_steps for job in jobs}
    same = len(steps) == 1

    def ran(job: Job) -> str:
        return "" if same else f" ({job.request.num_inference_steps} steps)"

    head = f"Seed {seed}, {steps.pop()} steps." if same else f"Seed {seed}, each model at its own steps."
    lines = [f"{head} **{reference.model}** (reference){ran(reference)}: {reference.run_seconds:.2f} s"]
    for job in jobs[1:]:
        ratio = reference.run_seconds / max(job.run_seconds, 1e-9)
        relation = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
        lines.append(
            f"**{job.model}**{ran(job)}: {job.run_seconds:.2f} s, **{relation}** than {reference.model}"
        )
    return "\n\n".join(lines)


def add_lora_tag(prompt: str | None, name: str | None, weight: float) -> str:
    """``prompt`` with ``<lora:name:weight>`` appended, or that LoRA's tag given the new weight if it has one."""
    import gradio as gr

    from distilsd.serve.loras import tag_text

    if not name:
        raise gr.Error("choose a LoRA first")
    prompt = prompt or ""
    tag = tag_text(name, float(weight))
    existing = re.compile(rf"<(?:lora|lyco):{re.escape(name)}(?::[^>]*)?>")
    if existing.search(prompt):
        return existing.sub(lambda _: tag, prompt, count=1)
    return f"{prompt.rstrip()} {tag}".lstrip()


def check_size(value: Any, label: str, settings: ServeSettings) -> int:
    """A width or height from the UI, or a message saying what range is accepted (never a silent clamp)."""
    import gradio as gr

    if (
        value is None
        or int(value) != value
        or int(value) % 8
        or not MIN_SIZE <= int(value) <= settings.max_size
    ):
        raise gr.Error(
            f"{label} {value} is out of range: give a multiple of 8 between {MIN_SIZE} and {settings.max_size}"
        )
    return int(value)


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

    def remember(history: list, paths: list[str], job: Job) -> list:
        """The page's history with ``job``'s images added (newest first)."""
        entries = [
            (
                path,
                f"{job.model} · seed {image.seed} · {job.request.num_inference_steps} steps",
                image.parameters,
            )
            for path, image in zip(paths, job.images, strict=True)
        ]
        return entries[::-1] + history

    def history_outputs(history: list):
        return history, [(path, caption) for path, caption, _ in history]

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
        history,
        progress=gr.Progress(),  # noqa: B008 (how Gradio injects progress)
    ):
        width, height = check_size(width, "Width", settings), check_size(height, "Height", settings)
        if not (prompt or "").strip():
            gr.Warning(UNCONDITIONAL_NOTE)
        request = GenerationRequest(
            prompt=prompt or "",
            negative_prompt=negative or "",
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            width=width,
            height=height,
            seed=None if seed is None or int(seed) < 0 else int(seed),
            scheduler=None if scheduler == MODEL_SCHEDULER else scheduler,
            model=model,
            batch_size=int(num_images),
        )
        job = run(request, progress, f"generating on {model}")
        paths = store.save(job)
        gallery = [(path, f"seed {image.seed}") for path, image in zip(paths, job.images, strict=True)]
        info = f"{job.images[0].parameters}\n\n{len(job.images)} image(s) in {job.run_seconds:.2f} s on {job.model}"
        if not request.prompt.strip():
            info = f"{UNCONDITIONAL_NOTE}\n\n{info}"
        return gallery, paths, str(job.seeds[0]), info, *history_outputs(remember(history, paths, job))

    def compare(prompt, negative, steps, guidance, seed, chosen, own, history, progress=gr.Progress()):  # noqa: B008 (how Gradio injects progress)
        chosen = list(dict.fromkeys(chosen or []))  # in the order picked, each once
        if not 1 <= len(chosen) <= MAX_COMPARE:
            raise gr.Error(f"choose between 1 and {MAX_COMPARE} models to compare")
        if not (prompt or "").strip():
            gr.Warning(UNCONDITIONAL_NOTE)
        seed = secrets.randbelow(2**32) if seed is None or int(seed) < 0 else int(seed)
        jobs, paths = [], []
        # One after the other, so that each time is the model's own and not a shared CPU's.
        for k, model in enumerate(chosen):
            # own: None lets the service give each model its defaults (an LCM model's 4 steps).
            request = GenerationRequest(
                prompt=prompt or "", negative_prompt=negative or "", num_inference_steps=None if own else int(steps),
                guidance_scale=None if own else float(guidance), seed=seed, model=model,
            )  # fmt: skip
            job = run(request, progress, f"model {k + 1}/{len(chosen)}: {model}")
            jobs.append(job)
            paths.append(store.save(job)[0])
            history = remember(history, paths[-1:], job)
        slots = []
        for k in range(MAX_COMPARE):
            if k < len(jobs):
                role = (
                    "reference" if k == 0 else f"{jobs[0].run_seconds / max(jobs[k].run_seconds, 1e-9):.1f}x"
                )
                label = f"{jobs[k].model} ({jobs[k].request.num_inference_steps} steps, {jobs[k].run_seconds:.2f} s, {role})"
                slots.append(gr.update(value=paths[k], label=label, visible=True))
            else:
                slots.append(gr.update(value=None, visible=False))
        summary = speed_summary(seed, jobs)
        if not (prompt or "").strip():
            summary = f"{UNCONDITIONAL_NOTE}\n\n{summary}"
        return (*slots, summary, seed, *history_outputs(history))

    def show_parameters(history: list, event: gr.SelectData):
        return history[event.index][2] if history and event.index < len(history) else ""

    # Gradio finds its event argument by the annotation's class; this module's annotations are strings.
    show_parameters.__annotations__["event"] = gr.SelectData

    def on_model_change(model):
        steps, guidance = service.model_defaults(model)
        return (*service.pipelines[model].default_size, min(steps, settings.max_steps), guidance)

    def on_lora_added(name, model, steps, guidance):
        """An LCM-LoRA just added to the prompt moves the sliders to its own steps and guidance, as
        picking an LCM model does (the sliders' values are sent as given; its scheduler is lcm)."""
        if not name or service.loras is None:
            return steps, guidance
        try:
            lora = service.loras.find(name)
        except DistilSDError:
            return steps, guidance
        few_step = service.few_step_of(model, [(lora, LoRATag(name))])
        if few_step is None or not few_step.lora:
            return steps, guidance
        steps, guidance, _ = service.sampling_defaults(model, None, None, None, few_step)
        return min(steps, settings.max_steps), guidance

    with gr.Blocks(title="distilsd", analytics_enabled=False, delete_cache=(600, 3600)) as blocks:
        gr.Markdown("## distilsd\nStable Diffusion, small and fast. The API is at [/docs](/docs).")
        history = gr.State([])  # this page's images: (path, caption, parameters), newest first
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
                            1,
                            settings.max_steps,
                            value=min(service.model_defaults(service.default_model)[0], settings.max_steps),
                            step=1,
                            label="Steps",
                            elem_id="steps",
                        )
                        guidance = gr.Slider(
                            0,
                            20,
                            value=service.model_defaults(service.default_model)[1],
                            step=0.5,
                            label="Guidance scale",
                        )
                    with gr.Row():
                        size_info = f"multiple of 8, {MIN_SIZE}..{settings.max_size}"
                        width = gr.Number(
                            default_width, label="Width", info=size_info, precision=0, step=8, elem_id="width"
                        )
                        height = gr.Number(
                            default_height,
                            label="Height",
                            info=size_info,
                            precision=0,
                            step=8,
                            elem_id="height",
                        )
                    with gr.Row():
                        seed = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="seed")
                        reuse = gr.Button("Reuse last seed", size="sm")
                        num_images = gr.Slider(1, settings.max_images, value=1, step=1, label="Images")
                    lora_names = [item["name"] for item in service.loras.listing()] if service.loras else []
                    with gr.Row(visible=bool(lora_names)):
                        # Adds AUTOMATIC1111's <lora:NAME:WEIGHT> to the prompt, where the service reads it.
                        lora_pick = gr.Dropdown(
                            lora_names, value=None, label="LoRA", elem_id="lora-pick", scale=2
                        )
                        lora_weight = gr.Slider(
                            -2, 2, value=1.0, step=0.05, label="LoRA weight", elem_id="lora-weight", scale=2
                        )
                        lora_add = gr.Button("Add to prompt", size="sm", elem_id="lora-add", scale=1)
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=4):
                    gallery = gr.Gallery(
                        label="Images",
                        columns=2,
                        object_fit="contain",
                        elem_id="gallery",
                        buttons=["download", "fullscreen"],
                    )
                    files = gr.File(label="PNGs (parameters embedded)", file_count="multiple")
                    last_seed = gr.Textbox(
                        "", label="Seed used", interactive=False, max_lines=1, elem_id="seed-used"
                    )
                    info = gr.Textbox(label="Parameters", lines=4, interactive=False, elem_id="parameters")
        with gr.Tab("Compare"):
            gr.Markdown(
                "The same prompt and seed on several models, one after the other, with their times. "
                "The first model is the reference (by default the largest U-Net: the teacher)."
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
                c_models = gr.Dropdown(
                    models,
                    value=compare_defaults(service),
                    multiselect=True,
                    max_choices=MAX_COMPARE,
                    label=f"Models (first = reference; up to {MAX_COMPARE})",
                    elem_id="compare-models",
                    scale=2,
                )
                # An LCM model beside a teacher: each at its own steps by default (4 against 25),
                # the comparison its users make; the sliders then set nothing.
                own_default = any(service.few_step.get(name) is not None for name in models)
                c_own = gr.Checkbox(
                    own_default,
                    label="Each model's own steps and guidance (an LCM model: its few steps)",
                    elem_id="compare-own",
                )
                c_steps = gr.Slider(
                    1,
                    settings.max_steps,
                    value=min(25, settings.max_steps),
                    step=1,
                    label="Steps",
                    elem_id="compare-steps",
                    interactive=not own_default,
                )
                c_guidance = gr.Slider(
                    0,
                    20,
                    value=service.model_defaults(models[-1])[1],
                    step=0.5,
                    label="Guidance scale",
                    interactive=not own_default,
                )
                c_seed = gr.Number(-1, label="Seed (-1: random)", precision=0)
            c_button = gr.Button("Compare", variant="primary", elem_id="compare")
            summary = gr.Markdown(elem_id="compare-summary")
            with gr.Row():
                slots = [
                    gr.Image(
                        label=f"Model {k + 1}",
                        type="filepath",
                        format="png",
                        interactive=False,
                        height=300,
                        min_width=256,
                        visible=k < 2,
                        elem_id=f"compare-{k}",
                        elem_classes=["big-image"],
                    )
                    for k in range(MAX_COMPARE)
                ]
        with gr.Tab("History"):
            gr.Markdown("Every image made since this page was opened; select one to see its parameters.")
            history_gallery = gr.Gallery(
                label="This session's images",
                columns=6,
                height=420,
                object_fit="contain",
                elem_id="history",
                buttons=["download", "fullscreen"],
            )
            history_parameters = gr.Textbox(
                label="Parameters", lines=4, interactive=False, elem_id="history-parameters"
            )
        inputs = [
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
            history,
        ]
        outputs = [gallery, files, last_seed, info, history, history_gallery]
        button.click(generate, inputs, outputs, api_name="generate")
        prompt.submit(generate, inputs, outputs, api_visibility="private")
        reuse.click(lambda used: int(used) if used else -1, last_seed, seed, api_visibility="private")
        lora_add.click(add_lora_tag, [prompt, lora_pick, lora_weight], prompt, api_name="add_lora").then(
            on_lora_added, [lora_pick, model, steps, guidance], [steps, guidance], api_visibility="private"
        )
        model.change(on_model_change, model, [width, height, steps, guidance], api_visibility="private")
        c_inputs = [c_prompt, c_negative, c_steps, c_guidance, c_seed, c_models, c_own, history]
        c_own.change(
            lambda own: (gr.update(interactive=not own), gr.update(interactive=not own)),
            c_own,
            [c_steps, c_guidance],
            api_visibility="private",
        )
        c_outputs = [*slots, summary, c_seed, history, history_gallery]
        c_button.click(compare, c_inputs, c_outputs, api_name="compare")
        history_gallery.select(show_parameters, history, history_parameters, api_visibility="private")
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
        css=CSS,
        mcp_server=False,
    )
