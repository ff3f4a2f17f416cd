"""Tensor parallelism through transformers (`DistributedConfig(tp_size=2)`, gloo, 2 CPU
processes): `attn_implementation="flexsample"` runs SampleAttention on each rank's own heads,
with no collective inside attention, and gives the single-process model's logits."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.distributed import DistributedConfig

import flexsample
import flexsample.op
from flexsample import SampleConfig
from flexsample.integrations.transformers import register

from gloo_ranks import run_on_ranks
from models import SMALL


class Collectives(TorchDispatchMode):
    """Records every c10d op (eager ProcessGroup calls and functional collectives) run under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def _logits(path, ids, attn_implementation, tp_size=None):
    kwargs = {} if tp_size is None else {"distributed_config": DistributedConfig(tp_size=tp_size)}
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation, **kwargs
    )
    with torch.no_grad():
        return model.eval()(ids).logits


def _tp_cases(rank, world, path):
    # Positive control: the detector sees a collective when one runs.
    with Collectives() as probe:
        torch.distributed.all_reduce(torch.ones(1))
    assert probe.calls, "the collective detector saw nothing"

    # Every sparse call: its local head counts, and the collectives it ran (none expected).
    seen = []
    sparse = flexsample.op.sparse_attention

    def watched(q, k, v, *args, **kwargs):
        with Collectives() as mode:
            out = sparse(q, k, v, *args, **kwargs)
        seen.append((q.shape[1], k.shape[1], mode.calls))
        return out

    flexsample.op.sparse_attention = watched
    ids = torch.randint(1, 128, (2, 200), generator=torch.Generator().manual_seed(0))
    try:
        # alpha = 1 (every block): the single-process eager model's logits.
        register(SampleConfig(alpha=1.0, min_seq_len=0, q_block=16, kv_block=16))
        expected = _logits(path, ids, "eager")
        flexsample.path_counts.clear()
        got = _logits(path, ids, "flexsample", tp_size=world)
        assert flexsample.path_counts == {"sparse": SMALL["num_hidden_layers"]}
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        heads, kv_heads = SMALL["num_attention_heads"], SMALL["num_key_value_heads"]
        assert {(h, kv) for h, kv, _ in seen} == {(heads // world, kv_heads // world)}
        assert all(calls == [] for _, _, calls in seen), seen

        # alpha < 1: each head's mask depends on its own q and k only, so splitting the heads
        # gives the single-process sparse model's logits.
        register(SampleConfig(alpha=0.7, window_ratio=0.05, min_seq_len=0, q_block=16, kv_block=16))
        expected = _logits(path, ids, "flexsample")
        got = _logits(path, ids, "flexsample", tp_size=world)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        assert (got - _logits(path, ids, "eager")).abs().max() > 1e-3  # really sparse
    finally:
        flexsample.op.sparse_attention = sparse


def test_tensor_parallel_flexsample_equals_single_process(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(**SMALL, pad_token_id=0, initializer_range=0.1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    run_on_ranks(_tp_cases, 2, str(tmp_path))
