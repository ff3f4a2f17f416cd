"""The causal mask: is an SDPA `attn_mask` exactly causal, the door's 2-D key masks (a
`[B, Skv]` padding mask or packed-sequence ids), and building the S×S mask where a dense path
needs it (end-aligned, optionally combined with a key mask).

transformers builds an explicit mask instead of `is_causal=True` when it is traced (5.17
does so for every causal model under torch.compile), so a compiled graph may pass a causal
mask that is indistinguishable from a padding mask until run time. The op checks the real
tensor on every call (on CUDA with a Triton kernel at memory speed, elsewhere row chunk by
row chunk so that no second S×S tensor is allocated). Nothing is remembered across calls: an
in-place write through `.numpy()` or `.data` does not bump a tensor's version counter, so no
cache key can prove that a mask is unchanged (the check costs 7.65 ms per layer at 128K on
the H200, bench/results/op_path.md).

A 2-D key mask is read in one device read (`read_key_mask`): each read is a host sync, which
stalls the GPU while the host launches the next kernels. The door reads the mask it hands a
prefill once per forward (`read_once`, an opaque op that also runs inside compiled graphs:
a compiled graph otherwise recomputes the mask into a new buffer for each layer's call, so no
identity could carry a reading from layer to layer) and every layer's op call reuses that
reading (`remembered_reading`); any other key mask is read by each call that needs it.
Measured on the real-text model at 16K (H100, whole-model compiled door): one sync per
layer kept the GPU busy for 7.8 ms of a 10.7 ms prefill
(bench/results/ttft_realtext_h100_16k_profile.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef

#: Elements compared per step off CUDA; bounds the temporaries of a check to a few hundred MiB.
CHUNK_ELEMENTS = 1 << 26


def _blocked_values(dtype: torch.dtype) -> tuple[float, ...]:
    return (float("-inf"), torch.finfo(dtype).min)


def is_causal_mask(
    mask: torch.Tensor, *, kernel: str = "auto", chunk_elements: int = CHUNK_ELEMENTS
) -> bool:
    """True when `mask` (`[..., S, S]`, bool or float additive) is exactly causal.

    Bool masks must be True on and below the diagonal and False above it; float masks must be
    0 on and below and `-inf` or the dtype's lowest value above. Every leading position (batch,
    head) is checked, so a padded batch is never taken for causal.

    `kernel` "auto" reads CUDA masks of up to 4 dims with the Triton kernel (every entry, in one
    read) and others with `chunk_elements`-sized PyTorch steps; "triton" forces the kernel
    (tests run it on CPU in Triton's interpreter). The PyTorch check compares row and column
    counts of kept entries only, two reductions and no comparison tensor: a 0/1 matrix whose
    row counts are 1, 2, ..., S and column counts S, S-1, ..., 1 (the conjugate partition) is
    unique (Gale-Ryser), so it is the causal one.
    """
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return False
    length = mask.shape[-1]
    if length == 0:
        return True
    if kernel == "triton" or (kernel == "auto" and mask.is_cuda and mask.dim() <= 4):
        from flexsample.kernels.causal_check import triton_is_causal

        return triton_is_causal(mask)
    rows_per_chunk = max(1, chunk_elements // (length * max(1, mask[..., 0, 0].numel())))
    index = torch.arange(length, device=mask.device)
    ok = torch.ones((), dtype=torch.bool, device=mask.device)
    column_counts = torch.zeros(mask.shape[:-2] + (length,), dtype=torch.int64, device=mask.device)
    for start in range(0, length, rows_per_chunk):
        chunk = mask[..., start : start + rows_per_chunk, :]
        if mask.dtype == torch.bool:
            kept = chunk
        else:
            low, lowest = _blocked_values(mask.dtype)
            kept = chunk == 0
            ok &= (kept | (chunk == low) | (chunk == lowest)).all()
        ok &= (kept.sum(-1) == index[start : start + rows_per_chunk] + 1).all()
        column_counts += kept.sum(-2)
    ok &= (column_counts == length - index).all()
    return bool(ok)


def causal_padding_mask(
    seq_q: int,
    seq_kv: int,
    keys: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool `[B, 1, Sq, Skv]` (`[1, 1, Sq, Skv]` without `keys`): True where query row i may
    see key j, causal aligned to the END of the keys (j <= Skv - Sq + i) and, with a 2-D
    `keys` `[B, Skv]`, only where it allows: a bool padding mask keeps the keys
    where it is True (transformers' SDPA mask); integer sequence ids keep the keys of the
    query's own sequence (packed sequences; query i is key Skv - Sq + i).

    The one place a dense fallback builds an S×S mask from a causal rule, a padding mask or
    sequence ids; the sparse path never calls it.
    """
    device = keys.device if keys is not None else device
    rows = torch.arange(seq_q, device=device) + (seq_kv - seq_q)
    mask = (torch.arange(seq_kv, device=device) <= rows[:, None])[None, None]
    if keys is None:
        return mask
    if keys.dtype == torch.bool:
        return mask & keys[:, None, None, :]
    own = keys[:, seq_kv - seq_q :]
    return mask & (own[:, None, :, None] == keys[:, None, None, :])


class KeyMaskReading(NamedTuple):
    """What the op needs to know of a 2-D key mask's values."""

    negative: bool  # integer ids with a negative entry: the door's mark for an unreadable mask
    keeps_every_key: bool  # nothing beyond causality: all-True padding, one sequence per row


def read_key_mask(mask: torch.Tensor) -> KeyMaskReading:
    """The values of a 2-D key mask `[B, Skv]` (bool padding or integer sequence ids) the op
    decides on: an O(B·S) pass and one host sync."""
    if mask.dtype == torch.bool:
        return KeyMaskReading(False, bool(mask.all()))
    flags = torch.stack([(mask < 0).any(), (mask == mask[:, :1]).all()])
    return KeyMaskReading(*flags.tolist())


#: Readings made by `read_once`, by storage: (a weak reference to it, the tensor's identity,
#: its reading). Bounded: a forward makes one or two.
_remembered: dict[int, tuple[StorageWeakRef, tuple, KeyMaskReading]] = {}
MAX_REMEMBERED = 64


def _identity(mask: torch.Tensor) -> tuple:
    # The version counter moves with every in-place op on the tensor or a view of it, which
    # is how anything but the op's own output could change its values.
    return (mask.data_ptr(), mask.dtype, tuple(mask.shape), mask.stride(), mask._version)


@torch.library.custom_op("flexsample::read_key_mask_once", mutates_args=())
def read_once(mask: torch.Tensor) -> torch.Tensor:
    """A copy of the key mask `[B, Skv]` (bool padding or integer sequence ids), read now in one
    host sync; the op's calls on this copy reuse that reading (`remembered_reading`) instead
    of a sync each. Opaque to compilers, so a compiled graph hands every layer this buffer."""
    out = mask.clone()
    reading = read_key_mask(out)
    for key in [key for key, (ref, _, _) in _remembered.items() if ref.expired()]:
        del _remembered[key]
    while len(_remembered) >= MAX_REMEMBERED:
        del _remembered[next(iter(_remembered))]
    storage = out.untyped_storage()
    _remembered[storage._cdata] = (StorageWeakRef(storage), _identity(out), reading)
    return out


@read_once.register_fake
def _read_once_fake(mask: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(mask)


def remembered_reading(mask: torch.Tensor) -> KeyMaskReading | None:
    """The reading `read_once` made of this very tensor (same live storage, pointer, shape,
    strides and version), else None (always while compiling: a traced tensor has no storage)."""
    if torch.compiler.is_compiling():
        return None
    entry = _remembered.get(mask.untyped_storage()._cdata)
    if entry is None or entry[0].expired() or entry[1] != _identity(mask):
        return None
    return entry[2]


def checked_key_mask(mask: torch.Tensor, batch: int, seq_kv: int) -> KeyMaskReading | None:
    """Check a 2-D key mask for `[batch, seq_kv]` keys: ValueError naming what is wrong with one
    the op cannot take. Sequence ids are read here (negative ones are refused), in one host
    sync that also answers `dense_reason`: their reading is returned. A bool padding mask is
    not read (None): no sync where a path runs dense before looking at it. A mask that
    `read_once` made is not read again: its reading is returned."""
    if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.shape != (batch, seq_kv):
        raise ValueError(
            f"a 2-D attn_mask is a bool [B, Skv] = [{batch}, {seq_kv}] padding mask or integer "
            f"[B, Skv] sequence ids, got {mask.dtype} {tuple(mask.shape)}"
        )
    reading = remembered_reading(mask)
    if reading is None:
        if mask.dtype == torch.bool:
            return None
        reading = read_key_mask(mask)
    if reading.negative:
        # The door's mark for a traced mask function it could not read as causal ∧ packed.
        raise ValueError(
            "the transformers door got a traced mask that is neither causal nor causal within "
            "packed sequences (negative sequence ids); pass an attention_mask or a cache, or "
            "run this model uncompiled"
        )
    return reading
