"""DeepCache (Ma et al., 2023): reuse a U-Net's deep features across denoising steps.

Consecutive steps change the U-Net's high-level features little. Every ``interval`` U-Net
calls one runs in full; on the ``interval - 1`` calls between, the deep path (down blocks
1..n, the mid block and up blocks 0..n-1) returns what it returned on the last full call, and
only the shallow path runs: ``conv_in``, the first down block, whose skip features feed the
last up block together with the cached deep output, and ``conv_out``. That is the paper's
uniform schedule with the cache branch at the shallowest block.

The published ``DeepCache`` package (0.1.1, 2023) wraps every block of the U-Net and fails
on block-removed U-Nets (BK-SDM has no mid block), so this is a small re-implementation on
diffusers' model hooks, which works for any ``UNet2DConditionModel`` with two or more
resolution levels, with or without a mid block.
"""

from __future__ import annotations

from typing import Any

from distilsd.errors import InputError

HOOK_NAME = "distilsd_deepcache"


class _CacheState:
    """Which call of the current generation this is, and whether the deep path is skipped."""

    def __init__(self, interval: int):
        self.interval = interval
        self.calls = 0
        self.skip = False
        self.last_timestep: float | None = None
        self.last_shape: tuple[int, ...] | None = None
        self.full_calls = 0
        self.cached_calls = 0


def _new_hook_classes():
    # diffusers.hooks is imported only when DeepCache is turned on (import distilsd stays light).
    from diffusers.hooks import ModelHook

    class StepHook(ModelHook):
        """On the U-Net: decides, per call, whether the deep blocks run or replay their cache."""

        def __init__(self, state: _CacheState):
            super().__init__()
            self.state = state

        def pre_forward(self, module, *args, **kwargs):
            state = self.state
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            t = float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else float(timestep)
            shape = tuple(sample.shape)
            # A new generation: timesteps only fall within one, and its latents keep their shape.
            if state.last_timestep is None or t >= state.last_timestep or shape != state.last_shape:
                state.calls = 0
            state.skip = state.calls % state.interval != 0
            state.full_calls += not state.skip
            state.cached_calls += state.skip
            state.calls += 1
            state.last_timestep, state.last_shape = t, shape
            return args, kwargs

    class DeepBlockHook(ModelHook):
        """On a deep block: its output of the last full call, when the U-Net hook says skip."""

        def __init__(self, state: _CacheState):
            super().__init__()
            self.state = state
            self.output: Any = None

        def new_forward(self, module, *args, **kwargs):
            if self.state.skip and self.output is not None:
                return self.output
            self.output = self.fn_ref.original_forward(*args, **kwargs)
            return self.output

    return StepHook, DeepBlockHook


def deep_blocks(unet) -> list:
    """The blocks DeepCache skips on cached steps: all but the shallowest down and up block."""
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
        raise InputError(
            "--deepcache needs a U-Net with at least two resolution levels",
            hint="this U-Net has no deep path to cache",
        )
    blocks = [*unet.down_blocks[1:], *unet.up_blocks[:-1]]
    if unet.mid_block is not None:
        blocks.append(unet.mid_block)
    return blocks


def enable_deepcache(unet, interval: int) -> _CacheState:
    """Turn DeepCache on for ``unet``: one full U-Net call in every ``interval``; returns its counters."""
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise InputError(
            "--deepcache works on a PyTorch UNet2DConditionModel",
            hint="use --backend pytorch (exported U-Nets run as one graph)",
        )
    if interval < 1:
        raise InputError(
            f"--deepcache must be at least 1 (got {interval})", hint="1 turns it off; 2-5 is usual"
        )
    from diffusers.hooks import HookRegistry

    disable_deepcache(unet)
    state = _CacheState(interval)
    step_hook, block_hook = _new_hook_classes()
    for block in deep_blocks(unet):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(block_hook(state), HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(step_hook(state), HOOK_NAME)
    unet._distilsd_deepcache = state
    return state


def disable_deepcache(unet) -> None:
    """Remove DeepCache's hooks (a no-op when it is off)."""
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(HOOK_NAME, recurse=True)
    unet.__dict__.pop("_distilsd_deepcache", None)
