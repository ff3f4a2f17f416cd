"""`Layout`: what one call derives from the config and the length, computed once.

The sampled-row tiles, the window's block bounds and the kernel choice are the same for every
stage of a call (scores, selection, block lists, mask_mod), so they are built here once and
passed down (ALGORITHM §2, §4) rather than re-derived from the config at each stage.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch

from flexsample.config import SampleConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """Per-call layout of SampleAttention for a sequence of `seq_len` tokens.

    rows: sampled query rows as a tile table `[tiles, sample_block]` (int32, -1 pads).
    win_lo, win_hi: first and last KV block of each query block's window, `[nQ]` (int64).
    kernels: whether the Triton kernels (scores, block lists) serve this call.
    """

    config: SampleConfig
    seq_len: int
    rows: torch.Tensor
    win_lo: torch.Tensor
    win_hi: torch.Tensor
    kernels: bool

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.seq_len / self.config.kv_block)


def make_layout(
    config: SampleConfig, seq_len: int, device: torch.device, kernels: bool | None = None
) -> Layout:
    """The layout of a call on `device`; `kernels` None means `use_kernels(config, device)`."""
    lo, hi = config.window_blocks(seq_len, device)
    return Layout(
        config=config,
        seq_len=seq_len,
        rows=config.sampled_rows(seq_len, device),
        win_lo=lo,
        win_hi=hi,
        kernels=use_kernels(config, device) if kernels is None else kernels,
    )


def use_kernels(config: SampleConfig, device: torch.device) -> bool:
    """The one Triton-or-PyTorch decision: `config.score_backend`, where "auto" means the
    kernels on CUDA when Triton is installed. Traced code always takes the PyTorch ops, which
    inductor fuses (the block-list kernel is eager-only). A forced "triton" off CUDA needs
    Triton's interpreter (TRITON_INTERPRET=1 before import)."""
    choice = config.score_backend
    if choice == "torch" or torch.compiler.is_compiling():
        return False
    if choice == "auto":
        return device.type == "cuda" and _triton_available()
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"score_backend='triton' needs a CUDA device (got {device.type}); set "
            "TRITON_INTERPRET=1 before importing flexsample to run the kernels in the interpreter"
        )
    return True


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
