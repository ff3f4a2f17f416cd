"""Checks shared by the test modules: the contract every causal BlockMask of flexsample keeps,
and the largest tensor an operation makes."""

import math

import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask
from torch.utils._python_dispatch import TorchDispatchMode

from flexsample import SampleConfig
from flexsample.block_mask import kept_blocks
from flexsample.metrics import density
from flexsample.reference import reference_token_mask


def assert_block_mask_contract(block_mask: BlockMask, keep: torch.Tensor, config: SampleConfig):
    """`block_mask` keeps exactly the blocks of `keep` `[B, H, nQ, nKV]`: one row of blocks per
    query head, ascending lists without duplicates, causal, full blocks exactly those that end
    at or before the query block's first row (so partial ones meet the diagonal), and a
    mask_mod whose token mask is the keep matrix's with the causal rule."""
    seq_len = block_mask.seq_lengths[0]
    batch, heads = keep.shape[:2]
    num_q, num_kv = math.ceil(seq_len / config.q_block), math.ceil(seq_len / config.kv_block)
    assert block_mask.kv_indices.shape == (batch, heads, num_q, num_kv)
    assert torch.equal(kept_blocks(block_mask), keep)
    for counts, indices, is_full in (
        (block_mask.kv_num_blocks, block_mask.kv_indices, False),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True),
    ):
        for b in range(batch):
            for h in range(heads):
                for qb in range(num_q):
                    valid = indices[b, h, qb, : counts[b, h, qb]].tolist()
                    assert valid == sorted(set(valid)), "ascending, no duplicates"
                    q_first = qb * config.q_block
                    q_last = min(seq_len, q_first + config.q_block) - 1
                    for kb in valid:
                        assert kb <= q_last // config.kv_block, "causal"
                        fully_before = (kb + 1) * config.kv_block - 1 <= q_first
                        assert fully_before == is_full, "full blocks are exactly the unmasked ones"
    token_mask = reference_token_mask(keep, seq_len, config)
    dense = create_mask(block_mask.mask_mod, batch, heads, seq_len, seq_len, device="cpu")
    assert torch.equal(dense, token_mask)
    torch.testing.assert_close(
        density(block_mask), token_mask.sum((-1, -2)).float() / (seq_len * (seq_len + 1) / 2)
    )


class LargestOutput(TorchDispatchMode):
    """Records the most elements any op's output had while the mode was on (`largest`)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
