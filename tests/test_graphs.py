"""CUDA-graph replay of the op's sparse path (flexsample/graphs.py): the cache's rules on CPU,
the replay against the unreplayed path on the GPU."""

import dataclasses
import logging

import pytest
import torch

from flexsample import SampleConfig, graphs, tail
from flexsample.op import config_to_str
from flexsample.synthetic import structured_qkv

CONFIG = SampleConfig(min_seq_len=0)


def _inputs(length=300, batch=1, heads=4, kv_heads=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen) for _ in range(2))
    return q, k, v


class _Recorder:
    """A stand-in capture: records signatures, fails on the lengths in `failing`."""

    def __init__(self, failing=()):
        self.calls = []
        self.failing = failing

    def __call__(self, q, k, v, config, scale):
        self.calls.append(q.shape[2])
        if q.shape[2] in self.failing:
            return None
        return graphs.Replay(None, (q, k, v), q)


def test_the_cache_captures_a_signature_once_and_drops_the_least_recent():
    capture = _Recorder()
    cache = graphs.GraphCache(capture, size=2)
    first = cache.get(*_inputs(300), CONFIG, None)
    assert cache.get(*_inputs(300, seed=1), CONFIG, None) is first  # same signature, new values
    cache.get(*_inputs(301), CONFIG, None)
    cache.get(*_inputs(300), CONFIG, None)  # 300 is now the most recent
    cache.get(*_inputs(302), CONFIG, None)  # evicts 301
    assert capture.calls == [300, 301, 302]
    cache.get(*_inputs(301), CONFIG, None)
    assert capture.calls == [300, 301, 302, 301]


@pytest.mark.parametrize(
    "change",
    [
        {"config": dataclasses.replace(CONFIG, alpha=0.8)},
        {"scale": 0.5},
        {"dtype": torch.float64},
        {"kv_heads": 4},
        {"batch": 2},
    ],
)
def test_every_part_of_the_signature_gets_its_own_graph(change):
    capture = _Recorder()
    cache = graphs.GraphCache(capture)
    cache.get(*_inputs(300), CONFIG, None)
    q, k, v = _inputs(300, batch=change.get("batch", 1), kv_heads=change.get("kv_heads", 2))
    if "dtype" in change:
        q, k, v = (x.to(change["dtype"]) for x in (q, k, v))
    cache.get(q, k, v, change.get("config", CONFIG), change.get("scale"))
    assert len(capture.calls) == 2


def test_a_failed_capture_is_remembered_not_retried_and_takes_no_slot():
    capture = _Recorder(failing=(300,))
    cache = graphs.GraphCache(capture, size=1)
    assert cache.get(*_inputs(300), CONFIG, None) is None
    working = cache.get(*_inputs(301), CONFIG, None)
    assert cache.get(*_inputs(300), CONFIG, None) is None
    assert cache.get(*_inputs(301), CONFIG, None) is working
    assert capture.calls == [300, 301]


def test_the_default_scale_and_its_value_share_a_graph():
    capture = _Recorder()
    cache = graphs.GraphCache(capture)
    q, k, v = _inputs(300)
    assert cache.get(q, k, v, CONFIG, None) is cache.get(q, k, v, CONFIG, q.shape[-1] ** -0.5)
    assert len(capture.calls) == 1


def test_replay_needs_cuda_few_tokens_and_the_default_stream():
    q = _inputs(300, batch=2)[0]
    assert not graphs.replay_applies(q, CONFIG)  # CPU
    if torch.cuda.is_available():
        q = q.cuda()
        assert graphs.replay_applies(q, CONFIG)
        assert graphs.replay_applies(q, dataclasses.replace(CONFIG, graph_max_len=600))
        assert not graphs.replay_applies(q, dataclasses.replace(CONFIG, graph_max_len=599))
        assert not graphs.replay_applies(q, dataclasses.replace(CONFIG, graph_max_len=0))
        with torch.cuda.stream(torch.cuda.Stream()):
            assert not graphs.replay_applies(q, CONFIG)


def _op(q, k, v, config, scale=None):
    return torch.ops.flexsample.sample_attention(
        q, k, v, None, scale, q.shape[1] != k.shape[1], config_to_str(config)
    )


def _transformers_layout(*tensors):
    return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors)


@pytest.fixture
def fresh_graphs(monkeypatch):
    # The replayed path splits the dense tail at any length, the unreplayed one only from
    # tail.EAGER_MIN_BLOCKS blocks: the same split on both sides, so equal means bit-equal.
    monkeypatch.setattr(tail, "EAGER_MIN_BLOCKS", 0)
    graphs.clear()
    yield
    graphs.clear()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,backend", [(torch.bfloat16, "auto"), (torch.float16, "triton"), (torch.float32, "auto")]
)
@pytest.mark.parametrize("batch,heads,kv_heads,length", [(1, 8, 2, 3001), (2, 4, 4, 2048)])
def test_replay_equals_the_unreplayed_op(
    fresh_graphs, dtype, backend, batch, heads, kv_heads, length
):
    """Same kernels, same inputs: the replayed op returns exactly the unreplayed op's output, in
    q's layout, and a second call with other values of the same shape returns theirs (the
    graph reads its inputs anew)."""
    config = SampleConfig(min_seq_len=0, flex_backend=backend)
    unreplayed = dataclasses.replace(config, graph_max_len=0)
    for seed in (0, 1):
        x = structured_qkv(
            batch, heads, kv_heads, length, 64, dtype=dtype, device="cuda", seed=seed
        )
        q, k, v = _transformers_layout(x.q, x.k, x.v)
        got = _op(q, k, v, config)
        want = _op(q, k, v, unreplayed)
        assert got.stride() == want.stride()
        assert torch.equal(got, want)
    assert len(graphs._cache.entries) == 1 and not graphs._cache.failed  # replayed, not fallen back


@pytest.mark.gpu
def test_a_capture_that_fails_runs_the_path_unreplayed(fresh_graphs, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("planted capture failure")

    monkeypatch.setattr(torch.cuda, "graph", broken)
    x = structured_qkv(1, 4, 2, 1024, 64, dtype=torch.bfloat16, device="cuda")
    with caplog.at_level(logging.WARNING, logger="flexsample"):
        got = [_op(x.q, x.k, x.v, CONFIG) for _ in range(2)]
    want = _op(x.q, x.k, x.v, dataclasses.replace(CONFIG, graph_max_len=0))
    assert all(torch.equal(g, want) for g in got)
    assert sum("could not capture" in r.message for r in caplog.records) == 1


@pytest.mark.gpu
def test_inside_an_outer_capture_the_path_is_captured_not_replayed(fresh_graphs):
    """A model captured whole (compiled with mode="reduce-overhead") captures the op's kernels
    into its own graph: no nested replay, and the outer replay computes fresh inputs."""
    x = structured_qkv(1, 4, 2, 1024, 64, dtype=torch.bfloat16, device="cuda")
    q, k, v = (t.clone() for t in (x.q, x.k, x.v))
    _op(q, k, v, dataclasses.replace(CONFIG, graph_max_len=0))  # compile outside the capture
    outer = torch.cuda.CUDAGraph()
    with torch.cuda.graph(outer):
        out = _op(q, k, v, CONFIG)
    assert not graphs._cache.entries
    y = structured_qkv(1, 4, 2, 1024, 64, dtype=torch.bfloat16, device="cuda", seed=3)
    for static, new in zip((q, k, v), (y.q, y.k, y.v), strict=True):
        static.copy_(new)
    outer.replay()
    assert torch.equal(out, _op(y.q, y.k, y.v, dataclasses.replace(CONFIG, graph_max_len=0)))


@pytest.mark.gpu
def test_a_model_compiled_with_reduce_overhead_gets_the_unreplayed_answers(fresh_graphs):
    """Inductor's CUDA-graph trees warm up on a side stream with allocations routed to their
    pool, then capture, then replay: the op must neither replay nor capture a graph of its own
    there (its buffers would share the pool with the model's tensors). Two sparse calls with
    a tensor live between them, three calls of the compiled function on fresh inputs."""

    op = torch.ops.flexsample.sample_attention

    def two_layers(q, k, v, text):
        hidden = op(q, k, v, None, None, False, text) * 2
        return op(hidden, k, v, None, None, False, text) + hidden

    replayed = config_to_str(dataclasses.replace(CONFIG, graph_max_len=1 << 20))
    unreplayed = config_to_str(dataclasses.replace(CONFIG, graph_max_len=0))
    compiled = torch.compile(two_layers, mode="reduce-overhead")
    for seed in range(3):
        x = structured_qkv(1, 4, 4, 1024, 64, dtype=torch.bfloat16, device="cuda", seed=seed)
        got = compiled(x.q, x.k, x.v, replayed).clone()
        assert torch.equal(got, two_layers(x.q, x.k, x.v, unreplayed))
    assert not graphs._cache.entries


@pytest.mark.gpu
def test_planted_stale_input_fails(fresh_graphs):
    """The equality test above can fail: a replay without the input copies returns the first
    call's output for the second call's inputs."""
    x = structured_qkv(1, 4, 2, 1024, 64, dtype=torch.bfloat16, device="cuda", seed=0)
    _op(x.q, x.k, x.v, CONFIG)
    y = structured_qkv(1, 4, 2, 1024, 64, dtype=torch.bfloat16, device="cuda", seed=1)
    replay = graphs._cache.get(y.q, y.k, y.v, CONFIG, None)  # the signature's cached graph
    replay.graph.replay()  # the planted bug: y never copied in
    want = _op(y.q, y.k, y.v, dataclasses.replace(CONFIG, graph_max_len=0))
    assert not torch.equal(replay.output, want)
