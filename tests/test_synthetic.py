"""The structured input generator: seeded, and its attention has the parts it promises."""

import torch

from flexsample import SampleConfig
from flexsample.metrics import causal_probs, column_mass
from flexsample.synthetic import structured_qkv

CONFIG = SampleConfig(min_seq_len=0, q_block=64, kv_block=64)


def _inputs(seed=0):
    return structured_qkv(1, 8, 2, 2048, 64, seed=seed)


def test_seeded():
    a, b, c = _inputs(), _inputs(), _inputs(seed=1)
    assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert not torch.equal(a.k, c.k)


def test_sink_holds_mass_on_every_head():
    x = _inputs()
    share = torch.cat([probs[..., 0] for _, probs in causal_probs(x.q, x.k)], -1).mean(-1)
    length = x.q.shape[2]
    uniform = sum(1 / (i + 1) for i in range(length)) / length  # token 0's share if uniform
    assert (share > 0.05).all() and (share > 10 * uniform).all(), share


def test_oracle_recovers_stripe_positions_on_stripe_heads():
    x = _inputs()
    mass = column_mass(x.q, x.k, CONFIG)[0]
    group = x.q.shape[1] // x.k.shape[1]
    for head, kind in enumerate(x.head_kinds):
        if kind != "stripe":
            continue
        stripes = set((x.stripe_positions[head // group] // CONFIG.kv_block).tolist()) | {0}
        top = set(mass[head].argsort(descending=True)[: len(stripes)].tolist())
        assert top == stripes, (head, sorted(top), sorted(stripes))


def test_local_band_decays_inside_the_window():
    x = _inputs()
    rows = torch.arange(1024, 2048)
    _, probs = next(causal_probs(x.q[:, :1], x.k[:, :1], rows=rows))  # a "local" head
    offsets = rows[:, None] - torch.arange(2048)[None, :]
    near = probs[0, 0][(offsets >= 0) & (offsets < CONFIG.window_tokens(2048))].sum() / len(rows)
    assert near > 0.8, near
