"""Which FlexAttention kernel runs the sparse attention: flex's Triton kernel or FLASH.

FLASH is flex_attention's FlashAttention-4 (CuTe DSL) backend, `kernel_options={"BACKEND":
"FLASH"}` (torch >= 2.10). Inductor never picks it by itself and raises at lowering where it
cannot run, so "auto" picks it only where every constraint below holds, else Triton.

Constraints (torch 2.13 `torch/_inductor/kernel/flex/flex_flash_attention.py` and
flash-attn-4 4.0.0b36 `flash_attn/cute/interface.py`, `block_sparsity.py`):
- `flash_attn.cute` importable (inductor checks `find_spec`; we import it, which also finds a
  missing CuTe DSL, TVM-FFI or quack).
- CUDA, compute capability 9.x (Hopper) or 10.x/11.x (Blackwell); FA4 has no block sparsity on
  12.x and flex FLASH targets sm90+.
- q, k, v one dtype, fp16 or bf16 (FA4's fp8 is forward-only on sm100; no fp32).
- Block sizes: the KV block must equal FA4's KV tile and the Q block be a multiple of its Q
  tile times q_stage. sm90, head dim <= 128: tile 128x128, q_stage 1, so (128, 128).
  sm100: tile 128x128 with q_stage 2 for sequences over 128 rows, so Q blocks of 256.
- Head dims: q/k and v head dims in 8..128, multiples of 8 (16-byte alignment). sm90 accepts up
  to 256, but its tile_n for head dims over 128 (112 or 80) does not divide a 128 KV block.
- Partial blocks need full-block lists: inductor raises NotImplementedError for a mask_mod
  without `full_kv_num_blocks`.
- A no-op mask_mod: torch 2.10-2.13 then drops the block lists and runs dense (inductor's
  `is_trivial_mask_graph`), silently wrong for a sparse mask; fixed in 2.14. flexsample's own
  masks carry a causal mask_mod, so this only guards masks passed in from elsewhere.
- Gradients: auto keeps Triton when q/k/v need grad (FLASH's backward with block masks is
  newer than its forward and untested here); forcing "flash" tries it.
GQA needs nothing: FA4 takes Hq % Hkv == 0 and reads a per-query-head block mask.

`run_compiled_flex` runs the choice: one compiled function per backend, each with its own
recompile budget, and never dynamo's eager fallback. Both compile with a dynamic length, so one
compile serves every length; FLASH compiles statically (once per length) only for a mask_mod
that captures a Python number, which its lowering cannot take symbolically.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import site
import warnings

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention, noop_mask

from flexsample.config import SampleConfig

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MODULE = "flash_attn.cute.interface"
_INSTALL_HINT = (
    "install the extra `pip install flexsample[fa4]`, or the offline wheels with "
    "bench/fa4_install.sh and FLEXSAMPLE_FA4_SITE=<dir>"
)


def add_fa4_site() -> None:
    """Add the directories in FLEXSAMPLE_FA4_SITE (os.pathsep-separated) with
    `site.addsitedir`, once each: the CuTe DSL finds its packages through a `.pth` file,
    which PYTHONPATH does not process."""
    for path in os.environ.get("FLEXSAMPLE_FA4_SITE", "").split(os.pathsep):
        if path and path not in _added_sites:
            site.addsitedir(path)
            _added_sites.add(path)


_added_sites: set[str] = set()


@functools.lru_cache(maxsize=1)
def flash_import_error() -> str | None:
    """Why FA4 (`flash_attn.cute`) cannot be imported, or None when it can (cached)."""
    add_fa4_site()
    try:
        importlib.import_module(_FLASH_MODULE)
    except Exception as error:  # noqa: BLE001 - any failure means "not usable"
        return f"{type(error).__name__}: {error}"
    try:
        # Inductor caches its own find_spec probe; refresh it now that the site is added.
        from torch._inductor.kernel.flex.flex_flash_attention import ensure_flash_available

        ensure_flash_available.cache_clear()
    except (ImportError, AttributeError):
        pass
    return None


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


@torch.compiler.assume_constant_result
def _device_probe(index: int) -> tuple[int, int, str]:
    """(capability major, minor, FA4 import error or "") of CUDA device `index`; a constant
    to dynamo, so resolving a backend inside a compiled graph needs no graph break."""
    major, minor = torch.cuda.get_device_capability(index)
    return major, minor, flash_import_error() or ""


def flash_unavailable_reason(
    q: torch.Tensor,
    config: SampleConfig,
    *,
    v: torch.Tensor | None = None,
    block_mask: BlockMask | None = None,
) -> str | None:
    """Why the FLASH backend cannot run attention on q `[B, Hq, S, D]` (v `[B, Hkv, S, Dv]`)
    under `block_mask` (else config's block sizes), or None when it can."""
    if _torch_version() < (2, 10):
        return f"torch {torch.__version__} has no FLASH flex backend (needs >= 2.10)"
    if q.device.type != "cuda":
        return f"FLASH needs a CUDA device, got {q.device.type}"
    if q.dtype not in _FLASH_DTYPES:
        return f"FLASH needs float16 or bfloat16, got {q.dtype}"
    for name, dim in (("q/k", q.shape[-1]), ("v", q.shape[-1] if v is None else v.shape[-1])):
        if not (8 <= dim <= 128 and dim % 8 == 0):
            return f"FLASH needs {name} head dim in 8..128, a multiple of 8; got {dim}"
    q_block, kv_block = (
        (config.q_block, config.kv_block) if block_mask is None else block_mask.BLOCK_SIZE
    )
    if block_mask is not None:
        if block_mask.mask_mod is noop_mask and _torch_version() < (2, 14):
            # torch 2.10-2.13 drop the block lists of such a mask on FLASH and run it dense.
            return (
                "a BlockMask with a no-op mask_mod runs dense on FLASH in torch "
                f"{torch.__version__} (fixed in 2.14)"
            )
        if block_mask.full_kv_num_blocks is None:
            return "FLASH needs a BlockMask with full-block lists (full_kv_num_blocks)"
    major, minor, import_error = _device_probe(q.device.index or 0)
    if major == 9:
        blocks_ok = (q_block, kv_block) == (128, 128)
        need = "(128, 128)"
    elif major in (10, 11):
        blocks_ok = q_block % 256 == 0 and kv_block == 128
        need = "q_block a multiple of 256 and kv_block 128"
    else:
        return f"FLASH needs compute capability 9.x, 10.x or 11.x, got {major}.{minor}"
    if not blocks_ok:
        return f"FLASH on sm{major}{minor} needs block sizes {need}, got ({q_block}, {kv_block})"
    if import_error:
        return f"flash-attn-4 is not importable ({import_error}): {_INSTALL_HINT}"
    return None


def resolve_flex_backend(
    q: torch.Tensor,
    config: SampleConfig,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    block_mask: BlockMask | None = None,
) -> str:
    """ "triton" or "flash" for these inputs, from `config.flex_backend` (the one switch);
    raise `RuntimeError` naming what is missing when "flash" is forced where it cannot run."""
    choice = config.flex_backend
    # Traced code (sample_attention inside a user's torch.compile) cannot run the probe's
    # imports and caches without a graph break: "auto" keeps Triton there. The op behind both
    # integrations runs eagerly, so models get FLASH through it.
    if choice == "triton" or (choice == "auto" and torch.compiler.is_compiling()):
        return "triton"
    reason = flash_unavailable_reason(q, config, v=v, block_mask=block_mask)
    if choice == "flash":
        if reason is not None:
            raise RuntimeError(f"flex_backend='flash' cannot run: {reason}")
        return "flash"
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v)
    )
    return "flash" if reason is None and not needs_grad else "triton"


def kernel_options(
    q: torch.Tensor,
    config: SampleConfig,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    block_mask: BlockMask | None = None,
) -> dict | None:
    """flex_attention's `kernel_options` for the backend `resolve_flex_backend` picks."""
    if q.device.type != "cuda":
        return None
    if resolve_flex_backend(q, config, k=k, v=v, block_mask=block_mask) == "flash":
        return {"BACKEND": "FLASH"}
    q_block, kv_block = (
        (config.q_block, config.kv_block) if block_mask is None else block_mask.BLOCK_SIZE
    )
    # Flex's Triton tiles must divide the mask blocks; cap them for blocks under 128.
    if min(q_block, kv_block) >= 128:
        return None
    m, n = min(q_block, 64), min(kv_block, 64)
    return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_M1": m, "BLOCK_N1": n, "BLOCK_M2": m, "BLOCK_N2": n}


#: Compiles allowed per compiled flex function (dynamo's recompile limit, 8 by default). Each
#: new dtype, head dim, GQA ratio, mask_mod function or kernel_options compiles again, and so
#: does each new length on FLASH's static fallback (`_STATIC_FLASH_REASON`). Past the limit
#: dynamo would silently run flex_attention eagerly, whose unfused path materialises S x S
#: scores (out of memory at long S) and, for a no-op mask_mod, ignores the block lists (a
#: dense answer for a sparse mask; the likely cause of a GPU test that failed only after the
#: rest of the GPU suite). `run_compiled_flex` never lets it.
FLEX_RECOMPILE_LIMIT = 64


def run_compiled_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> object:
    """Compiled `flex_attention(q, k, v, **kwargs)` on the backend `kwargs["kernel_options"]`
    names (Triton if none): `[B, Hq, S, Dv]`, or flex's tuple with `return_aux` (its LSE in
    natural log on both backends, `flash_lse_unit`). One compile serves every length, except
    on FLASH for a mask_mod or score_mod its lowering refuses with a symbolic length
    (`_STATIC_FLASH_REASON`): calls with those functions compile once per length from then
    on. Past `FLEX_RECOMPILE_LIMIT` compiles, FLASH hands further new compiles to Triton
    (warned once); Triton raises a RuntimeError naming the limit. Without a block_mask, flex's
    own one-block dense mask, built eagerly (`dense_block_mask`): such calls are forward only."""
    if kwargs.get("block_mask") is None:
        kwargs = {**kwargs, "block_mask": dense_block_mask(q.device)}
    options = kwargs.get("kernel_options") or {}
    backend = options.get("BACKEND", "TRITON")
    mods = _mod_codes(kwargs)
    if backend == "FLASH" and mods in _static_flash_mods:
        backend = _STATIC_FLASH
    try:
        with torch._dynamo.config.patch(
            recompile_limit=FLEX_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
        ):
            result = _compiled_flex(backend)(q, k, v, **kwargs)
        if backend in _FLASH_KEYS and kwargs.get("return_aux") is not None:
            out, aux = result
            unit = flash_lse_unit(q.device.index)
            if aux.lse is not None and unit != 1.0:
                result = out, aux._replace(lse=aux.lse / unit)
        return result
    except FailOnRecompileLimitHit as error:
        if backend in _FLASH_KEYS:
            _warn_flash_budget_spent()
            return run_compiled_flex(q, k, v, **{**kwargs, "kernel_options": None})
        raise RuntimeError(
            f"compiled flex_attention ({backend}) has compiled {FLEX_RECOMPILE_LIMIT} times in "
            "this process (each new dtype, head dim, mask_mod function or kernel_options "
            "compiles again); flexsample does not fall back to eager flex_attention, which "
            "materialises S x S scores. Raise flexsample.flex_backend.FLEX_RECOMPILE_LIMIT or "
            "call torch._dynamo.reset()"
        ) from error
    except Exception as error:
        if backend != "FLASH" or _STATIC_FLASH_REASON not in str(error):
            raise
    # FLASH refused these mods with a symbolic length: compile them statically from now on.
    _static_flash_mods.add(mods)
    return run_compiled_flex(q, k, v, **kwargs)


#: What FLASH's lowering (torch 2.11-2.13, `has_unsupported_captured_scalars`) raises when a
#: mask_mod or score_mod captures a Python int or float that a dynamic compile made symbolic
#: (e.g. a context-parallel shard's row offsets, or `sampled_causal_mask_mod`'s block sizes);
#: compiled statically, the number is a constant. flexsample's single-GPU sparse path runs
#: under `with_causal_mask_mod`, which captures nothing.
_STATIC_FLASH_REASON = "captures a dynamic scalar"
_STATIC_FLASH = "FLASH_STATIC"
_FLASH_KEYS = ("FLASH", _STATIC_FLASH)
#: (mask_mod, score_mod) keys (`_mod_codes`) that FLASH refused with a symbolic length.
_static_flash_mods: set = set()


def dense_block_mask(device: torch.device) -> BlockMask:
    """The BlockMask flex_attention makes when given none (one block as large as any query
    and key length, no mask_mod), built eagerly, forward only (no transposed lists: their
    vmap fails under the op's dispatch guard), kept per device except when first asked for
    inside a CUDA-graph capture (its tensors would live in that graph's pool). Built inside
    the compiled function, flex's own failed to trace with a symbolic batch: FLASH compiled
    with dynamic=True on the dense tail's key parts (`tail.add_rectangle`) raised (H100 /
    H200, torch 2.11), so the op's CUDA-graph capture fell back to eager."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _build_dense_block_mask(device)
    return _kept_dense_block_mask(device)


@functools.cache
def _kept_dense_block_mask(device: torch.device) -> BlockMask:
    return _build_dense_block_mask(device)


def _build_dense_block_mask(device: torch.device) -> BlockMask:
    return BlockMask.from_kv_blocks(
        kv_num_blocks=torch.ones(1, 1, 1, dtype=torch.int32, device=device),
        kv_indices=torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device),
        BLOCK_SIZE=1 << 30,  # flex's `_LARGE_SPARSE_BLOCK_SIZE` (private)
        seq_lengths=(1, 1),
        compute_q_blocks=False,
    )


def _mod_codes(kwargs: dict) -> tuple:
    """The code objects of a flex call's mask_mod and score_mod (None where absent): what
    FLASH's lowering accepts or refuses, whatever values the closures hold. A callable
    without code (a partial's function unwrapped first) stands for itself."""
    block_mask = kwargs.get("block_mask")
    mods = (None if block_mask is None else block_mask.mask_mod, kwargs.get("score_mod"))
    return tuple(
        None if mod is None else getattr(getattr(mod, "func", mod), "__code__", mod) for mod in mods
    )


@functools.cache
def flash_lse_unit(device_index: int) -> float:
    """What FLASH flex_attention reports as log-sum-exp (`return_aux=AuxRequest(lse=True)`)
    per unit of the natural-log one: 1, or ln 2 on torch versions without the fix of
    pytorch#181645 (the wrapper multiplied FA4's natural-log LSE by ln 2 as if it were
    Triton's log2). Measured once per device, not guessed from the version: zero q and k give
    128 logits of 0 per row, whose LSE is log 128. Its own compiled function, so that the
    probe never meets a spent recompile budget. The probe syncs: its first call must not be
    inside a CUDA-graph capture (the op's replay and eager runs reach it in their warm-up).
    Its mask is `dense_block_mask`, built eagerly, as for the op's calls."""
    device = torch.device("cuda", device_index)
    zeros = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16, device=device)
    _, aux = _compiled_probe()(
        zeros,
        zeros,
        zeros,
        block_mask=dense_block_mask(device),
        kernel_options={"BACKEND": "FLASH"},
        return_aux=AuxRequest(lse=True),
    )
    ratio = aux.lse.float().mean().item() / math.log(128)
    for unit in (1.0, math.log(2)):
        if abs(ratio - unit) < 1e-2:
            return unit
    raise RuntimeError(f"flex_attention FLASH reports an LSE {ratio:.4f}x the natural-log one")


@functools.cache
def _warn_flash_budget_spent() -> None:
    warnings.warn(
        f"flexsample: FLASH flex_attention has compiled {FLEX_RECOMPILE_LIMIT} times (each "
        "new dtype, head dim or mask_mod function compiles again, and each new length of a "
        "mask_mod FLASH compiles statically); new ones run on flex's Triton kernel",
        RuntimeWarning,
        stacklevel=3,
    )


def _flex_triton(q, k, v, **kwargs):
    return flex_attention(q, k, v, **kwargs)


def _flex_flash(q, k, v, **kwargs):
    return flex_attention(q, k, v, **kwargs)


def _flex_flash_static(q, k, v, **kwargs):
    return flex_attention(q, k, v, **kwargs)


@functools.cache
def _compiled_probe():
    return torch.compile(_flex_probe, dynamic=False)


def _flex_probe(q, k, v, **kwargs):
    return flex_attention(q, k, v, **kwargs)


@functools.cache
def _compiled_flex(backend: str):
    # The unfused eager flex_attention materialises S×S; the compiled kernel does not. One
    # compiled function per key, each its own code object, since dynamo keeps its compiles
    # (and counts them against the limit) per code object: FLASH's static fallback, which
    # compiles per length, does not use up the dynamic ones' budgets. (Recompiling one
    # function between the two backends also hit a Dynamo error in torch 2.11: guard-failure
    # reporting, H100.) Dynamic from the first call, so that one compile serves every length:
    # with FLASH the same kernel time as a static compile from 8K to 128K, odd lengths
    # included (H100, torch 2.11, bench/results/flash_dynamic.md).
    if backend == _STATIC_FLASH:
        return torch.compile(_flex_flash_static, dynamic=False)
    return torch.compile(_flex_flash if backend == "FLASH" else _flex_triton, dynamic=True)
