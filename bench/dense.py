"""Dense causal attention baselines, timed: SDPA cuDNN, SDPA flash, SDPA default, dense flex.

cuDNN and flash run on K/V expanded to Hq heads (expansion not timed): those backends take
no `enable_gqa` on every torch version here. 'SDPA default' is `enable_gqa=True`, whatever
backend SDPA picks. Dense flex is compiled flex_attention with every causal block (blocks
below the diagonal as full blocks), the same kernel the sparse path runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.harness import progress, time_ms
from flexsample import SampleConfig
from flexsample.attention import attention_with_mask
from flexsample.block_mask import build_block_mask
from flexsample.layout import make_layout


def dense_baselines(q, k, v, config: SampleConfig) -> dict[str, float]:
    """Milliseconds of causal attention by SDPA cuDNN, flash and default, and dense flex."""
    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    row: dict[str, float] = {}
    backends = {
        "SDPA cuDNN ms": SDPBackend.CUDNN_ATTENTION,
        "SDPA flash ms": SDPBackend.FLASH_ATTENTION,
    }
    for column, backend in backends.items():
        try:
            with sdpa_kernel(backend):
                row[column] = time_ms(
                    lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
                )
        except RuntimeError as err:  # backend unavailable for this dtype/device
            progress(f"  {column}: {err}".splitlines()[0])
    row["SDPA default ms"] = time_ms(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    )
    num_kv = -(-k.shape[2] // config.kv_block)
    every_block = torch.ones(*q.shape[:2], num_kv, dtype=torch.bool, device=q.device)
    dense_mask = build_block_mask(every_block, make_layout(config, q.shape[2], q.device))
    row["flex dense ms"] = time_ms(
        lambda: attention_with_mask(q, k, v, dense_mask, enable_gqa=True)
    )
    return row
