"""Token merging (ToMe for Stable Diffusion, Bolya & Hoffman, 2023) through the ``tomesd`` package.

Before each self-attention of the U-Net's highest-resolution transformer blocks, ``ratio`` of
the image tokens are merged into their most similar neighbours (bipartite soft matching on a
2x2 stride) and unmerged after it, so attention, whose cost grows with the square of the token
count, runs on fewer tokens. At 512 px SD v1's first level has 4,096 tokens; at the Shapes
model's 64 px only 256, where there is little to save.

``tomesd`` (0.1.3) patches diffusers' ``BasicTransformerBlock`` in place and works on
block-removed U-Nets (BK-SDM) as on full ones. Its random choice of merge targets forks the
global torch generator on first use, which would make a seeded image depend on what ran
before; distilsd turns that randomness off (``use_rand=False``) so a seed gives the same image
every time. Cross-attention and the MLPs are not merged (tomesd's recommendation).
"""

from __future__ import annotations

from distilsd.errors import InputError, MissingDependencyError

MAX_RATIO = 0.75  # 1 - 1/(sx*sy) with tomesd's 2x2 stride: at most 3 of every 4 tokens merge


def check_ratio(ratio: float) -> None:
    """Refuse a merge ratio outside (0, MAX_RATIO] (0 is "off" and handled by callers)."""
    if not 0 <= ratio <= MAX_RATIO:
        raise InputError(
            f"--tome {ratio} must be between 0 and {MAX_RATIO} (the share of tokens merged)",
            hint="0.3-0.5 is usual; 0 turns it off",
        )


def enable_token_merging(unet, ratio: float, max_downsample: int = 1) -> None:
    """Merge ``ratio`` of the tokens in ``unet``'s self-attention at the highest resolution(s).

    ``max_downsample`` (1, 2, 4 or 8) extends it to lower resolutions (tomesd's option).
    """
    check_ratio(ratio)
    try:
        import tomesd
    except ImportError:
        raise MissingDependencyError("tomesd", "fast", "token merging (--tome)") from None
    tomesd.apply_patch(
        unet, ratio=ratio, max_downsample=max_downsample, use_rand=False, merge_attn=True,
        merge_crossattn=False, merge_mlp=False,
    )  # fmt: skip


def disable_token_merging(unet) -> None:
    try:
        import tomesd
    except ImportError:
        return
    tomesd.remove_patch(unet)
