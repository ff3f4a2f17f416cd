"""Which kernel of compiled `flex_attention` runs the sparse attention, with what options."""

from __future__ import annotations

import torch

from flexsample.config import SampleConfig


def kernel_options(q: torch.Tensor, config: SampleConfig) -> dict[str, int] | None:
    """Flex's CUDA kernel tiles must divide the mask blocks; cap them for blocks under 128."""
    if q.device.type != "cuda" or min(config.q_block, config.kv_block) >= 128:
        return None
    m, n = min(config.q_block, 64), min(config.kv_block, 64)
    return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_M1": m, "BLOCK_N1": n, "BLOCK_M2": m, "BLOCK_N2": n}
