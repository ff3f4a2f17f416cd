"""The torch.compile backend: FX rewrite of SDPA calls on tiny random HF models (CPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import flexsample
from flexsample import SampleConfig
from flexsample.compile import report, reset_report

from models import CONFIGS, tiny_model

SPARSE = SampleConfig(min_seq_len=0, q_block=32, kv_block=32)
DENSE_EQUIVALENT = SampleConfig(min_seq_len=0, q_block=32, kv_block=32, alpha=1.0)


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    reset_report()
    flexsample.path_counts.clear()
    counters.clear()


def _rewritten() -> int:
    return sum(len(graph.rewritten) for graph in report().graphs)


def _skipped() -> list[tuple[str, str]]:
    return [item for graph in report().graphs for item in graph.skipped]


def _ids(batch=1, length=300, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_rewrites_one_call_per_layer_and_alpha_one_equals_sdpa(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend=flexsample.backend(DENSE_EQUIVALENT))(ids).logits
    assert _rewritten() == model.config.num_hidden_layers
    assert _skipped() == []
    assert flexsample.path_counts == {"sparse": model.config.num_hidden_layers}
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_sparse_path_runs_and_stays_close(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend=flexsample.backend(SPARSE))(ids).logits
    assert flexsample.path_counts == {"sparse": model.config.num_hidden_layers}
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.05, rel
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow
def test_default_config_above_min_seq_len_runs_sparse():
    model = tiny_model("llama")
    length = SampleConfig().min_seq_len + 100
    ids = _ids(length=length)
    with torch.no_grad():
        expected = model(ids).logits[:, -64:]
        got = torch.compile(model, backend="flexsample")(ids).logits[:, -64:]
    assert flexsample.path_counts == {"sparse": 2}
    assert (got - expected).norm() / expected.norm() < 0.05


def test_string_backend_is_registered_by_entry_point():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "flexsample" in list_backends(exclude_tags=())
    assert lookup_backend("flexsample") is flexsample.compile.flexsample_backend


def test_short_prompts_run_dense_without_recompiling():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=flexsample.backend(SampleConfig(min_seq_len=200)))
    with torch.no_grad():
        for seed in range(3):
            ids = _ids(length=100, seed=seed)
            torch.testing.assert_close(
                compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4
            )
    assert flexsample.path_counts == {"dense:short": 6}
    assert counters["stats"]["unique_graphs"] == 1


def test_no_recompiles_across_inputs_of_one_length_and_dynamic_lengths():
    model = tiny_model("qwen2")
    compiled = torch.compile(model, backend=flexsample.backend(SPARSE), dynamic=True)
    with torch.no_grad():
        for seed, length in enumerate([300, 300, 300, 257, 411]):
            ids = _ids(length=length, seed=seed)
            compiled(ids)
    assert flexsample.path_counts == {"sparse": 10}
    assert counters["stats"]["unique_graphs"] == 1


def test_generate_prefill_sparse_decode_dense():
    model = tiny_model("llama")
    ids = _ids(length=200)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        model.forward = torch.compile(model.forward, backend=flexsample.backend(DENSE_EQUIVALENT))
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)
    assert flexsample.path_counts["sparse"] == 2  # prefill, both layers
    assert _rewritten() >= 2


def test_padded_batch_runs_sdpa_with_its_mask_and_matches_dense():
    model = tiny_model("mistral")
    ids = _ids(batch=2, length=120)
    mask = torch.ones_like(ids)
    mask[0, :17] = 0  # left padding
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        model.forward = torch.compile(model.forward, backend=flexsample.backend(SPARSE))
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    # The padded prefill's mask is checked at run time and is not causal: SDPA with the mask.
    assert flexsample.path_counts["dense:mask"] >= 2
    assert "sparse" not in flexsample.path_counts


class _ExplicitMask(torch.nn.Module):
    """Causal attention written with an explicit mask, as traced transformers models do."""

    def __init__(self, additive: bool):
        super().__init__()
        self.additive = additive
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x, padding=None):
        length = x.shape[1]
        q, k, v = self.qkv(x).view(1, length, 3, 2, 16).permute(2, 0, 3, 1, 4)
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        if padding is not None:
            mask = mask & padding[:, None, None, :].bool()
        if self.additive:
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "float"])
def test_explicit_causal_mask_is_rewritten_and_checked_at_run_time(additive):
    torch.manual_seed(0)
    module = _ExplicitMask(additive).eval()
    x = torch.randn(1, 300, 32)
    padding = torch.ones(1, 300)
    padding[:, :40] = 0
    compiled = torch.compile(module, backend=flexsample.backend(DENSE_EQUIVALENT))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), atol=1e-4, rtol=1e-4)
        assert flexsample.path_counts == {"sparse": 1}
        torch.testing.assert_close(compiled(x, padding), module(x, padding))
    assert flexsample.path_counts == {"sparse": 1, "dense:mask": 1}
    assert _rewritten() == 2 and _skipped() == []


def test_no_graph_breaks_added():
    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids)
        torch._dynamo.reset()
        torch.compile(model, backend=flexsample.backend(SPARSE), fullgraph=True)(ids)
    assert explanation.graph_break_count == 0


class _Encoder(torch.nn.Module):
    """Bidirectional attention and an MLP: nothing for the pass to rewrite."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.mlp = torch.nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # not causal
        masked = F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(1, 1, 1, 1).bool().expand(1, 2, x.shape[1], x.shape[1])
        )
        return self.mlp(
            attn.transpose(1, 2).reshape(1, -1, 32) + masked.transpose(1, 2).reshape(1, -1, 32)
        )


def test_non_causal_and_masked_sdpa_and_plain_models_run_unchanged():
    torch.manual_seed(0)
    encoder = _Encoder().eval()
    x = torch.randn(1, 50, 32)
    with torch.no_grad():
        expected = encoder(x)
        got = torch.compile(encoder, backend=flexsample.backend(SPARSE))(x)
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        torch.testing.assert_close(
            torch.compile(mlp, backend="flexsample")(x[..., :8]), mlp(x[..., :8])
        )
    torch.testing.assert_close(got, expected)
    # The masked call may be causal as far as the graph shows; at run time its mask is not.
    assert _rewritten() == 1
    assert flexsample.path_counts == {"dense:mask": 1}
    reasons = [reason for _, reason in _skipped()]
    assert reasons == ["not causal (is_causal=False) and no mask"]


def test_training_graph_is_not_rewritten():
    model = tiny_model("llama").train()
    ids = _ids(length=64)
    out = torch.compile(model, backend=flexsample.backend(SPARSE))(ids, labels=ids)
    out.loss.backward()
    assert _rewritten() == 0
    assert any("require grad" in reason for _, reason in _skipped())


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("mask", [False, True])
def test_op_returns_the_layout_its_fake_promises(layout, mask):
    """Real and fake outputs must agree on strides: compiled code reads the real output with
    the fake's. transformers passes `[B, S, H, D]`-major views; every path must hand back
    that layout, and the values of SDPA."""
    from flexsample.op import _empty_like_query, config_to_str

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 200, 16, generator=gen) for _ in range(3))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    attn_mask = torch.ones(200, 200, dtype=torch.bool).tril()[None, None] if mask else None
    out = torch.ops.flexsample.sample_attention(
        q, k, v, attn_mask, None, False, config_to_str(DENSE_EQUIVALENT)
    )
    assert out.stride() == _empty_like_query(q, 16).stride()
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-4
    )
    assert flexsample.path_counts["sparse"] == 1


def test_report_is_per_graph_and_says_what_ran():
    """A recompile is its own entry; "rewritten" is not "ran sparse": the run-time paths of
    each graph's calls are counted apart."""
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=flexsample.backend(SampleConfig(min_seq_len=200)))
    with torch.no_grad():
        compiled(_ids(length=100))  # below min_seq_len: rewritten, but dense
        compiled(_ids(length=300))  # a new static length: a second graph, sparse
    first, second = report().graphs[0], report().graphs[-1]
    assert first.paths() == {"dense:short": 2}
    assert second.paths() == {"sparse": 2}
    assert len(report().graphs) == 2
    assert "dense:short 2" in str(first) and "sparse 2" in str(second)


def test_report_says_when_a_graph_has_no_sdpa_call():
    model = tiny_model("llama", attn_implementation="eager")
    with torch.no_grad():
        torch.compile(model, backend="flexsample")(_ids(length=64))
    assert all(graph.sdpa_calls == 0 for graph in report().graphs)
    assert "no compiled graph calls SDPA" in str(report())
    assert "no SDPA call" in str(report().graphs[0])


def test_op_keeps_sdpa_top_left_alignment_for_shorter_queries():
    """The op replaces SDPA calls, so is_causal=True with Sq < Skv keeps SDPA's top-left rule
    (sample_attention's own rule is end-aligned: test_attention)."""
    from flexsample.op import config_to_str

    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 7, 16, generator=gen), *(torch.randn(1, 2, 40, 16) for _ in "kv")
    out = torch.ops.flexsample.sample_attention(q, k, v, None, None, False, config_to_str(SPARSE))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert flexsample.path_counts == {"dense:q_len!=kv_len": 1}


@pytest.mark.parametrize("q_len", [7, 60])
def test_op_keeps_sdpa_top_left_alignment_for_unequal_lengths(q_len):
    """Shorter and longer queries alike: whatever SDPA accepts, the op runs as SDPA does."""
    from flexsample.op import config_to_str

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 16, generator=gen)
    k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in "kv")
    out = torch.ops.flexsample.sample_attention(q, k, v, None, None, True, config_to_str(SPARSE))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected)


def test_op_rejects_bad_scale_on_every_path():
    from flexsample.op import config_to_str

    q = torch.randn(1, 2, 20, 16)
    for config in (SPARSE, SampleConfig(min_seq_len=100)):
        with pytest.raises(ValueError, match="scale must be a finite float"):
            torch.ops.flexsample.sample_attention(
                q, q, q, None, float("nan"), False, config_to_str(config)
            )


def test_op_reads_a_2d_mask_as_key_padding():
    """The transformers door's [B, Skv] padding mask: all ones runs sparse (no S×S built);
    padding runs SDPA with the causal-and-padding mask, end-aligned for a shorter query; a
    2-D mask of another shape or dtype is an error, not an SDPA [Sq, Skv] mask."""
    from flexsample.causal_mask import causal_padding_mask
    from flexsample.op import config_to_str

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=gen) for _ in range(3))
    op, config = torch.ops.flexsample.sample_attention, config_to_str(DENSE_EQUIVALENT)
    keep = torch.ones(2, 64, dtype=torch.bool)
    torch.testing.assert_close(
        op(q, k, v, keep, None, False, config),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
        atol=2e-5,
        rtol=1e-4,
    )
    keep[1, :9] = False
    for rows in (64, 5):
        expected = F.scaled_dot_product_attention(
            q[:, :, -rows:], k, v, attn_mask=causal_padding_mask(rows, 64, keep)
        )
        torch.testing.assert_close(op(q[:, :, -rows:], k, v, keep, None, False, config), expected)
    assert flexsample.path_counts == {"sparse": 1, "dense:padding": 1, "dense:q_len!=kv_len": 1}
    for bad in (keep.float(), keep[:, :32], torch.ones(64, 64, dtype=torch.bool)):
        with pytest.raises(ValueError, match="padding mask"):
            op(q, k, v, bad, None, False, config)


class _TwoDimMask(torch.nn.Module):
    """Causal attention with SDPA's 2-D `[S, S]` mask, which the op would read as padding."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        length = x.shape[1]
        q, k, v = self.qkv(x).view(2, length, 3, 2, 16).permute(2, 0, 3, 1, 4)
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_sdpa_two_dim_mask_keeps_its_meaning():
    """The pass lifts SDPA's 2-D [Sq, Skv] mask to 4-D for the op (which reads 2-D masks as
    [B, Skv] key padding): still causal, still sparse."""
    torch.manual_seed(0)
    module = _TwoDimMask().eval()
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        got = torch.compile(module, backend=flexsample.backend(DENSE_EQUIVALENT))(x)
        torch.testing.assert_close(got, module(x), atol=1e-4, rtol=1e-4)
    assert _rewritten() == 1 and flexsample.path_counts == {"sparse": 1}
