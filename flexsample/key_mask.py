"""The transformers door's 2-D key masks `[B, Skv]`, a bool padding mask (True = keep) or
integer packed-sequence ids: what the op needs to know of their values, read at most once
per forward.

Reading a mask's values (`read_key_mask`) is a host sync, which stalls the GPU while the host
launches the next kernels. Inductor recomputes a traced mask into a new buffer for each
layer's call, so one sync per layer is what a compiled prefill paid: on the real-text model
at 16K (H100) the GPU was busy for 7.8 ms of a 10.7 ms prefill
(bench/results/ttft_realtext_h100_16k_profile.md) and the door no faster than dense
(0.97x, ttft_realtext_h100_16k.md; 1.18x after this change, ttft_realtext_key_mask.md).
The door therefore hands every layer one copy (`read_once`, an opaque op, so a compiled
graph computes it once and passes that buffer on), and the first call that needs the
copy's values reads them and keeps the reading for the calls after it. Nothing is read
where a path runs dense before looking (a short prompt): no sync there, so a capture of
such a model in a CUDA graph still works.

Why a kept reading can be trusted: the copy is private to the forward (the door hands it
only to the layers' attention calls); its entry is keyed by its storage, which the entry's
weak reference keeps from being freed and reallocated at the same address, and matched on
pointer, dtype, shape, strides and version counter, so views of it match and an in-place op
on it is seen. A write that bypasses the version counter (`.data`, `.numpy()`, DLPack, an
inference tensor written in inference mode) is not seen; it would take someone holding the
private copy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class KeyMaskReading(NamedTuple):
    """What the op needs to know of a 2-D key mask's values."""

    negative: bool  # integer ids with a negative entry: the door's mark for an unreadable mask
    keeps_every_key: bool  # nothing beyond causality: all-True padding, one sequence per row


@dataclass
class _Entry:
    storage: StorageWeakRef
    identity: tuple
    reading: KeyMaskReading | None  # None until a call needs it


#: `read_once` copies by storage (`_cdata`). Bounded: a forward makes one.
_entries: dict[int, _Entry] = {}
_lock = threading.Lock()
MAX_ENTRIES = 64


def _identity(mask: torch.Tensor) -> tuple:
    # Inference tensors have no version counter.
    version = None if mask.is_inference() else mask._version
    return (mask.data_ptr(), mask.dtype, tuple(mask.shape), mask.stride(), version)


def _entry(mask: torch.Tensor) -> _Entry | None:
    # Never while compiling: dynamo cannot trace `_cdata`, and a traced mask has no values.
    if torch.compiler.is_compiling():
        return None
    with _lock:
        entry = _entries.get(mask.untyped_storage()._cdata)
    return entry if entry is not None and entry.identity == _identity(mask) else None


@torch.library.custom_op("flexsample::read_key_mask_once", mutates_args=())
def read_once(mask: torch.Tensor) -> torch.Tensor:
    """A copy of the key mask `[B, Skv]` whose values are read at most once, by the first call
    of `read_key_mask` that needs them; later calls on the copy (the other layers) reuse the
    reading. Opaque to compilers, so a compiled graph hands every layer this one buffer."""
    out = mask.clone()
    storage = out.untyped_storage()
    with _lock:
        for key in [key for key, entry in _entries.items() if entry.storage.expired()]:
            del _entries[key]
        while len(_entries) >= MAX_ENTRIES:
            del _entries[next(iter(_entries))]
        _entries[storage._cdata] = _Entry(StorageWeakRef(storage), _identity(out), None)
    return out


@read_once.register_fake
def _read_once_fake(mask: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(mask)


def _read_values(mask: torch.Tensor) -> KeyMaskReading:
    """One O(B·S) pass over the mask and one host sync."""
    if mask.dtype == torch.bool:
        return KeyMaskReading(False, bool(mask.all()))
    flags = torch.stack([(mask < 0).any(), (mask == mask[:, :1]).all()])
    return KeyMaskReading(*flags.tolist())


def read_key_mask(mask: torch.Tensor) -> KeyMaskReading:
    """The values of a 2-D key mask `[B, Skv]` (bool padding or integer sequence ids) the op
    decides on: one host sync, none for a `read_once` copy already read."""
    entry = _entry(mask)
    if entry is not None and entry.reading is not None:
        return entry.reading
    reading = _read_values(mask)
    if entry is not None:
        entry.reading = reading
    return reading


def checked_key_mask(mask: torch.Tensor, batch: int, seq_kv: int) -> KeyMaskReading | None:
    """Check a 2-D key mask for `[batch, seq_kv]` keys: ValueError naming what is wrong with one
    the op cannot take. Sequence ids are read here (negative ones are refused), in one host
    sync that also answers `dense_reason`: their reading is returned. A bool padding mask is
    not read: no sync where a path runs dense before looking at it (its reading is returned
    if a `read_once` copy was read already, else None)."""
    if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.shape != (batch, seq_kv):
        raise ValueError(
            f"a 2-D attn_mask is a bool [B, Skv] = [{batch}, {seq_kv}] padding mask or integer "
            f"[B, Skv] sequence ids, got {mask.dtype} {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        entry = _entry(mask)
        return entry.reading if entry is not None else None
    reading = read_key_mask(mask)
    if reading.negative:
        # The door's mark for a traced mask function it could not read as causal ∧ packed.
        raise ValueError(
            "the transformers door got a traced mask that is neither causal nor causal within "
            "packed sequences (negative sequence ids); pass an attention_mask or a cache, or "
            "run this model uncompiled"
        )
    return reading
