"""attn_implementation="flexsample": registration, equivalence, fallbacks, loading (CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import flexsample
from flexsample import SampleConfig
from flexsample.integrations.transformers import packed_sequence_ids, register

from models import CONFIGS, tiny_model

SPARSE = SampleConfig(min_seq_len=0, q_block=32, kv_block=32)


@pytest.fixture(autouse=True)
def fresh():
    flexsample.path_counts.clear()
    yield
    register()  # back to the default config


def _ids(batch=1, length=300, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_alpha_one_equals_sdpa_model(arch):
    register(SampleConfig(min_seq_len=0, q_block=32, kv_block=32, alpha=1.0))
    ids = _ids()
    with torch.no_grad():
        expected = tiny_model(arch)(ids).logits
        got = tiny_model(arch, attn_implementation="flexsample")(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert flexsample.path_counts == {"sparse": 2}


def test_sparse_config_runs_sparse_and_stays_close():
    register(SPARSE)
    ids = _ids()
    with torch.no_grad():
        expected = tiny_model("llama")(ids).logits
        got = tiny_model("llama", attn_implementation="flexsample")(ids).logits
    assert flexsample.path_counts == {"sparse": 2}
    assert (got - expected).norm() / expected.norm() < 0.05


def test_generate_and_padded_batch_match_dense():
    register(SampleConfig(min_seq_len=0, q_block=32, kv_block=32, alpha=1.0))
    dense, sparse = tiny_model("qwen2"), tiny_model("qwen2", attn_implementation="flexsample")
    ids = _ids(batch=2, length=150)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            expected = dense.generate(ids, max_new_tokens=5, do_sample=False, **kwargs)
            got = sparse.generate(ids, max_new_tokens=5, do_sample=False, **kwargs)
            assert torch.equal(got, expected)
    # Unpadded prefill ran sparse (2 layers); the padded prefill's [B, S] padding mask was
    # checked and run with SDPA (2 layers); decode steps went to transformers' SDPA function
    # (not counted).
    assert flexsample.path_counts == {"sparse": 2, "dense:padding": 2}


def test_from_pretrained_checkpoint_uses_flexsample(tmp_path):
    register(SPARSE)
    tiny_model("mistral").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flexsample")
    assert model.config._attn_implementation == "flexsample"
    with torch.no_grad():
        model(_ids())
    assert flexsample.path_counts == {"sparse": 2}


def test_compiles_fullgraph_with_inductor():
    register(SPARSE)
    model = tiny_model("llama", attn_implementation="flexsample")
    ids = _ids()
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(ids).logits
        flexsample.path_counts.clear()
        got = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert flexsample.path_counts == {"sparse": 2}  # also where traced transformers passes a mask


@pytest.mark.parametrize("door", ["attn_implementation", "compile"])
def test_training_step_gradients_equal_eager(door):
    """Inputs that require grad take a path with autograd (the model's own attention)."""
    register(SPARSE)
    ids = _ids(length=96)
    grads = {}
    for name in ("eager", door):
        impl = {"eager": "eager", "attn_implementation": "flexsample", "compile": "sdpa"}[name]
        model = tiny_model("llama", attn_implementation=impl).train()
        if name == "compile":
            torch._dynamo.reset()
            model = torch.compile(model, backend=flexsample.backend(SPARSE))
        model(ids, labels=ids).loss.backward()
        grads[name] = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}
    for param, expected in grads["eager"].items():
        torch.testing.assert_close(grads[door][param], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "given", ["no-attention-mask", "all-ones-mask", "no-cache"], ids=lambda given: given
)
def test_compiled_prefill_hands_the_op_nothing_s_by_s(op_masks, given, monkeypatch):
    """Traced transformers builds a [B, 1, S, S] causal mask for SDPA's mask function; the
    door's mask function hands the op None, the [B, S] padding mask or (no cache and no
    padding mask: transformers' packing check, which cannot run traced) [B, S] sequence ids
    instead, which is read in O(B·S) once per forward (not once per layer: each read is a
    host sync) and runs sparse. S = 512: S×S elements is 4x the largest activation (MLP,
    128 x 512), so no tensor of the compiled graph may have that many."""
    from torch._inductor.compile_fx import compile_fx

    from flexsample import key_mask

    reads = []
    real_read = key_mask._read_values
    monkeypatch.setattr(key_mask, "_read_values", lambda m: reads.append(1) or real_read(m))

    register(SPARSE)
    length = 512
    model = tiny_model("llama", attn_implementation="flexsample")
    ids = _ids(length=length)
    kwargs = {
        "no-attention-mask": {},
        "all-ones-mask": {"attention_mask": torch.ones_like(ids)},
        "no-cache": {"use_cache": False},
    }[given]
    sizes = {}

    def inductor_recording_sizes(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                sizes[node.name] = value.numel()
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(ids, **kwargs).logits
        op_masks.clear()
        flexsample.path_counts.clear()
        compiled = torch.compile(model, fullgraph=True, backend=inductor_recording_sizes)
        compiled(ids, **kwargs)
        reads.clear()
        got = compiled(ids, **kwargs).logits
    assert op_masks == [None if given == "no-attention-mask" else (1, length)] * 4
    assert len(reads) == (0 if given == "no-attention-mask" else 1)  # 2 layers, one read
    assert sizes and max(sizes.values()) < length * length, max(sizes.items(), key=lambda x: x[1])
    assert flexsample.path_counts == {"sparse": 4}
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_each_forward_decides_on_its_own_mask_under_inference_mode(monkeypatch):
    """The door reads a forward's [B, S] mask once (`key_mask.read_once`) and every layer reuses
    that reading: a compiled model called with masks of one shape in turn (all kept, padded,
    all kept, padded) runs each on its own mask and equals SDPA, eager and compiled, under
    inference_mode (tensors without version counters), with one read per forward."""
    from flexsample import key_mask

    reads = []
    real_read = key_mask._read_values
    monkeypatch.setattr(key_mask, "_read_values", lambda m: reads.append(1) or real_read(m))
    register(SampleConfig(min_seq_len=0, q_block=32, kv_block=32, alpha=1.0))
    model = tiny_model("llama", attn_implementation="flexsample")
    dense = tiny_model("llama", attn_implementation="sdpa")
    ids = _ids(batch=2, length=320)
    padded = torch.ones_like(ids)
    padded[1, :40] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True)
    with torch.inference_mode():
        for mask, path in [(torch.ones_like(ids), "sparse"), (padded, "dense:padding")] * 2:
            expected = dense(ids, attention_mask=mask, use_cache=False).logits
            for run in (model, compiled):
                flexsample.path_counts.clear()
                reads.clear()
                got = run(ids, attention_mask=mask, use_cache=False).logits
                assert flexsample.path_counts == {path: 2} and len(reads) == 1
                torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(got[1, 40:], expected[1, 40:], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_packed_sequences_run_dense_and_match_eager():
    """Traced without cache or padding mask, transformers cannot tell packed sequences from
    one: the door hands the op sequence ids, which it reads at run time (dense for packed
    rows, sparse for the rest), so a packed batch keeps the eager model's answer."""
    from transformers.masking_utils import and_masks, causal_mask_function

    register(SPARSE)
    model = tiny_model("llama", attn_implementation="flexsample")
    ids = _ids(batch=2, length=320)
    positions = torch.stack([torch.arange(320), torch.cat([torch.arange(120), torch.arange(200)])])
    expected_model = tiny_model("llama", attn_implementation="sdpa")
    torch._dynamo.reset()
    with torch.no_grad():
        expected = expected_model(ids, position_ids=positions, use_cache=False).logits
        flexsample.path_counts.clear()
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(ids, position_ids=positions, use_cache=False).logits
        assert flexsample.path_counts == {"dense:packed sequences": 2}
        plain = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[1], plain[1], atol=1e-3)  # packing changed row 1
    seq_ids = packed_sequence_ids(
        and_masks(causal_mask_function, lambda b, h, q, kv: (q < 120) == (kv < 120)), 1, 320, None
    )
    assert seq_ids.tolist() == [[0] * 120 + [1] * 200]


def test_unreadable_traced_mask_is_refused_not_guessed():
    """A mask function that lets a token see the next one (e.g. a bidirectional block) is not
    causal ∧ packed: the door marks it and the op raises instead of running a causal guess."""
    from transformers.masking_utils import and_masks, causal_mask_function, or_masks

    bidirectional_block = or_masks(causal_mask_function, lambda b, h, q, kv: (q < 8) & (kv < 8))
    seq_ids = packed_sequence_ids(and_masks(bidirectional_block), 1, 64, None)
    assert (seq_ids == -1).all()
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="neither causal nor causal within packed"):
        torch.ops.flexsample.sample_attention(q, q, q, seq_ids, None, False, "{}", "")


@pytest.mark.slow
def test_compile_model_is_the_door_compiled_by_layer():
    """One line: door + regional compilation; equals the uncompiled door, runs sparse, serves a
    second length; a model without decoder layers is a clear error."""
    from flexsample.integrations.transformers import compile_model

    model = tiny_model("llama", attn_implementation="sdpa")
    expected_model = tiny_model("llama", attn_implementation="sdpa")
    torch._dynamo.reset()
    compile_model(model, SPARSE, backend="aot_eager")
    assert model.config._attn_implementation == "flexsample"
    with torch.no_grad():
        for length in (300, 360):
            ids = _ids(length=length)
            register(SPARSE)
            expected_model.set_attn_implementation("flexsample")
            expected = expected_model(ids).logits
            flexsample.path_counts.clear()
            got = model(ids).logits
            assert flexsample.path_counts == {"sparse": 2}
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no transformers decoder layers"):
        compile_model(torch.nn.Linear(2, 2))


@pytest.mark.gpu
def test_reduce_overhead_captures_a_padded_short_prompt():
    """inductor's CUDA graphs (`mode="reduce-overhead"`) capture a prompt shorter than
    `min_seq_len` with a padding mask: the door's copy of the mask is not read (a host sync,
    which a capture refuses) since the op runs dense before looking at it."""
    register(SampleConfig())
    model = tiny_model("llama", attn_implementation="flexsample").cuda()
    dense = tiny_model("llama", attn_implementation="sdpa").cuda()
    ids = _ids(batch=2, length=128).cuda()
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        expected = dense(ids, attention_mask=mask, use_cache=False).logits
        for _ in range(4):  # warm-up, capture, replays
            got = compiled(ids, attention_mask=mask, use_cache=False).logits.clone()
            torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[1, 20:], expected[1, 20:], atol=1e-4, rtol=1e-4)
