"""The trainer: knowledge distillation of a block-removed student, or plain SD training.

One class with a fixed life cycle (``setup``, ``train``, ``save_checkpoint``, ``save_final``,
``cleanup``), on :class:`accelerate.Accelerator`, so one CPU, one GPU and ``accelerate
launch`` over many GPUs or nodes run the same code. Mixed precision and DDP come from
accelerate; gradient accumulation is done here (explicit ``no_sync`` on all but the last
micro-batch) so that a step is always a full global batch.

Reproducibility: every random draw of a step (latent sample, noise, timesteps, noise offset)
comes from a generator seeded by (seed, step, micro-batch) for the whole *global* batch, and
each process takes its slice. The data order is a function of the step too
(:mod:`distilsd.distill.data`). A resumed run and a run with more processes at the same global
batch therefore follow the same loss curve (up to float rounding in the reductions).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distilsd.errors import DistilSDError, InputError, OutputError
from distilsd.models import load_component, torch_dtype

from . import checkpoint as ckpt
from .config import (
    TrainConfig,
    accelerate_mixed_precision,
    fingerprint,
    save_config,
    trajectory_fields,
)
from .losses import (
    FeatureRecorder,
    derive_feature_pairs,
    feature_kd_losses,
    min_snr_weights,
    output_kd_loss,
    sample_timesteps,
    task_loss,
    unwrap,
)
from .run_folder import COPIED_COMPONENTS, RunSummary

logger = logging.getLogger(__name__)


class TrainingDivergedError(DistilSDError):
    """The loss became NaN or infinite."""

    exit_code = 3


@dataclass
class StepResult:
    """What one optimizer step produced (for logging)."""

    terms: dict[str, float]
    grad_norm: float
    finite: bool


class Trainer:
    """Distills (or trains) one student U-Net as ``config`` says."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.lora = config.lora.rank is not None  # peft adapters instead of the weights themselves
        # The text encoder learns (all its weights, or its adapters): captions are encoded live.
        self.text_encoder_trains = (
            config.train_text_encoder or config.lora.text_encoder or bool(config.lora.token_embeddings)
        )
        self.word_embeddings = None  # lora.token_embeddings: the trained vectors (a WordEmbeddings)
        self.output_dir = Path(config.output_dir)
        self.global_step = 0
        self.skipped_steps = 0
        self.bad_samples = 0
        self.last_checkpoint: Path | None = None
        self._teacher_images = None
        self.given_teacher = config.teacher  # as the user named it (a built-in name stays a name)
        self.lcm_target = None  # LCM distillation: the target network (an EMA of the student)
        self.lcm_scheduler = None  # LCM distillation: the scheduler the student samples with
        self._csv_file = None
        self._csv_writer = None
        self._tb_writer = None
        self._wandb = None

    # ---- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        config = self.config
        if not config.output_dir:
            raise InputError("no output folder given", hint="pass -o RUN_DIR")
        if not (config.model or config.teacher):
            raise InputError("no model given", hint="pass --teacher MODEL (distill) or --model MODEL (train)")
        # Launched by torchrun / `accelerate launch` on machines without CUDA: gloo on the CPU
        # (accelerate only picks it when told the run is on the CPU).
        multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(
            mixed_precision=accelerate_mixed_precision(config.mixed_precision),
            gradient_accumulation_steps=1,
            cpu=multi_cpu or None,
        )
        accelerator = self.accelerator
        set_seed(config.seed)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.resume_from = self._check_output_dir()
        self._resolve_builtin_names()
        if self.resume_from is not None:
            # Before the models and the latent cache (minutes): a refused resume fails at once.
            ckpt.check_resume_config(
                self.resume_from, config, config.train_batch_size * accelerator.num_processes
            )
        self.weight_dtype = torch_dtype(config.mixed_precision)

        # The data listing is checked before any weights are loaded: a bad --data fails fast.
        from .data import open_source

        self.source = open_source(config.data)
        # data.refine_latents: each image's refined latent mean, by its pixels (_refined_means).
        self.refined_latents: dict[bytes, torch.Tensor] = {}
        if config.loss.prior_target == "base" and not self.source.prior_rows:
            logger.warning(
                'loss.prior_target is base, but no row of %s is marked "prior": true, so every row '
                "learns the noise; mark the class images in metadata.jsonl (as `distilsd dreambooth` does)",
                config.data.source,
            )
        self._load_models()
        self._setup_data()
        self._setup_optimization()
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
            self._open_logs()
        accelerator.wait_for_everyone()

    def _check_output_dir(self) -> Path | None:
        config = self.config
        if config.resume:
            return ckpt.find_checkpoint(config.resume, self.output_dir)
        if self.output_dir.exists() and any(self.output_dir.iterdir()) and not config.overwrite:
            hint = (
                "continue it with --resume latest"
                if ckpt.list_checkpoints(self.output_dir)
                else "choose a new folder or pass --overwrite"
            )
            raise OutputError(f"output folder {self.output_dir} is not empty", hint=hint)
        if config.overwrite and self.accelerator.is_main_process:
            for sub in ("checkpoints", "logs", "validation"):
                shutil.rmtree(self.output_dir / sub, ignore_errors=True)
        return None

    def _resolve_builtin_names(self) -> None:
        """Built-in names (shapes, shapes-tiny) stand for their local pipeline folders.

        Resolved before a resume's config check: checkpoints record the folders (whose names
        carry a hash of the shipped weights), so a resume with the name compares like with like.
        """
        from distilsd.models import BUILTIN_MODELS, builtin_folder

        for key in ("model", "teacher", "student"):
            if getattr(self.config, key) in BUILTIN_MODELS:
                setattr(self.config, key, str(builtin_folder(getattr(self.config, key))))

    def _load_models(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        config = self.config
        device = self.accelerator.device
        model = config.model or config.teacher
        self.model_path = model
        allow = config.allow_pickle
        self.tokenizer = load_component(
            CLIPTokenizer, model, "tokenizer", allow_pickle=allow, what="tokenizer"
        )
        self.text_encoder = load_component(
            CLIPTextModel,
            model,
            "text_encoder",
            allow_pickle=allow,
            what="text encoder",
            dtype=self.weight_dtype,
        )
        self.vae = load_component(
            AutoencoderKL, model, "vae", allow_pickle=allow, what="VAE", dtype=self.weight_dtype
        )
        self.noise_scheduler = load_component(
            DDPMScheduler, model, "scheduler", allow_pickle=allow, what="scheduler"
        )
        self.prediction_type = config.loss.prediction_type or self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(
                f"prediction type '{self.prediction_type}' is not supported",
                hint="use epsilon or v_prediction",
            )
        frozen_models = [self.vae] if config.train_text_encoder else [self.text_encoder, self.vae]
        for frozen in frozen_models:
            frozen.requires_grad_(False)
            frozen.eval()
            self._to(frozen)
        if config.train_text_encoder:
            if config.init == "random":
                with torch.random.fork_rng():
                    torch.manual_seed(config.seed + 1)
                    self.text_encoder = CLIPTextModel(self.text_encoder.config)
            self.text_encoder.to(dtype=torch.float32)
            self.text_encoder.requires_grad_(True)
            self.text_encoder.train()
        text_dim = self.text_encoder.config.hidden_size

        self.teacher = None
        if config.teacher:
            self.teacher = load_component(
                UNet2DConditionModel,
                config.teacher,
                "unet",
                allow_pickle=allow,
                what="teacher U-Net",
                dtype=torch.float32,  # the student is built from it; _to() casts it for mixed precision
            )
            if self.teacher.config.cross_attention_dim != text_dim:
                raise InputError(
                    f"the teacher's U-Net attends to {self.teacher.config.cross_attention_dim}-d text embeddings, but the text encoder of '{model}' gives {text_dim}-d",
                    hint="distill from a teacher of the same SD family as --model",
                )

        # The student: given by path, compressed from the base U-Net, or the base U-Net itself.
        self.layout_pairs: list[tuple[str, str]] | None = None
        # What `distilsd compress` records beside a student (distilsd_compress.json): which
        # teacher tensor each student tensor came from. The final U-Net keeps it, so that
        # `lora transfer` can carry the teacher's LoRAs over to the trained student.
        self.compress_record: dict[str, Any] | None = None
        if config.student:
            student_path = Path(config.student)
            subfolder = "unet" if (student_path / "unet" / "config.json").is_file() else None
            self.compress_record = _read_compress_record(student_path)
            student = load_component(
                UNet2DConditionModel,
                config.student,
                subfolder,
                allow_pickle=allow,
                what="student U-Net",
                dtype=torch.float32,
            )
        else:
            base = (
                self.teacher
                if self.teacher is not None
                else load_component(
                    UNet2DConditionModel, model, "unet", allow_pickle=allow, what="U-Net", dtype=torch.float32
                )
            )
            if config.arch:
                from distilsd.compress import build_student, get_layout

                layout = get_layout(config.arch, base.config)
                student, mapping = build_student(base, layout, init="teacher")
                self.layout_pairs = [tuple(p) for p in layout.feature_pairs]
                self.compress_record = {
                    "teacher": config.teacher or model,
                    "arch": layout.name,
                    "layout": layout.to_dict(),
                    "init": "teacher",
                    "removed_blocks": layout.removed_modules,
                    "mapping": mapping,
                    "made_by": f"distilsd {'distill' if self.teacher is not None else 'train'} --arch",
                }
            elif base is self.teacher:
                student = UNet2DConditionModel.from_config(base.config)
                student.load_state_dict(base.state_dict())
            else:
                student = base
        if config.init == "random":
            self.compress_record = None  # no tensor came from the teacher
            with torch.random.fork_rng():
                torch.manual_seed(config.seed)
                student = UNet2DConditionModel.from_config(student.config)
        if student.config.cross_attention_dim != text_dim:
            raise InputError(
                f"the student attends to {student.config.cross_attention_dim}-d text embeddings but the teacher / text encoder give {text_dim}-d",
                hint="build the student from this teacher (--arch) or give a student of the same SD family",
            )
        if self.teacher is not None and student.config.in_channels != self.teacher.config.in_channels:
            raise InputError("the student and the teacher take latents of different channel counts")
        # Trained weights are fp32 whatever the base model was stored in; autocast (mixed
        # precision) lowers the compute, not the master weights.
        student.to(dtype=torch.float32)
        if config.method == "lcm":
            student = self._setup_lcm(student)
        student.train()
        self.student = student
        if self.lora:
            self._add_adapters()

        # KD: which features to match.
        self.feature_pairs: list[tuple[str, str]] = []
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            self._to(self.teacher)
            if config.loss.l_feat > 0 and config.method == "kd":
                if config.loss.feature_pairs:
                    self.feature_pairs = [tuple(p) for p in config.loss.feature_pairs]
                elif self.layout_pairs is not None:
                    self.feature_pairs = self.layout_pairs
                else:
                    self.feature_pairs = derive_feature_pairs(
                        self.teacher, student.to(device), sample_size=student.config.sample_size
                    )
                    if not self.feature_pairs:
                        raise InputError(
                            "feature KD: no teacher block has the output shape of a student block",
                            hint="give loss.feature_pairs or set --l-feat 0",
                        )
                logger.info("feature KD pairs: %s", self.feature_pairs)

    def _setup_lcm(self, student):
        """Check the teacher's schedule, build the solver, the guidance-conditioned student and its target.

        The student gets a guidance embedding (``time_cond_proj_dim``) whose projection starts
        at zero, so at step 0 it computes exactly what it was given; diffusers loads the
        other weights the same way (``strict=False``). LoRA students get none: adapters
        learn one guided blend, and diffusers' LCM-LoRA uses the adapted U-Net itself as the
        target.
        """
        from diffusers import UNet2DConditionModel

        from . import lcm

        config = self.config
        if self.teacher is None:
            raise InputError("LCM distillation needs a teacher", hint="pass --teacher MODEL")
        num_train = self.noise_scheduler.config.num_train_timesteps
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.double()
        self.lcm_solver = lcm.DDIMSolver(alphas_cumprod, num_train, config.lcm.num_ddim_timesteps)
        lcm.check_teacher_schedule(self.prediction_type, alphas_cumprod, self.lcm_solver)
        base = dict(self.noise_scheduler.config)
        base["prediction_type"] = self.prediction_type
        self.lcm_scheduler = lcm.make_lcm_scheduler(
            base, config.lcm.num_ddim_timesteps, config.lcm.timestep_scaling, alphas_cumprod
        )
        self.alphas_cumprod = alphas_cumprod.float().to(self.accelerator.device)
        if not self.lora and student.config.time_cond_proj_dim is None:
            conditioned = UNet2DConditionModel.from_config(
                student.config, time_cond_proj_dim=config.lcm.time_cond_proj_dim
            )
            missing, unexpected = conditioned.load_state_dict(student.state_dict(), strict=False)
            if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
                raise InputError(
                    "could not add a guidance embedding to the student U-Net "
                    f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
                )
            torch.nn.init.zeros_(conditioned.time_embedding.cond_proj.weight)
            student = conditioned.to(dtype=torch.float32)
        self.guidance_embedding_dim = None if self.lora else student.config.time_cond_proj_dim
        if not self.lora:
            target = UNet2DConditionModel.from_config(student.config)
            target.load_state_dict(student.state_dict())
            target.requires_grad_(False)
            target.train()  # as diffusers' example (the U-Net has no dropout or batch norm)
            self.lcm_target = target.to(self.accelerator.device, dtype=torch.float32)
        logger.info(
            "LCM distillation: %d-step DDIM solver (k=%d), guidance %.3g-%.3g, %s",
            config.lcm.num_ddim_timesteps,
            self.lcm_solver.step_ratio,
            config.lcm.guidance_min,
            config.lcm.guidance_max,
            "LoRA adapters (no guidance embedding, no target network)"
            if self.lora
            else f"guidance embedding of {self.guidance_embedding_dim}, target EMA {config.lcm.target_ema_decay}",
        )
        return student

    def _add_adapters(self) -> None:
        """Freeze the student (and text encoder) and give them trainable peft LoRA adapters."""
        from distilsd.lora.adapters import add_lora

        lora = self.config.lora
        add_lora(self.student, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, dropout=lora.dropout)
        if lora.text_encoder:
            add_lora(
                self.text_encoder,
                rank=lora.rank,
                alpha=lora.alpha,
                targets=lora.text_encoder_targets,
                dropout=lora.dropout,
                what="text encoder",
            )
            self.text_encoder.train()
        if lora.token_embeddings:
            from distilsd.lora.embeddings import install_word_embeddings

            self.word_embeddings = install_word_embeddings(
                self.text_encoder, self.tokenizer, lora.token_embeddings
            )
        # The adapters train in float32 even when the frozen weights run in half precision
        # (diffusers' cast_training_params).
        for model in (self.student, self.text_encoder):
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        trainable = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        logger.info("LoRA rank %d: %d trainable U-Net parameters", lora.rank, trainable)

    def _to(self, frozen: torch.nn.Module) -> None:
        """Move a frozen model to the device in the training precision: fp32, or the mixed
        precision's dtype. Never the dtype its weights were stored in (fp16 for the shipped
        Shapes model): BK-SDM casts the text encoder, VAE and teacher the same way."""
        frozen.to(self.accelerator.device, dtype=self.weight_dtype)

    def _setup_data(self) -> None:
        from .cache import CachedDataset, build_cache, model_identity
        from .data import GlobalBatchSampler, ImageCaptionDataset, make_loader

        config = self.config
        accelerator = self.accelerator
        self.bad_samples_listing = sum(self.source.skipped.values())
        self.cache_build_s = 0.0
        if config.data.cache_latents:
            started = time.perf_counter()
            cache = build_cache(
                self.source,
                config.data,
                # The cached values depend on the precision the encoders ran in.
                f"{model_identity(self.model_path)}@{self.weight_dtype}",
                self.vae,
                self.text_encoder,
                self.tokenizer,
                accelerator,
                batch_size=max(8, config.train_batch_size),
            )
            self.cache_build_s = time.perf_counter() - started
            # A trained text encoder's embeddings change every step: only the latents are cached.
            captions = self.source if self.text_encoder_trains else None
            self.dataset = CachedDataset(cache, config.seed, config.data.caption_choice, captions=captions)
        else:
            self.dataset = ImageCaptionDataset(
                self.source,
                config.data.resolution,
                config.data.crop,
                config.data.random_flip,
                config.seed,
                caption_choice=config.data.caption_choice,
                resize=config.data.resize,
            )
        self.global_batch = config.train_batch_size * accelerator.num_processes
        self.samples_per_step = self.global_batch * config.gradient_accumulation_steps
        # Built here only to check the size; the loader is made in train() at the resumed position.
        GlobalBatchSampler(
            len(self.dataset),
            self.global_batch,
            accelerator.process_index,
            config.train_batch_size,
            config.seed,
        )
        self._make_loader = lambda start: make_loader(
            self.dataset,
            GlobalBatchSampler(
                len(self.dataset),
                self.global_batch,
                accelerator.process_index,
                config.train_batch_size,
                config.seed,
                start=start,
            ),
            config.data.num_workers,
        )

    def _setup_optimization(self) -> None:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        config = self.config
        optim = config.optim
        accelerator = self.accelerator
        student = self.student
        if config.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        student.to(accelerator.device)
        # EMA of the *student*, from the student's initial weights (on the unwrapped module).
        self.ema = None
        if optim.ema:
            self.ema = EMAModel(
                student.parameters(),
                decay=optim.ema_decay,
                model_cls=type(student),
                model_config=student.config,
                foreach=True,
            )
            self.ema.to(accelerator.device)
        trained = [p for p in student.parameters() if p.requires_grad]
        groups = []
        if self.text_encoder_trains:
            self.text_encoder.to(accelerator.device)
            words = self.word_embeddings.vectors if self.word_embeddings is not None else None
            trained += [p for p in self.text_encoder.parameters() if p.requires_grad and p is not words]
            if words is not None:
                # Their own group: no weight decay (a word's vectors are not a low-rank delta
                # that should shrink towards zero), and optionally their own learning rate.
                lr = self.config.lora.token_embedding_lr
                groups.append({"params": [words], "weight_decay": 0.0, "lr": lr or optim.learning_rate})
        self.optimizer = self._make_optimizer([{"params": trained}, *groups] if groups else trained)
        self.lr_scheduler = get_scheduler(
            {"constant": "constant_with_warmup"}.get(optim.lr_scheduler, optim.lr_scheduler),
            optimizer=self.optimizer,
            num_warmup_steps=optim.lr_warmup_steps,
            num_training_steps=config.max_steps,
        )
        # The LR scheduler is stepped here once per optimizer step, so it is not prepared
        # (accelerate would step it once per process).
        if self.text_encoder_trains:
            self.model, self.text_encoder, self.optimizer = accelerator.prepare(
                student, self.text_encoder, self.optimizer
            )
        else:
            self.model, self.optimizer = accelerator.prepare(student, self.optimizer)
        if config.compile:
            self.model = torch.compile(self.model, backend=config.compile_backend)
        # Hooks on the unwrapped modules: names never carry "module." or "_orig_mod.".
        self.student_features = (
            FeatureRecorder(self.model, [s for _, s in self.feature_pairs]) if self.feature_pairs else None
        )
        self.teacher_features = (
            FeatureRecorder(self.teacher, [t for t, _ in self.feature_pairs]) if self.feature_pairs else None
        )

    def _make_optimizer(self, params):
        optim = self.config.optim
        kwargs = dict(
            lr=optim.learning_rate,
            betas=(optim.adam_beta1, optim.adam_beta2),
            weight_decay=optim.weight_decay,
            eps=optim.adam_epsilon,
        )
        choice = optim.optimizer
        if choice in ("auto", "adamw8bit"):
            usable = torch.cuda.is_available()
            try:
                import bitsandbytes as bnb
            except Exception:  # not installed, or no usable CUDA build
                usable = False
            if usable:
                self.optimizer_name = "adamw8bit"
                return bnb.optim.AdamW8bit(params, **kwargs)
            if choice == "adamw8bit":
                raise InputError(
                    "8-bit AdamW needs bitsandbytes and a CUDA GPU",
                    hint="pip install bitsandbytes, or use optim.optimizer=adamw",
                )
        self.optimizer_name = "adamw"
        return torch.optim.AdamW(params, **kwargs)

    def _resume(self, checkpoint: Path) -> None:
        state = ckpt.load_checkpoint(
            checkpoint,
            unwrap(self.model),
            self.ema,
            self.optimizer,
            self.lr_scheduler,
            self.accelerator.process_index,
        )
        if self.lcm_target is not None:
            if not (checkpoint / "unet_target").is_dir():
                raise InputError(
                    f"checkpoint {checkpoint} has no unet_target/ (the LCM target network)",
                    hint="resume with the settings of the run that wrote it",
                )
            self.lcm_target.load_state_dict(ckpt.load_unet_weights(checkpoint / "unet_target"))
        if self.text_encoder_trains:
            from safetensors.torch import load_file

            weights = checkpoint / "text_encoder" / "model.safetensors"
            if not weights.is_file():
                raise InputError(
                    f"checkpoint {checkpoint} has no text_encoder/, but the text encoder is trained",
                    hint="resume with the settings of the run that wrote it",
                )
            # Adapters: the checkpoint holds only the trained tensors, the rest is the base model's.
            missing, unexpected = unwrap(self.text_encoder).load_state_dict(
                load_file(str(weights)), strict=not self.lora
            )
            if unexpected or any("lora_" in name or name.endswith(".vectors") for name in missing):
                raise InputError(f"checkpoint {checkpoint}: its text_encoder/ does not fit this text encoder")
        self.global_step = state["global_step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_samples = state.get("bad_samples", 0)
        self.last_checkpoint = checkpoint
        logger.info("resumed from %s at step %d", checkpoint, self.global_step)

    # ---- logging -------------------------------------------------------------------------

    def _columns(self) -> list[str]:
        if self.config.method == "lcm":
            columns = ["step", "epoch", "loss"]
            return columns + ["lr", "grad_norm", "samples_per_s", "bad_samples", "skipped_steps"]
        columns = ["step", "epoch", "loss", "task"]
        if self.teacher is not None:
            columns += ["out_kd", "feat_kd"] + [f"feat/{s}" for _, s in self.feature_pairs]
        return columns + ["lr", "grad_norm", "samples_per_s", "bad_samples", "skipped_steps"]

    def _open_logs(self) -> None:
        logs = self.output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_with = self.config.log_with
        if "csv" in log_with:
            path = logs / "train.csv"
            rows = []
            if path.is_file() and self.global_step > 0:
                # Rows after the resumed step were written by the interrupted run; drop them.
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.global_step]
            tmp = path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._columns(), extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            tmp.replace(path)
            self._csv_file = open(path, "a", newline="")
            self._csv_writer = csv.DictWriter(
                self._csv_file, fieldnames=self._columns(), extrasaction="ignore"
            )
        if "tensorboard" in log_with:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if log_with != ["csv", "tensorboard"]:  # asked for explicitly, not the default
                    from distilsd.errors import MissingDependencyError

                    raise MissingDependencyError("tensorboard", "train", "TensorBoard logging") from None
                logger.info("tensorboard is not installed; logging to CSV only")
            else:
                self._tb_writer = SummaryWriter(
                    str(logs / "tensorboard"), purge_step=self.global_step + 1 if self.global_step else None
                )
        if "wandb" in log_with:
            try:
                import wandb
            except ImportError:
                from distilsd.errors import MissingDependencyError

                raise MissingDependencyError("wandb", "train", "Weights & Biases logging") from None
            from .config import to_dict

            self._wandb = wandb.init(
                project="distilsd", dir=str(logs), config=to_dict(self.config), resume="allow"
            )

    def _log(self, row: dict[str, Any]) -> None:
        if self._csv_writer is not None:
            self._csv_writer.writerow(
                {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
            self._csv_file.flush()
        scalars = {k: v for k, v in row.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
        if self._tb_writer is not None:
            for key, value in scalars.items():
                self._tb_writer.add_scalar(f"train/{key}", value, row["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])

    # ---- one step ------------------------------------------------------------------------

    def _step_generator(self, step: int, micro: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + step * 1009 + micro) % (2**63))

    def compute_loss(self, batch: dict[str, Any], step: int, micro: int) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch (this process's slice of the global micro-batch)."""
        config = self.config
        device = self.accelerator.device
        rank, b = self.accelerator.process_index, config.train_batch_size
        mine = slice(rank * b, (rank + 1) * b)
        # Caption dropout: these samples get the empty prompt, so the model also learns the
        # unconditional prediction that classifier-free guidance pushes away from. Its own
        # generator keeps the other draws (noise, timesteps) as they are without dropout.
        drop = torch.zeros(b, dtype=torch.bool)
        if config.data.caption_dropout > 0:
            drop_generator = torch.Generator().manual_seed(
                (config.seed * 1_000_003 + step * 1009 + micro) % (2**63) ^ 0xD0D0
            )
            drop = (torch.rand(self.global_batch, generator=drop_generator) < config.data.caption_dropout)[
                mine
            ]

        if "pixel_values" in batch:
            from .cache import encode_images

            mean, std = encode_images(self.vae, batch["pixel_values"].to(device))
            if config.data.refine_latents:
                mean = self._refined_means(batch, mean)
        else:
            mean, std = batch["latent_mean"], batch["latent_std"]
        if "captions" in batch:  # uncached, or cached latents with the text encoder in training
            from .cache import encode_text

            captions = [
                "" if dropped else caption for caption, dropped in zip(batch["captions"], drop.tolist())
            ]
            text_embeds = encode_text(
                unwrap(self.text_encoder), self.tokenizer, captions, grad=self.text_encoder_trains
            )
            if self.text_encoder_trains and self.text_encoder is not unwrap(self.text_encoder):
                # Through the DDP wrapper, so its gradients are all-reduced.
                from .cache import tokenize

                ids = tokenize(self.tokenizer, captions).to(device)
                text_embeds = self.text_encoder(ids, return_dict=False)[0]
        else:
            text_embeds = batch["text_embeds"]
            if drop.any():
                from .cache import encode_text

                empty = encode_text(self.text_encoder, self.tokenizer, [""]).to(
                    text_embeds.device, text_embeds.dtype
                )
                text_embeds = torch.where(drop.view(-1, 1, 1).to(text_embeds.device), empty, text_embeds)
        text_embeds = text_embeds.to(device, self.weight_dtype)
        mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)

        # All draws for the global micro-batch, then this process's slice.
        generator = self._step_generator(step, micro)
        global_shape = (self.global_batch, *mean.shape[1:])
        latent_eps = torch.randn(global_shape, generator=generator)[mine].to(device)
        noise = torch.randn(global_shape, generator=generator)[mine].to(device)
        offset = torch.randn(global_shape[:2] + (1, 1), generator=generator)[mine].to(device)
        timesteps = sample_timesteps(
            config.loss.timestep_sampling,
            self.noise_scheduler.config.num_train_timesteps,
            self.global_batch,
            generator,
            config.loss.logit_mean,
            config.loss.logit_std,
        )[mine].to(device)

        latents = (mean + std * latent_eps) * self.vae.config.scaling_factor
        if config.method == "lcm":
            return self._lcm_terms(latents, noise, text_embeds, generator, mine)
        if config.loss.noise_offset:
            noise = noise + config.loss.noise_offset * offset
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise
            if self.prediction_type == "epsilon"
            else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        )

        if config.loss.prior_target == "base" and bool(batch.get("prior", torch.zeros(1)).any()):
            target = self._base_prior_target(
                batch["prior"].to(device), target, noisy_latents, timesteps, text_embeds
            )

        if self.student_features is not None:
            self.student_features.clear()
            self.teacher_features.clear()
        with self.accelerator.autocast():
            student_out = self.model(
                noisy_latents, timesteps, encoder_hidden_states=text_embeds, return_dict=False
            )[0]
        weights = None
        if config.loss.snr_gamma:
            from diffusers.training_utils import compute_snr

            weights = min_snr_weights(
                compute_snr(self.noise_scheduler, timesteps), config.loss.snr_gamma, self.prediction_type
            )
        terms = {"task": task_loss(student_out, target, weights)}
        loss = config.loss.l_task * terms["task"]
        if self.teacher is not None:
            with torch.no_grad(), self.accelerator.autocast():
                teacher_out = self.teacher(
                    noisy_latents.to(self.weight_dtype),
                    timesteps,
                    encoder_hidden_states=text_embeds,
                    return_dict=False,
                )[0]
            terms["out_kd"] = output_kd_loss(student_out, teacher_out)
            loss = loss + config.loss.l_out * terms["out_kd"]
            if self.student_features is not None:
                per_layer = feature_kd_losses(
                    self.student_features.take(), self.teacher_features.take(), config.loss.feature_norm
                )
                terms["feat_kd"] = torch.stack(per_layer).sum()
                for (_, name), value in zip(self.feature_pairs, per_layer, strict=True):
                    terms[f"feat/{name}"] = value
                loss = loss + config.loss.l_feat * terms["feat_kd"]
            else:
                terms["feat_kd"] = torch.zeros((), device=device)
        terms["loss"] = loss
        return terms

    def _refined_means(self, batch: dict[str, Any], mean: torch.Tensor) -> torch.Tensor:
        """``mean`` with each non-prior image's latent replaced by its decoder inversion.

        Each image (as cropped and flipped this time) is refined once and remembered by its
        pixels, so a small set (DreamBooth's instance images) costs its refinement once per
        run; a resumed run refines again and gets the same latents (data.refine_latents).
        """
        from .cache import refine_latent_means

        mean = mean.clone()
        pixels = batch["pixel_values"]
        prior = batch.get("prior", torch.zeros(len(pixels), dtype=torch.bool))
        for i in range(len(pixels)):
            if bool(prior[i]):
                continue
            key = hashlib.sha1(pixels[i].detach().cpu().float().numpy().tobytes()).digest()
            if key not in self.refined_latents:
                self.refined_latents[key] = refine_latent_means(
                    self.vae, pixels[i : i + 1], mean[i : i + 1], self.config.data.refine_latents
                )[0].cpu()
            mean[i] = self.refined_latents[key].to(mean.device, mean.dtype)
        return mean

    def _base_prior_target(self, prior, target, noisy_latents, timesteps, text_embeds) -> torch.Tensor:
        """``target`` with the prior rows' entries replaced by the base model's prediction.

        The base model is this U-Net with its LoRA adapters off (peft's ``disable_adapters``),
        on the same noisy latents, timesteps and prompts: a prior row then costs what the
        adapters change on its prompt, where DreamBooth's noise target also asks for one more
        fit to the class image (loss.prior_target, config.py).
        """
        unet = unwrap(self.model)
        unet.disable_adapters()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                base_out = unet(
                    noisy_latents[prior],
                    timesteps[prior],
                    encoder_hidden_states=text_embeds[prior],
                    return_dict=False,
                )[0]
        finally:
            unet.enable_adapters()
        target = target.clone()
        target[prior] = base_out.to(target.dtype)
        return target

    def _lcm_terms(
        self, latents: torch.Tensor, noise: torch.Tensor, text_embeds: torch.Tensor, generator, mine: slice
    ) -> dict[str, torch.Tensor]:
        """The consistency distillation loss of one micro-batch (see :mod:`distilsd.distill.lcm`)."""
        from . import lcm

        config = self.config
        settings = config.lcm
        device = latents.device
        # Drawn for the global batch after the latent sample and noise, like every other draw.
        index = torch.randint(0, settings.num_ddim_timesteps, (self.global_batch,), generator=generator)[mine]
        guidance = torch.rand(self.global_batch, generator=generator)[mine]
        guidance = settings.guidance_min + (settings.guidance_max - settings.guidance_min) * guidance
        index, w = index.to(device), (guidance - 1.0).to(device)
        start = self.lcm_solver.timesteps.to(device)[index]
        end = (start - self.lcm_solver.step_ratio).clamp(min=0)
        noisy = self.noise_scheduler.add_noise(latents, noise, start)
        timestep_cond = None
        if self.guidance_embedding_dim is not None:
            timestep_cond = lcm.guidance_scale_embedding(w, self.guidance_embedding_dim).to(device)
        ptype, alphas = self.prediction_type, self.alphas_cumprod

        with self.accelerator.autocast():
            student_out = self.model(
                noisy,
                start,
                timestep_cond=timestep_cond,
                encoder_hidden_states=text_embeds,
                return_dict=False,
            )[0]
        prediction = lcm.consistency_output(
            noisy,
            lcm.predicted_x0_and_noise(student_out.float(), start, noisy, ptype, alphas)[0],
            start,
            settings.timestep_scaling,
        )
        with torch.no_grad():
            # Teacher: conditional and unconditional (empty prompt) outputs in one batch, then
            # classifier-free guidance on x0 and eps and one DDIM step from start to end.
            uncond = self._empty_text_embeds().to(text_embeds.dtype).expand_as(text_embeds)
            with self.accelerator.autocast():
                teacher_out = self.teacher(
                    torch.cat([noisy, noisy]).to(self.weight_dtype),
                    torch.cat([start, start]),
                    encoder_hidden_states=torch.cat([text_embeds, uncond]).to(self.weight_dtype),
                    return_dict=False,
                )[0].float()
            cond_out, uncond_out = teacher_out.chunk(2)
            w4 = w.view(-1, 1, 1, 1)
            x0_cond, eps_cond = lcm.predicted_x0_and_noise(cond_out, start, noisy, ptype, alphas)
            x0_uncond, eps_uncond = lcm.predicted_x0_and_noise(uncond_out, start, noisy, ptype, alphas)
            x0 = x0_cond + w4 * (x0_cond - x0_uncond)
            eps = eps_cond + w4 * (eps_cond - eps_uncond)
            x_prev = self.lcm_solver.step(x0, eps, index)
            # LoRA: the adapted student itself gives the target (diffusers' LCM-LoRA).
            target_model = self.lcm_target if self.lcm_target is not None else unwrap(self.model)
            with self.accelerator.autocast():
                target_out = target_model(
                    x_prev,
                    end,
                    timestep_cond=timestep_cond,
                    encoder_hidden_states=text_embeds,
                    return_dict=False,
                )[0].float()
            target = lcm.consistency_output(
                x_prev,
                lcm.predicted_x0_and_noise(target_out, end, x_prev, ptype, alphas)[0],
                end,
                settings.timestep_scaling,
            )
        loss = lcm.consistency_loss(prediction, target, settings.loss_type, settings.huber_c)
        return {"loss": loss}

    def _empty_text_embeds(self) -> torch.Tensor:
        """The empty prompt's embedding (1, L, D): the unconditional input of classifier-free guidance."""
        if getattr(self, "_empty_embeds", None) is None:
            from .cache import encode_text

            with torch.no_grad():
                self._empty_embeds = encode_text(unwrap(self.text_encoder), self.tokenizer, [""]).to(
                    self.accelerator.device, self.weight_dtype
                )
        return self._empty_embeds

    def train_step(self, batches) -> StepResult:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        config = self.config
        accelerator = self.accelerator
        accumulation = config.gradient_accumulation_steps
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accumulation):
            batch = next(batches)
            self.bad_samples += batch["bad"]
            # Gradients are all-reduced on the last micro-batch only.
            sync = micro == accumulation - 1
            context = (
                contextlib.nullcontext()
                if sync or accelerator.num_processes == 1
                else accelerator.no_sync(self.model)
            )
            with context:
                terms = self.compute_loss(batch, self.global_step, micro)
                accelerator.backward(terms["loss"] / accumulation)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / accumulation
        # Mean over processes (equal batch sizes, so this is the mean over the global batch).
        names = sorted(sums)
        reduced = accelerator.reduce(torch.stack([sums[k] for k in names]), reduction="mean")
        values = {k: float(v) for k, v in zip(names, reduced.tolist(), strict=True)}
        finite = all(math.isfinite(v) for v in values.values())
        grad_norm = float("nan")
        self._hold_resting_phase()
        if finite:
            if config.optim.max_grad_norm > 0:
                grad_norm = float(
                    accelerator.clip_grad_norm_(self._trained_parameters(), config.optim.max_grad_norm)
                )
            self.optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.step(unwrap(self.model).parameters())
                if self.lcm_target is not None:
                    from .lcm import update_target

                    update_target(
                        self.lcm_target.parameters(),
                        unwrap(self.model).parameters(),
                        self.config.lcm.target_ema_decay,
                    )
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(values, grad_norm, finite)

    def _hold_resting_phase(self) -> None:
        """With ``lora.token_embedding_steps`` N: the embeddings train alone for the first N steps,
        then the adapters alone. The resting side's gradients are dropped, so AdamW skips those
        parameters entirely (no update, no weight decay, no moment statistics carried over)."""
        steps = self.config.lora.token_embedding_steps
        if steps is None or self.word_embeddings is None:
            return
        words = self.word_embeddings.vectors
        if self.global_step < steps:
            resting = [p for p in self._trained_parameters() if p is not words]
        else:
            resting = [words]
        for param in resting:
            param.grad = None

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.text_encoder_trains:
            params += [p for p in self.text_encoder.parameters() if p.requires_grad]
        return params

    # ---- the loop ------------------------------------------------------------------------

    def train(self) -> RunSummary:
        from tqdm.auto import tqdm

        config = self.config
        accelerator = self.accelerator
        summary = RunSummary(self.output_dir, config.max_steps)
        if self.global_step >= config.max_steps:
            logger.info("already at step %d of %d", self.global_step, config.max_steps)
        loader = self._make_loader(self.global_step * config.gradient_accumulation_steps)
        batches = iter(loader)
        batches_per_epoch = max(1, len(self.dataset) // self.global_batch)
        progress = tqdm(
            total=config.max_steps,
            initial=self.global_step,
            desc="distill" if self.teacher is not None else "train",
            disable=not (accelerator.is_local_main_process and config.progress_bar),
            dynamic_ncols=True,
        )
        window_start, window_steps = time.perf_counter(), 0
        total_time, total_steps = 0.0, 0
        while self.global_step < config.max_steps:
            result = self.train_step(batches)
            self.global_step += 1
            if not result.finite:
                self._handle_nonfinite(result)
            window_steps += 1
            if self.global_step % config.log_every == 0 or self.global_step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                samples_per_s = window_steps * self.samples_per_step / max(elapsed, 1e-9)
                total_time += elapsed
                total_steps += window_steps
                epoch = self.global_step * config.gradient_accumulation_steps / batches_per_epoch
                row = {"step": self.global_step, "epoch": round(epoch, 4), **result.terms}
                row.update(
                    lr=self.lr_scheduler.get_last_lr()[0],
                    grad_norm=result.grad_norm,
                    samples_per_s=samples_per_s,
                    bad_samples=self.bad_samples,
                    skipped_steps=self.skipped_steps,
                )
                summary.losses.append(row)
                if accelerator.is_main_process:
                    self._log(row)
                progress.set_postfix(
                    {
                        k: f"{result.terms[k]:.4g}"
                        for k in ("loss", "task", "out_kd", "feat_kd")
                        if k in result.terms
                    },
                    refresh=False,
                )
                window_start, window_steps = time.perf_counter(), 0
            progress.update(1)
            if (
                config.checkpoint_every
                and self.global_step % config.checkpoint_every == 0
                and self.global_step < config.max_steps
            ):
                self.save_checkpoint()
            if (
                config.validation.every
                and config.validation.prompts
                and self.global_step % config.validation.every == 0
            ):
                self.validate()
        progress.close()
        if (
            self.last_checkpoint is None
            or ckpt.read_state(self.last_checkpoint)["global_step"] != self.global_step
        ):
            self.save_checkpoint()
        if config.validation.prompts and (
            not config.validation.every or self.global_step % config.validation.every
        ):
            self.validate()
        self.save_final()
        summary.steps = self.global_step
        summary.skipped_steps = self.skipped_steps
        summary.bad_samples = self.bad_samples
        summary.cache_build_s = self.cache_build_s
        summary.is_main_process = accelerator.is_main_process
        summary.samples_per_second = total_steps * self.samples_per_step / total_time if total_time else 0.0
        return summary

    def _handle_nonfinite(self, result: StepResult) -> None:
        if self.config.nan_policy == "skip":
            self.skipped_steps += 1
            logger.warning("non-finite loss at step %d (%s); step skipped", self.global_step, result.terms)
            return
        last = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint was written yet"
        )
        bad = ", ".join(f"{k}={v}" for k, v in result.terms.items() if not math.isfinite(v))
        raise TrainingDivergedError(
            f"the loss is not finite at step {self.global_step} ({bad}); {last}",
            hint="lower the learning rate or use bf16, then --resume from that checkpoint; or pass nan_policy=skip",
        )

    # ---- saving --------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        config = self.config
        return {
            "global_step": self.global_step,
            "micro_batches_seen": self.global_step * config.gradient_accumulation_steps,
            "samples_seen": self.global_step * self.samples_per_step,
            "ema_optimization_step": self.ema.optimization_step if self.ema is not None else None,
            "skipped_steps": self.skipped_steps,
            "bad_samples": self.bad_samples,
            "num_processes": self.accelerator.num_processes,
            "train_batch_size": config.train_batch_size,
            "config_fingerprint": fingerprint(config),
            "trajectory": trajectory_fields(config),
            "feature_pairs": [list(p) for p in self.feature_pairs],
            "optimizer": self.optimizer_name,
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` atomically and prune old ones."""
        accelerator = self.accelerator
        tmp = ckpt.temp_checkpoint_dir(self.output_dir, self.global_step)
        error: OSError | None = None
        if accelerator.is_main_process:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as exc:
                error = exc
        accelerator.wait_for_everyone()
        try:
            if tmp.is_dir():
                torch.save(ckpt.rng_state(), tmp / f"random_states_{accelerator.process_index}.pt")
        except ckpt.WRITE_ERRORS as exc:
            error = error or ckpt.as_os_error(exc, tmp)
        accelerator.wait_for_everyone()
        final = None
        if accelerator.is_main_process and error is None:
            try:
                ckpt.write_checkpoint_files(
                    tmp,
                    unwrap(self.model),
                    self.ema,
                    self.optimizer,
                    self.lr_scheduler,
                    self._trainer_state(),
                )
                if self.lcm_target is not None:
                    ckpt.save_unet(self.lcm_target, tmp / "unet_target")
                if self.config.train_text_encoder:
                    unwrap(self.text_encoder).save_pretrained(tmp / "text_encoder", safe_serialization=True)
                elif self.text_encoder_trains:  # adapters: only the tensors that train
                    self._save_trained_text_encoder(tmp / "text_encoder")
                final = ckpt.commit_checkpoint(tmp, self.config.keep_checkpoints)
            except ckpt.WRITE_ERRORS as exc:
                error = ckpt.as_os_error(exc, tmp)
        failed = torch.tensor([1.0 if error is not None else 0.0], device=accelerator.device)
        failed = accelerator.reduce(failed, reduction="sum")
        if float(failed) > 0:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise ckpt.describe_save_error(
                error or OSError("another process failed to write its part"),
                self.global_step,
                self.output_dir,
            )
        self.last_checkpoint = final or self.output_dir / "checkpoints" / f"checkpoint-{self.global_step}"
        accelerator.wait_for_everyone()
        return self.last_checkpoint

    def _save_trained_text_encoder(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: param.detach().to("cpu").contiguous()
            for name, param in unwrap(self.text_encoder).named_parameters()
            if param.requires_grad
        }
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    def _save_final_lora(self, model, ema_state) -> None:
        """A LoRA run folder holds the adapter (diffusers' file, and kohya's on request), not a pipeline."""
        from distilsd.lora.adapters import save_lora

        config = self.config
        info = {
            "model": self.model_path,
            "student": config.student,
            "arch": config.arch,
            "teacher": config.teacher,
            "rank": config.lora.rank,
            "alpha": config.lora.alpha if config.lora.alpha is not None else config.lora.rank,
            "targets": config.lora.targets,
            "text_encoder_targets": config.lora.text_encoder_targets if config.lora.text_encoder else None,
            # Filled in by save_lora: word -> embeddings/<word>.safetensors
            "token_embeddings": {},
            "steps": self.global_step,
            **self._lcm_info(),
            "weights": "ema" if ema_state is not None else "raw",
            "skipped_steps": self.skipped_steps,
            "bad_samples": self.bad_samples + self.bad_samples_listing,
        }
        try:
            save_lora(
                self.output_dir,
                model,
                unwrap(self.text_encoder) if config.lora.text_encoder else None,
                unet_state=ema_state,
                kohya=config.lora.kohya,
                info=info,
                word_embeddings=self.word_embeddings,
            )
        except OSError as exc:
            raise OutputError(
                f"could not write the LoRA into {self.output_dir}: {exc.strerror or exc}",
                hint=f"the last checkpoint {self.last_checkpoint} is intact",
            ) from None
        logger.info("wrote the LoRA to %s", self.output_dir)

    def save_final(self) -> None:
        """The run folder becomes a full pipeline: base model components + the student U-Net.

        ``unet/`` holds the EMA weights by default (``final_weights``); the other set is kept
        beside it (``unet_raw/`` or ``unet_ema/``), and ``distill_info.json`` says which is which.
        """
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        config = self.config
        model = unwrap(self.model)
        use_ema = self.ema is not None and config.final_weights == "ema"
        ema_state = ckpt.ema_state_dict(model, self.ema) if self.ema is not None else None
        if self.lora:
            self._save_final_lora(model, ema_state if use_ema else None)
            return
        try:
            self._write_components()
            if self.lcm_scheduler is not None:
                self._write_lcm_scheduler()
            if config.train_text_encoder:
                self._atomic_dir(
                    "text_encoder",
                    lambda d: unwrap(self.text_encoder).save_pretrained(d, safe_serialization=True),
                )
            primary = ema_state if use_ema else None
            self._atomic_dir("unet", lambda d: self._save_student_unet(model, d, primary))
            if self.ema is not None:
                other = "unet_raw" if use_ema else "unet_ema"
                self._atomic_dir(other, lambda d: ckpt.save_unet(model, d, None if use_ema else ema_state))
            info = {
                "unet": "ema" if use_ema else "raw",
                "unet_raw": "raw" if use_ema else None,
                "unet_ema": "ema" if (self.ema is not None and not use_ema) else None,
                "steps": self.global_step,
                "teacher": config.teacher,
                "model": self.model_path,
                "text_encoder": "trained" if config.train_text_encoder else "copied",
                "arch": config.arch,
                "feature_pairs": [list(p) for p in self.feature_pairs],
                "skipped_steps": self.skipped_steps,
                "bad_samples": self.bad_samples + self.bad_samples_listing,
                "ema_decay": config.optim.ema_decay if self.ema is not None else None,
                **self._lcm_info(),
            }
            tmp = self.output_dir / ".distill_info.json.tmp"
            tmp.write_text(json.dumps(info, indent=1))
            tmp.replace(self.output_dir / "distill_info.json")
        except ckpt.WRITE_ERRORS as exc:
            raise ckpt.describe_pipeline_error(exc, self.output_dir) from exc
        logger.info(
            "wrote the pipeline to %s (unet/ = %s weights)", self.output_dir, "EMA" if use_ema else "raw"
        )

    def _save_student_unet(self, model, folder: Path, state) -> None:
        ckpt.save_unet(model, folder, state)
        if self.compress_record is not None:
            from distilsd.compress.export import RECORD_FILENAME

            (folder / RECORD_FILENAME).write_text(json.dumps(self.compress_record, indent=1))

    def _lcm_info(self) -> dict[str, Any]:
        """What `distilsd generate` needs to sample an LCM result by default (empty for KD runs)."""
        if self.config.method != "lcm":
            return {}
        from distilsd.models import default_guidance

        settings = self.config.lcm
        # The teacher's default guidance, inside the range the student learned.
        guidance = min(
            max(default_guidance(self.given_teacher or ""), settings.guidance_min), settings.guidance_max
        )
        return {
            "method": "lcm",
            "scheduler": "lcm",
            "num_inference_steps": settings.inference_steps,
            # LoRA: guidance was distilled into the adapter (sample at 1: no classifier-free batch).
            "guidance_scale": 1.0 if self.lora else guidance,
            "guidance_range": [settings.guidance_min, settings.guidance_max],
            "num_ddim_timesteps": settings.num_ddim_timesteps,
            "guidance_embedding": self.guidance_embedding_dim,
        }

    def _write_lcm_scheduler(self) -> None:
        """The pipeline samples with LCMScheduler on the teacher's noise schedule (plain diffusers too)."""
        self._atomic_dir("scheduler", lambda d: self.lcm_scheduler.save_pretrained(d))
        index_path = self.output_dir / "model_index.json"
        index = json.loads(index_path.read_text())
        index["scheduler"] = ["diffusers", "LCMScheduler"]
        tmp = self.output_dir / ".model_index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(index_path)

    def _atomic_dir(self, name: str, write) -> None:
        ckpt.atomic_dir(self.output_dir, name, write)

    def _write_components(self) -> None:
        """VAE, text encoder, tokenizer, scheduler (and safety checker) of the base model; model_index.json."""
        source = Path(self.model_path)
        if source.is_dir() and (source / "model_index.json").is_file():
            index = json.loads((source / "model_index.json").read_text())
            for name in COPIED_COMPONENTS:
                if (source / name).is_dir() and name in index:
                    self._atomic_dir(name, lambda d, name=name: shutil.copytree(source / name, d))
            tmp = self.output_dir / ".model_index.json.tmp"
            tmp.write_text(json.dumps(index, indent=2))
            tmp.replace(self.output_dir / "model_index.json")
            return
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=unwrap(self.text_encoder),
            tokenizer=self.tokenizer,
            unet=unwrap(self.model),
            scheduler=self._inference_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
            self._atomic_dir(name, lambda d, name=name: getattr(pipe, name).save_pretrained(d))
        pipe.save_config(self.output_dir)

    def _inference_scheduler(self):
        import diffusers

        config = dict(self.noise_scheduler.config)
        cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
        try:
            return cls.from_pretrained(self.model_path, subfolder="scheduler")
        except Exception:
            return diffusers.PNDMScheduler.from_config(config)

    # ---- validation ----------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> Path | None:
        """Student (EMA weights) beside teacher, same prompts and seeds, as one grid PNG."""
        accelerator = self.accelerator
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return None
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import make_image_grid

        validation = self.config.validation
        size = self.config.data.resolution
        model = unwrap(self.model)

        def generate(unet, student: bool) -> list:
            lcm = student and self.lcm_scheduler is not None
            pipe = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=text_encoder,
                tokenizer=self.tokenizer,
                unet=unet,
                scheduler=type(self.lcm_scheduler).from_config(self.lcm_scheduler.config)
                if lcm
                else self._inference_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            images = []
            for i, prompt in enumerate(validation.prompts):
                generator = torch.Generator(device="cpu").manual_seed(validation.seed + i)
                with accelerator.autocast():
                    images += pipe(
                        prompt,
                        height=size,
                        width=size,
                        num_inference_steps=self.config.lcm.inference_steps
                        if lcm
                        else validation.num_inference_steps,
                        # An LCM-LoRA student has its guidance built in.
                        guidance_scale=1.0 if lcm and self.lora else validation.guidance_scale,
                        generator=generator,
                    ).images
            return images

        text_encoder = unwrap(self.text_encoder)
        text_encoder_was_training = text_encoder.training
        text_encoder.eval()
        was_training = model.training
        model.eval()
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        try:
            student_images = generate(model, student=True)
        finally:
            if self.ema is not None:
                self.ema.restore(model.parameters())
            model.train(was_training)
            text_encoder.train(text_encoder_was_training)
        if self.teacher is not None:
            if self._teacher_images is None:
                self._teacher_images = generate(self.teacher, student=False)
            images = [img for pair in zip(self._teacher_images, student_images, strict=True) for img in pair]
            cols = 2
        else:
            images, cols = student_images, 1
        grid = make_image_grid(images, rows=len(validation.prompts), cols=cols)
        folder = self.output_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{self.global_step:06d}.png"
        tmp = folder / f".step-{self.global_step:06d}.png.tmp"
        grid.save(tmp, format="PNG")
        tmp.replace(path)
        if self._tb_writer is not None:
            import numpy as np

            self._tb_writer.add_image("validation", np.asarray(grid), self.global_step, dataformats="HWC")
        accelerator.wait_for_everyone()
        return path

    # ---- cleanup -------------------------------------------------------------------------

    def cleanup(self) -> None:
        for recorder in (getattr(self, "student_features", None), getattr(self, "teacher_features", None)):
            if recorder is not None:
                recorder.remove()
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            accelerator.end_training()
            # accelerate keeps its state in a process-wide singleton; a later run in this process
            # (the next stage, the benchmark's second mode) may use another mixed precision.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state()
            GradientState._reset_state()


def _read_compress_record(student: Path) -> dict[str, Any] | None:
    """The compression record of a student folder (``distilsd compress`` output or a KD run), if any."""
    from distilsd.compress.export import RECORD_FILENAME

    for candidate in (student / "unet" / RECORD_FILENAME, student / RECORD_FILENAME):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError:
                return None  # unreadable: the student trains as well without it
    return None
