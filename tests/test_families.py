"""Every attention family through both doors equals the model's own eager attention (CPU).

Tiny random models (tests/models.py) with their special features on: sliding windows shorter
than the sequence, Gemma2's attention and final soft-caps, GPT-OSS sinks, Gemma3/Cohere2
mixed sliding and global layers, bidirectional encoders. With alpha=1.0 SampleAttention keeps
every block, so wherever the door runs it, and wherever it hands the call to other attention,
the logits must equal `attn_implementation="eager"` up to fp32 rounding.
"""

import pytest
import torch

import flexsample
from flexsample import SampleConfig
from flexsample.compile import report, reset_report
from flexsample.integrations.transformers import register

from models import ENCODERS, FAMILIES, tiny_family

#: Every block kept: the sparse path is dense attention, in another summation order.
EXACT = SampleConfig(min_seq_len=16, q_block=16, kv_block=16, alpha=1.0)
#: The default alpha on these blocks: sparse for real (compared only for running).
SPARSE = SampleConfig(min_seq_len=16, q_block=16, kv_block=16)
#: Max abs logit difference allowed (logits ~3 with these weights). Calibration, transformers
#: 5.24 and 5.17, torch 2.13 CPU: eager vs SDPA 2.6e-6 (Llama; 1e-7..2.6e-6 over the
#: families that allow SDPA); flexsample alpha=1 vs eager 2.6e-6 (Llama). ~4x that.
TOL = 1e-5
LENGTH = 96  # > WINDOW (32) and > min_seq_len; 6 blocks of 16


@pytest.fixture(autouse=True)
def fresh():
    flexsample.path_counts.clear()
    yield
    register()  # back to the default config


def _ids(batch=1, length=LENGTH, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item()


def _logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_alpha_one_equals_eager(family):
    register(EXACT)
    ids = _ids(batch=2)
    expected = _logits(tiny_family(family, "eager"), ids)
    got = _logits(tiny_family(family, "flexsample"), ids)
    diff = _max_diff(got, expected)
    assert diff <= TOL, f"{family}: max |flexsample - eager| = {diff:.3g}"


def test_llama_runs_sparse_in_every_layer():
    register(EXACT)
    _logits(tiny_family("llama", "flexsample"), _ids())
    assert flexsample.path_counts == {"sparse": 2}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt_oss"])
def test_left_padded_batch_equals_eager(family):
    register(EXACT)
    ids = _ids(batch=2, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :21] = 0  # left padding
    expected = _logits(tiny_family(family, "eager"), ids, attention_mask=mask)
    got = _logits(tiny_family(family, "flexsample"), ids, attention_mask=mask)
    keep = mask.bool()  # padded query rows are undefined
    diff = _max_diff(got[keep], expected[keep])
    assert diff <= TOL, f"{family}: max |flexsample - eager| = {diff:.3g} (real tokens)"


@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
def test_packed_sequences_equal_eager(family):
    """Two sequences packed in one row (position ids restart, no cache): transformers builds a
    block-diagonal mask, which must not be taken for the causal one."""
    register(EXACT)
    ids = _ids(seed=3)
    position_ids = torch.arange(LENGTH).remainder(LENGTH // 2)[None]
    kwargs = dict(position_ids=position_ids, use_cache=False)
    expected = _logits(tiny_family(family, "eager"), ids, **kwargs)
    got = _logits(tiny_family(family, "flexsample"), ids, **kwargs)
    diff = _max_diff(got, expected)
    assert diff <= TOL, f"{family}: max |flexsample - eager| = {diff:.3g}"


def _generate(model, ids, **kwargs):
    """Six greedy tokens with the logits of every step."""
    with torch.no_grad():
        return model.generate(
            ids,
            max_new_tokens=6,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )


def _assert_same_generation(runs: dict, label: str) -> None:
    got, expected = runs["flexsample"], runs["eager"]
    diff = _max_diff(torch.stack(got.logits), torch.stack(expected.logits))
    assert diff <= TOL, f"{label}: max |flexsample - eager| over the steps = {diff:.3g}"
    assert torch.equal(got.sequences, expected.sequences)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_greedy_generate_equals_eager(family):
    """Prefill (sparse where allowed) then cached decode steps: eager's greedy tokens, and
    eager's logits at every step."""
    register(EXACT)
    ids = _ids(seed=2)
    runs = {name: _generate(tiny_family(family, name), ids) for name in ("eager", "flexsample")}
    _assert_same_generation(runs, family)


def test_default_alpha_runs_sparse_on_llama():
    """alpha < 1 drops blocks: only that it runs sparse and stays finite, not equality."""
    register(SPARSE)
    logits = _logits(tiny_family("llama", "flexsample"), _ids(length=160))
    assert flexsample.path_counts == {"sparse": 2}
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])
def test_compile_backend_alpha_one_equals_eager(family):
    """`torch.compile(backend=flexsample.backend(cfg))` on the model transformers picks (SDPA,
    or eager where the family refuses SDPA) keeps that model's answer, and so eager's.

    The pass sees only the traced SDPA calls: where transformers' own choice already differs
    from eager (Gemma2 on 5.17 runs SDPA without its soft-cap), that is not the door's to fix
    and the comparison with eager is skipped with the measured difference."""
    torch._dynamo.reset()
    reset_report()
    ids = _ids(batch=2)
    expected = _logits(tiny_family(family, "eager"), ids)
    model = tiny_family(family, None)
    uncompiled = _logits(model, ids)
    compiled = torch.compile(model, backend=flexsample.backend(EXACT), dynamic=False)
    got = _logits(compiled, ids)
    impl = model.config._attn_implementation
    diff = _max_diff(got, uncompiled)
    assert diff <= TOL, (
        f"{family} ({impl}): max |compiled - uncompiled| = {diff:.3g}; rewritten "
        f"{report().rewritten}, skipped {report().skipped}, paths {dict(flexsample.path_counts)}"
    )
    own = _max_diff(uncompiled, expected)
    if own > TOL:
        pytest.skip(f"transformers' own {impl} for {family} differs from eager by {own:.3g}")
    assert _max_diff(got, expected) <= TOL


def _left_padded(batch=2, seed=1):
    """Token ids and a mask whose second row has 21 pad tokens on the left."""
    ids = _ids(batch=batch, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :21] = 0
    return ids, mask


def _door(family: str, compiled: bool):
    model = tiny_family(family, "flexsample")
    if compiled:
        torch._dynamo.reset()
        model = torch.compile(model, fullgraph=True)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_left_padding_reaches_the_door_as_b_by_s_and_equals_eager(op_masks, family, compiled):
    """The door's mask function hands a padded prefill the [B, S] padding mask, also traced
    (its values unread); the op runs SDPA with the causal-and-padding mask built from it
    (Llama), Gemma2's soft-capped global layer its eager function with the additive mask built
    from it (its windowed layer keeps SDPA's mask). Real tokens equal eager."""
    register(EXACT)
    ids, mask = _left_padded()
    expected = _logits(tiny_family(family, "eager"), ids, attention_mask=mask)
    got = _logits(_door(family, compiled), ids, attention_mask=mask)
    keep = mask.bool()  # padded query rows are undefined
    diff = _max_diff(got[keep], expected[keep])
    assert diff <= TOL, f"{family}: max |flexsample - eager| = {diff:.3g} (real tokens)"
    if family == "llama":
        assert op_masks == [tuple(ids.shape)] * 2
        assert flexsample.path_counts == {"dense:padding": 2}
    else:
        assert op_masks == []  # soft-cap and window: the model's own attention


@pytest.mark.slow
@pytest.mark.parametrize(
    "padded, compiled",
    [(True, False), (True, True), (False, True)],
    ids=["padded-eager", "padded-compiled", "unpadded-compiled"],
)
def test_generate_with_cache_equals_eager(op_masks, padded, compiled):
    """Prefill through the op with the [B, S] padding mask (None where eager code sees no
    padding), then cached decode steps with transformers' SDPA masks: eager's greedy tokens
    and eager's logits at every step."""
    register(EXACT)
    ids, mask = _left_padded(seed=4)
    if not padded:
        mask = torch.ones_like(mask)
    runs = {}
    for name in ("eager", "flexsample"):
        model = tiny_family("llama", name)
        if compiled and name == "flexsample":
            torch._dynamo.reset()
            model.forward = torch.compile(model.forward)
        runs[name] = _generate(model, ids, attention_mask=mask)
    _assert_same_generation(runs, "llama")
    # Only the prefill reaches the op (decode steps are not prefills: the model's own SDPA),
    # with nothing S×S. Without padding, 5.24's generate drops the all-ones mask (None), 5.17
    # passes it (traced: [B, S]).
    allowed = [tuple(ids.shape)] if padded else [None, tuple(ids.shape)]
    assert len(op_masks) == 2 and all(shape in allowed for shape in op_masks), op_masks
    assert flexsample.path_counts == {"dense:padding" if padded else "sparse": 2}


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_keeps_sdpa_mask_and_equals_eager(op_masks, family, compiled):
    """A window shorter than the keys is not a plain causal mask: the door's mask function
    gives SDPA's windowed [B, 1, S, S] mask, the model's own SDPA runs with it. Mistral: every
    layer windowed; Qwen2: one global layer (through the op with the [B, S] padding mask)."""
    register(EXACT)
    ids, mask = _left_padded(seed=5)
    expected = _logits(tiny_family(family, "eager"), ids, attention_mask=mask)
    got = _logits(_door(family, compiled), ids, attention_mask=mask)
    keep = mask.bool()
    diff = _max_diff(got[keep], expected[keep])
    assert diff <= TOL, f"{family}: max |flexsample - eager| = {diff:.3g} (real tokens)"
    assert op_masks == ([] if family == "mistral" else [tuple(ids.shape)])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3", "bert", "modernbert"])
def test_compiled_door_without_cache_or_mask_equals_eager(family):
    """Traced with neither cache nor padding mask, transformers hands the door a mask function
    it builds in the traced code (its packing check); the door reads it as sequence ids only
    where it is that one: windowed and bidirectional families still equal eager."""
    register(EXACT)
    ids = _ids(batch=2)
    kwargs = {} if family in ENCODERS else {"use_cache": False}
    expected = _logits(tiny_family(family, "eager"), ids, **kwargs)
    got = _logits(_door(family, compiled=True), ids, **kwargs)
    diff = _max_diff(got, expected)
    assert diff <= TOL, f"{family}: max |compiled door - eager| = {diff:.3g}"
