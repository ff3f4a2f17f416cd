"""flex_attention backend choice (flexsample/flex_backend.py): CPU tests of the selection with
a mocked GPU, and GPU tests that FLASH (FlashAttention-4) and Triton agree on flexsample's masks
(skipped where FA4 cannot run; set FLEXSAMPLE_FA4_SITE for an offline install)."""

import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.exc import FailOnRecompileLimitHit
from torch.nn.attention.flex_attention import AuxOutput, AuxRequest, BlockMask, create_block_mask

import flexsample.attention
import flexsample.flex_backend as fb
from flexsample import SampleConfig, sample_attention, sample_block_mask
from flexsample.attention import attention_with_mask
from flexsample.block_mask import token_mask
from flexsample.metrics import density

from tolerance import assert_output_close

FLASH = {"BACKEND": "FLASH"}


def _fake(shape=(1, 8, 8192, 128), dtype=torch.bfloat16, device="cuda:0", requires_grad=False):
    """Stands in for a CUDA tensor: selection reads only device, dtype, shape, requires_grad."""
    return SimpleNamespace(
        shape=torch.Size(shape),
        dtype=dtype,
        device=torch.device(device),
        requires_grad=requires_grad,
    )


def _mask(noop: bool = False, full: bool = True, block: int = 128, n: int = 4) -> BlockMask:
    """A causal block-diagonal BlockMask on CPU: diagonal blocks partial (or full)."""
    num = torch.ones(1, 1, n, dtype=torch.int32)
    idx = torch.arange(n, dtype=torch.int32)[:, None].expand(1, 1, n, n).contiguous()
    kwargs = {"BLOCK_SIZE": (block, block), "seq_lengths": (n * block, n * block)}
    if not noop:
        kwargs["mask_mod"] = lambda b, h, q, kv: q >= kv
    if full:
        return BlockMask.from_kv_blocks(num, idx, torch.zeros_like(num), idx, **kwargs)
    return BlockMask.from_kv_blocks(num, idx, **kwargs)


@pytest.fixture(autouse=True)
def no_static_flash_mods(monkeypatch):
    """Each test starts with no mods recorded as refused by FLASH's dynamic compile."""
    monkeypatch.setattr(fb, "_static_flash_mods", set())


@pytest.fixture
def hopper(monkeypatch):
    """An sm90 GPU with FA4 importable, torch 2.11, no environment override."""
    monkeypatch.setattr(fb, "_device_probe", lambda index: (9, 0, ""))
    monkeypatch.setattr(fb, "_torch_version", lambda: (2, 11))


def test_auto_picks_flash_where_it_can_run(hopper):
    assert fb.resolve_flex_backend(_fake(), SampleConfig()) == "flash"
    assert fb.kernel_options(_fake(), SampleConfig(), block_mask=_mask()) == FLASH
    assert fb.kernel_options(_fake(dtype=torch.float16), SampleConfig()) == FLASH


@pytest.mark.parametrize(
    "change, fake_kwargs, config_kwargs, message",
    [
        ({"probe": (8, 0, "")}, {}, {}, "compute capability 9.x"),
        ({"probe": (12, 0, "")}, {}, {}, "got 12.0"),
        (
            {"probe": (9, 0, "ModuleNotFoundError: No module named 'flash_attn'")},
            {},
            {},
            "No module named 'flash_attn'.*fa4",
        ),
        ({"probe": (10, 0, "")}, {}, {}, "multiple of 256"),
        ({"torch": (2, 9)}, {}, {}, ">= 2.10"),
        ({}, {"dtype": torch.float32}, {}, "float16 or bfloat16"),
        ({}, {"shape": (1, 8, 8192, 256)}, {}, "head dim in 8..128"),
        ({}, {"shape": (1, 8, 8192, 100)}, {}, "multiple of 8"),
        ({}, {"device": "cpu"}, {}, "CUDA"),
        ({}, {}, {"q_block": 64, "kv_block": 64}, r"\(128, 128\), got \(64, 64\)"),
        ({}, {}, {"q_block": 256}, r"got \(256, 128\)"),
    ],
)
def test_unsuitable_inputs_get_triton_and_forced_flash_names_why(
    hopper, monkeypatch, change, fake_kwargs, config_kwargs, message
):
    if "probe" in change:
        monkeypatch.setattr(fb, "_device_probe", lambda index: change["probe"])
    if "torch" in change:
        monkeypatch.setattr(fb, "_torch_version", lambda: change["torch"])
    q = _fake(**fake_kwargs)
    assert fb.resolve_flex_backend(q, SampleConfig(**config_kwargs)) == "triton"
    with pytest.raises(RuntimeError, match=f"flex_backend='flash' cannot run: .*{message}"):
        fb.resolve_flex_backend(q, SampleConfig(flex_backend="flash", **config_kwargs))


def test_blackwell_needs_q_blocks_of_256(hopper, monkeypatch):
    monkeypatch.setattr(fb, "_device_probe", lambda index: (10, 0, ""))
    assert fb.resolve_flex_backend(_fake(), SampleConfig(q_block=256)) == "flash"
    assert fb.resolve_flex_backend(_fake(), SampleConfig(q_block=256, kv_block=64)) == "triton"


def test_value_head_dim_is_checked(hopper):
    v = _fake(shape=(1, 8, 8192, 256))
    assert fb.resolve_flex_backend(_fake(), SampleConfig(), v=v) == "triton"
    assert fb.resolve_flex_backend(_fake(), SampleConfig(), v=_fake()) == "flash"


def test_mask_block_size_overrides_config(hopper):
    config = SampleConfig(q_block=64, kv_block=64)
    assert fb.resolve_flex_backend(_fake(), config, block_mask=_mask()) == "flash"
    assert fb.resolve_flex_backend(_fake(), SampleConfig(), block_mask=_mask(block=64)) == "triton"


def test_auto_keeps_triton_for_gradients_but_forcing_flash_tries(hopper):
    k = _fake(requires_grad=True)
    assert fb.resolve_flex_backend(_fake(), SampleConfig(), k=k) == "triton"
    with torch.no_grad():
        assert fb.resolve_flex_backend(_fake(), SampleConfig(), k=k) == "flash"
    assert fb.resolve_flex_backend(_fake(), SampleConfig(flex_backend="flash"), k=k) == "flash"


def test_noop_mask_mod_never_goes_to_flash_before_torch_2_14(hopper, monkeypatch):
    """torch 2.10-2.13 run a no-op-mask_mod BlockMask dense on FLASH, ignoring its lists."""
    noop = _mask(noop=True)
    assert fb.resolve_flex_backend(_fake(), SampleConfig(), block_mask=noop) == "triton"
    with pytest.raises(RuntimeError, match="no-op mask_mod"):
        fb.resolve_flex_backend(_fake(), SampleConfig(flex_backend="flash"), block_mask=noop)
    monkeypatch.setattr(fb, "_torch_version", lambda: (2, 14))
    assert fb.resolve_flex_backend(_fake(), SampleConfig(), block_mask=noop) == "flash"


def test_mask_without_full_blocks_gets_triton(hopper):
    partial_only = _mask(full=False)
    assert fb.resolve_flex_backend(_fake(), SampleConfig(), block_mask=partial_only) == "triton"
    with pytest.raises(RuntimeError, match="full-block lists"):
        fb.resolve_flex_backend(
            _fake(), SampleConfig(flex_backend="flash"), block_mask=partial_only
        )


def test_config_is_the_one_switch(hopper):
    assert fb.resolve_flex_backend(_fake(), SampleConfig(flex_backend="triton")) == "triton"
    assert fb.resolve_flex_backend(_fake(), SampleConfig(flex_backend="flash")) == "flash"
    assert fb.resolve_flex_backend(_fake(), SampleConfig()) == "flash"


def test_invalid_config_value_names_field_and_choices():
    with pytest.raises(ValueError, match=r"flex_backend='fa4' is not allowed: use one of"):
        SampleConfig(flex_backend="fa4")


@pytest.mark.parametrize(
    "blocks, expected",
    [((128, 128), None), ((256, 128), None), ((32, 64), (32, 64)), ((16, 16), (16, 16))],
)
def test_triton_tiles_divide_small_mask_blocks(hopper, blocks, expected):
    config = SampleConfig(q_block=blocks[0], kv_block=blocks[1], flex_backend="triton")
    options = fb.kernel_options(_fake(), config)
    if expected is None:
        assert options is None
    else:
        m, n = expected
        assert options == {
            "BLOCK_M": m,
            "BLOCK_N": n,
            "BLOCK_M1": m,
            "BLOCK_N1": n,
            "BLOCK_M2": m,
            "BLOCK_N2": n,
        }


def test_cpu_tensors_get_no_options_and_no_probe(monkeypatch):
    def probe(index):
        raise AssertionError("probed the GPU for a CPU tensor")

    monkeypatch.setattr(fb, "_device_probe", probe)
    assert fb.kernel_options(torch.zeros(1, 2, 16, 8), SampleConfig(flex_backend="flash")) is None


def test_sample_attention_hands_its_mask_to_the_backend_choice(monkeypatch):
    seen = {}

    def record(q, config, **kwargs):
        seen.update(kwargs, config=config)
        return None

    monkeypatch.setattr(flexsample.attention, "kernel_options", record)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    config = SampleConfig(min_seq_len=0, q_block=16, kv_block=16)
    sample_attention(q, k, v, config)
    assert seen["config"] is config and seen["k"] is k and seen["v"] is v
    assert isinstance(seen["block_mask"], BlockMask)


def test_fa4_site_processes_pth_files_and_makes_flash_importable(tmp_path, monkeypatch):
    """FLEXSAMPLE_FA4_SITE goes through site.addsitedir, so `.pth` files (the CuTe DSL's) run."""
    site_dir, extra = tmp_path / "site", tmp_path / "extra"
    (extra / "flash_attn" / "cute").mkdir(parents=True)
    for init in ("flash_attn/__init__.py", "flash_attn/cute/__init__.py"):
        (extra / init).write_text("")
    (extra / "flash_attn" / "cute" / "interface.py").write_text("")
    site_dir.mkdir()
    (site_dir / "fa4.pth").write_text(f"{extra}\n")  # only .pth processing finds flash_attn
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(fb, "_added_sites", set())
    monkeypatch.setenv("FLEXSAMPLE_FA4_SITE", str(site_dir))
    for name in [m for m in sys.modules if m.startswith("flash_attn")]:
        monkeypatch.delitem(sys.modules, name)
    fb.flash_import_error.cache_clear()
    try:
        assert fb.flash_import_error() is None
        assert str(extra) in sys.path
    finally:
        for name in [m for m in sys.modules if m.startswith("flash_attn")]:
            del sys.modules[name]
        fb.flash_import_error.cache_clear()


# ---------------------------------------------------------------- GPU: FLASH against Triton


def _flash_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    q = torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    return fb.flash_unavailable_reason(q, SampleConfig())


def _needs_flash():
    reason = _flash_reason()
    if reason is not None:
        pytest.skip(f"FLASH cannot run here: {reason}")


def _run(q, k, v, block_mask, options):
    return attention_with_mask(q, k, v, block_mask, enable_gqa=True, kernel_options=options)


GPU_CASES = {
    # name: (batch, q_heads, kv_heads, seq_len, config fields, dtype)
    "default": (1, 8, 8, 4096, {}, torch.bfloat16),
    "sparse": (1, 8, 8, 4096, {"alpha": 0.5}, torch.bfloat16),
    "dense_alpha1": (1, 8, 8, 4096, {"alpha": 1.0}, torch.bfloat16),
    "odd_length": (1, 8, 8, 4096 + 77, {}, torch.bfloat16),
    "gqa": (1, 8, 2, 4096, {}, torch.bfloat16),
    "batch2_gqa_odd": (2, 8, 2, 2048 + 33, {}, torch.bfloat16),
    "fp16": (1, 4, 4, 4096, {"alpha": 0.8}, torch.float16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_flash_equals_triton_on_flexsample_masks(case):
    _needs_flash()
    batch, q_heads, kv_heads, seq_len, fields, dtype = GPU_CASES[case]
    from flexsample.synthetic import structured_qkv

    x = structured_qkv(batch, q_heads, kv_heads, seq_len, 128, dtype=dtype, device="cuda")
    config = SampleConfig(min_seq_len=0, **fields)
    block_mask = sample_block_mask(x.q, x.k, config)
    if fields.get("alpha", 0.95) < 1.0:
        assert density(block_mask).max() < 0.9, "the mask should drop blocks"
    triton_options = fb.kernel_options(x.q, SampleConfig(flex_backend="triton"))
    flash_options = fb.kernel_options(
        x.q, SampleConfig(flex_backend="flash"), v=x.v, block_mask=block_mask
    )
    assert flash_options == FLASH
    triton = _run(x.q, x.k, x.v, block_mask, triton_options)
    flash = _run(x.q, x.k, x.v, block_mask, flash_options)
    mask = token_mask(block_mask)
    assert_output_close(flash, x.q, x.k, x.v, mask)
    assert_output_close(triton, x.q, x.k, x.v, mask)


@pytest.mark.gpu
def test_sample_attention_auto_uses_flash_and_matches_triton():
    _needs_flash()
    from flexsample.synthetic import structured_qkv

    x = structured_qkv(1, 8, 2, 8192, 128, dtype=torch.bfloat16, device="cuda")
    assert fb.resolve_flex_backend(x.q, SampleConfig(), k=x.k, v=x.v) == "flash"
    auto = sample_attention(x.q, x.k, x.v, SampleConfig(), enable_gqa=True)
    triton = sample_attention(x.q, x.k, x.v, SampleConfig(flex_backend="triton"), enable_gqa=True)
    torch.testing.assert_close(auto, triton, atol=3e-2, rtol=3e-2)


def _noop_sparse_mask(batch, heads, seq_len, block=128, seed=0):
    """A BlockMask whose mask_mod is a no-op but whose lists keep the diagonal, block 0 and a
    random half of the other causal blocks, all listed as full blocks."""
    n = seq_len // block
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, heads, n, n, generator=gen) < 0.5
    keep |= torch.eye(n, dtype=torch.bool)
    keep[..., 0] = True
    keep &= torch.ones(n, n, dtype=torch.bool).tril()
    keep = keep.cuda()
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    count = keep.sum(-1, dtype=torch.int32)
    mask = BlockMask.from_kv_blocks(
        torch.zeros_like(count),
        order,
        count,
        order,
        BLOCK_SIZE=(block, block),
        seq_lengths=(seq_len, seq_len),
    )
    tokens = keep.repeat_interleave(block, -2).repeat_interleave(block, -1)
    return mask, tokens


@pytest.mark.gpu
def test_noop_mask_mod_gives_the_sparse_answer_through_flexsample():
    """flexsample's choice for such a mask (Triton before torch 2.14) computes its lists."""
    _needs_flash()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    mask, tokens = _noop_sparse_mask(1, 4, 2048)
    options = fb.kernel_options(q, SampleConfig(), v=v, block_mask=mask)
    out = _run(q, k, v, mask, options)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=tokens)
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_flash_noop_mask_mod_bug_matches_the_version_gate():
    """FLASH itself on a no-op-mask_mod sparse mask: wrong (dense) exactly where flexsample's
    gate says so (torch < 2.14). Fails if torch fixes it elsewhere or 2.14 still has it."""
    _needs_flash()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    mask, tokens = _noop_sparse_mask(1, 4, 2048)
    out = _run(q, k, v, mask, FLASH)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=tokens)
    sparse_answer = torch.allclose(out.float(), reference, atol=3e-2, rtol=3e-2)
    assert sparse_answer == (fb._torch_version() >= (2, 14)), (torch.__version__, sparse_answer)


def _distinct_causal_mask_mods(count: int) -> list:
    """Causal mask_mods with distinct code objects: each compiles flex_attention again."""
    mods = []
    for i in range(count):
        namespace: dict = {}
        exec(f"def causal_{i}(b, h, q_idx, kv_idx):\n    return q_idx >= kv_idx", namespace)
        mods.append(namespace[f"causal_{i}"])
    return mods


def test_compiled_flex_never_falls_back_to_eager_past_its_recompile_limit(monkeypatch):
    """Past FLEX_RECOMPILE_LIMIT compiles, FLASH hands new masks to Triton (one warning) and
    Triton raises a clear error; dynamo never runs flex_attention eagerly (its S x S path).
    Dynamo's "eager" backend stands in for inductor on CPU; answers equal causal SDPA."""
    monkeypatch.setattr(fb, "FLEX_RECOMPILE_LIMIT", 2)

    def flash(q, k, v, **kwargs):  # FLASH's own code object, run by CPU flex
        return fb._flex_flash(q, k, v, **{**kwargs, "kernel_options": None})

    compiled = {
        "FLASH": torch.compile(flash, backend="eager", dynamic=False),
        "TRITON": torch.compile(fb._flex_triton, backend="eager", dynamic=True),
    }
    monkeypatch.setattr(fb, "_compiled_flex", compiled.__getitem__)
    fb._warn_flash_budget_spent.cache_clear()
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in "qkv")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    masks = [
        create_block_mask(mod, None, None, 128, 128, device="cpu")
        for mod in _distinct_causal_mask_mods(4)
    ]
    with pytest.warns(RuntimeWarning, match="new ones run on flex.s Triton kernel"):
        for mask in masks:
            out = fb.run_compiled_flex(q, k, v, block_mask=mask, kernel_options=FLASH)
            torch.testing.assert_close(out, want)
    with pytest.raises(RuntimeError, match="compiled 2 times in this process"):
        fb.run_compiled_flex(q, k, v, block_mask=masks[0], kernel_options=None)


def _offset_mod(offset: int):
    def offset_causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return offset_causal


def _refusing(refused_code, behaviour: dict, calls: list):
    """Stand-in for `_compiled_flex`: each key's function records its calls; "FLASH" refuses
    a mask_mod with `refused_code` as FLASH's lowering refuses captured numbers;
    `behaviour[key]` makes a key refuse everything ("refuse") or hit its compile limit
    ("limit"). Answers come from CPU flex; the LSE is 2 nats, reported in log2 units (x ln 2)
    by the FLASH keys, as torch without pytorch#181645 does."""

    def compiled(backend):
        def run(q, k, v, **kwargs):
            calls.append(backend)
            mask = kwargs.get("block_mask")
            act = behaviour.get(backend)
            if act == "refuse" or (
                backend == "FLASH" and mask is not None and mask.mask_mod.__code__ is refused_code
            ):
                raise RuntimeError(f"LoweringException: NYI: mask_mod {fb._STATIC_FLASH_REASON}")
            if act == "limit":
                raise FailOnRecompileLimitHit("fail_on_recompile_limit_hit")
            out = fb._flex_triton(q, k, v, **{**kwargs, "kernel_options": None, "return_aux": None})
            lse = torch.full(q.shape[:3], 2.0 * (1.0 if backend == "TRITON" else math.log(2)))
            return out, AuxOutput(lse=lse)

        return run

    return compiled


def test_flash_compiles_statically_only_for_mods_its_lowering_refuses(monkeypatch):
    """FLASH compiles with a dynamic length; where its lowering refuses a mask_mod capturing a
    Python number (`_STATIC_FLASH_REASON`), calls with that mask_mod's code (whatever number
    it holds) go to the static compile from then on, other mask_mods keep the dynamic one,
    Triton is never rerouted, both FLASH keys' LSE comes back in natural log and Triton's
    untouched, and any other error is raised."""
    calls: list = []
    monkeypatch.setattr(fb, "_compiled_flex", _refusing(_offset_mod(0).__code__, {}, calls))
    monkeypatch.setattr(fb, "flash_lse_unit", lambda index: math.log(2))
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in "qkv")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    refused = [
        create_block_mask(_offset_mod(offset), None, None, 256, 256, device="cpu")
        for offset in (0, 0, 64)
    ]
    masks = [(mask, FLASH) for mask in refused] + [(_mask(n=2), FLASH), (refused[0], None)]
    for mask, options in masks:
        out, aux = fb.run_compiled_flex(
            q, k, v, block_mask=mask, kernel_options=options, return_aux=AuxRequest(lse=True)
        )
        if mask.mask_mod.__code__ is refused[0].mask_mod.__code__ and options is FLASH:
            rows = torch.arange(256)
            want_mask = rows[:, None] + (64 if mask is refused[2] else 0) >= rows
            want_here = F.scaled_dot_product_attention(q, k, v, attn_mask=want_mask)
        else:
            want_here = want
        torch.testing.assert_close(out, want_here)
        torch.testing.assert_close(aux.lse, torch.full((1, 2, 256), 2.0))
    assert calls == ["FLASH", "FLASH_STATIC", "FLASH_STATIC", "FLASH_STATIC", "FLASH", "TRITON"]
    assert fb._static_flash_mods == {(refused[0].mask_mod.__code__, None)}

    def broken(backend):
        def run(q, k, v, **kwargs):
            raise RuntimeError("LoweringException: some other failure")

        return run

    monkeypatch.setattr(fb, "_compiled_flex", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        fb.run_compiled_flex(q, k, v, block_mask=_mask(n=2), kernel_options=FLASH)
    assert fb._static_flash_mods == {(refused[0].mask_mod.__code__, None)}


def test_static_flash_past_its_limit_goes_to_triton_and_a_second_refusal_is_raised(monkeypatch):
    calls: list = []
    behaviour = {"FLASH_STATIC": "limit"}
    monkeypatch.setattr(fb, "_compiled_flex", _refusing(_offset_mod(0).__code__, behaviour, calls))
    monkeypatch.setattr(fb, "flash_lse_unit", lambda index: 1.0)
    fb._warn_flash_budget_spent.cache_clear()
    q = torch.randn(1, 2, 256, 16)
    mask = create_block_mask(_offset_mod(0), None, None, 256, 256, device="cpu")
    with pytest.warns(RuntimeWarning, match="new ones run on flex's Triton kernel"):
        fb.run_compiled_flex(q, q, q, block_mask=mask, kernel_options=FLASH)
    assert calls == ["FLASH", "FLASH_STATIC", "TRITON"]
    calls.clear()
    behaviour["FLASH_STATIC"] = "refuse"  # cannot happen in torch; must not loop
    with pytest.raises(RuntimeError, match=fb._STATIC_FLASH_REASON):
        fb.run_compiled_flex(q, q, q, block_mask=mask, kernel_options=FLASH)
    assert calls == ["FLASH_STATIC"]
    fb._warn_flash_budget_spent.cache_clear()


def test_each_compiled_flex_has_its_own_code_and_flash_is_dynamic(monkeypatch):
    """FLASH and Triton compile with a dynamic length, the static fallback without; three
    code objects, so three compile budgets."""
    made = {}
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: made.setdefault(fn, dynamic))
    fb._compiled_flex.cache_clear()
    try:
        for key in ("TRITON", "FLASH", "FLASH_STATIC"):
            fb._compiled_flex(key)
    finally:
        fb._compiled_flex.cache_clear()
    assert made == {fb._flex_triton: True, fb._flex_flash: True, fb._flex_flash_static: False}
    assert len({fn.__code__ for fn in made}) == 3


def _window_mod(width: int):
    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < width)

    return window


@pytest.mark.gpu
def test_flash_runs_mask_mods_capturing_python_numbers_at_every_length():
    """A mask_mod capturing a Python int (a sliding window's width), on FLASH at two lengths
    and widths: whether the lowering takes it dynamically or run_compiled_flex compiles it
    statically, the answer is the windowed attention."""
    _needs_flash()
    for seq_len, width in ((1024, 256), (2048 + 128, 384)):
        torch.manual_seed(seq_len)
        q, k, v = (
            torch.randn(1, 4, seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in "qkv"
        )
        mask = create_block_mask(_window_mod(width), None, None, seq_len, seq_len, device="cuda")
        out = fb.run_compiled_flex(q, k, v, block_mask=mask, kernel_options=FLASH)
        rows = torch.arange(seq_len, device="cuda")
        gap = rows[:, None] - rows[None, :]
        assert_output_close(out, q, k, v, ((gap >= 0) & (gap < width))[None, None])


def test_auto_keeps_triton_in_traced_code(hopper, monkeypatch):
    """Inside a user's torch.compile the probe would break the graph: auto keeps Triton."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fb.resolve_flex_backend(_fake(), SampleConfig()) == "triton"
    assert fb.resolve_flex_backend(_fake(), SampleConfig(flex_backend="flash")) == "flash"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash"])
def test_one_compiled_flex_serves_every_length_and_caller(backend):
    """The op's compiled flex_attention compiles once per caller-independent key: calls from
    eager code and from a compiled graph (whose dispatch key sets differ) share it, and so do
    all lengths, on either backend. Each answer matches the Triton backend on the same mask
    (the tail split included: within bf16 rounding of it)."""
    if backend == "flash":
        _needs_flash()
    from flexsample.op import config_to_str

    config = config_to_str(SampleConfig(min_seq_len=0, flex_backend=backend))
    op = torch.ops.flexsample.sample_attention
    torch._dynamo.reset()
    fb._compiled_flex.cache_clear()

    def graph(q, k, v):
        return op(q, k, v, None, None, True, config, "test") + 0

    compiled = torch.compile(graph, dynamic=True)
    stats = torch._dynamo.utils.counters["stats"]
    new_graphs = []
    for seq_len in (4096, 8192 + 128, 12288 + 77):
        torch.manual_seed(seq_len)
        q = torch.randn(1, 8, seq_len, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 2, seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        triton = sample_attention(
            q, k, v, SampleConfig(min_seq_len=0, flex_backend="triton"), enable_gqa=True
        )
        before = stats["unique_graphs"]
        eager = op(q, k, v, None, None, True, config, "test")
        first, second = compiled(q, k, v), compiled(q, k, v)
        new_graphs.append(stats["unique_graphs"] - before)
        torch.testing.assert_close(first, eager, atol=0, rtol=0)
        torch.testing.assert_close(second, eager, atol=0, rtol=0)
        torch.testing.assert_close(eager, triton, atol=3e-2, rtol=3e-2)
    # The first length compiles the outer graph and the flex calls (the op replays at these
    # lengths, where the dense tail runs split, tail.py: the mask's call with its LSE and the
    # tail's key parts); later lengths compile nothing.
    assert new_graphs[1:] == [0, 0], new_graphs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["TRITON", "FLASH"])
def test_run_compiled_flex_reports_natural_log_lse(backend):
    """The tail split merges LSEs from both backends; torch 2.11's wrapper reported FLASH's
    LSE times ln 2 (pytorch#181645), which `run_compiled_flex` undoes."""
    if backend == "FLASH":
        _needs_flash()
    elif not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch.nn.attention.flex_attention import AuxRequest

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, 4, 384, 64, generator=gen, device="cuda").bfloat16() for _ in range(3)
    )
    out, aux = fb.run_compiled_flex(
        q, k, v, kernel_options={"BACKEND": backend}, return_aux=AuxRequest(lse=True)
    )
    logits = q.float() @ k.float().transpose(-1, -2) / 8
    torch.testing.assert_close(aux.lse.float(), logits.logsumexp(-1), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(
        out.float(), torch.softmax(logits, -1) @ v.float(), atol=2e-2, rtol=2e-2
    )


def test_a_call_without_a_mask_gets_the_dense_block_mask_built_eagerly(monkeypatch):
    """flex builds its one-block mask with vmap, which dynamo failed to trace with a symbolic
    batch (the dense tail's key parts on FLASH, dynamic=True): run_compiled_flex hands the
    compiled function that mask, made once per device outside it."""
    seen = []
    monkeypatch.setattr(fb, "_compiled_flex", lambda backend: lambda q, k, v, **kw: seen.append(kw))
    q = torch.zeros(2, 2, 8, 4)
    fb.run_compiled_flex(q, q, q, scale=0.5)
    mask = seen[0]["block_mask"]
    assert mask is fb.dense_block_mask(q.device) and seen[0]["scale"] == 0.5
    assert mask.BLOCK_SIZE == (1 << 30, 1 << 30) and mask.kv_num_blocks.tolist() == [[[1]]]
    # No transposed lists: their vmap fails under the op's dispatch guard (the LSE probe's
    # first call runs inside the op's warm-up).
    assert mask.q_num_blocks is None
    own = torch.zeros(1, 1, 1, dtype=torch.int32)
    given = BlockMask.from_kv_blocks(own + 1, own[..., None], BLOCK_SIZE=128)
    fb.run_compiled_flex(q, q, q, block_mask=given)
    assert seen[1]["block_mask"] is given


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["TRITON", "FLASH"])
def test_unmasked_calls_with_a_batch_run_at_every_length(backend):
    """The dense tail's rectangle: no block_mask, a batch of key parts, two lengths, with the
    LSE: dense attention on either backend."""
    if backend == "FLASH":
        _needs_flash()
    elif not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch.nn.attention.flex_attention import AuxRequest

    for batch, seq_len in ((3, 1024), (5, 2048 + 128)):
        gen = torch.Generator(device="cuda").manual_seed(seq_len)
        q, k, v = (
            torch.randn(batch, 6, seq_len, 128, generator=gen, device="cuda").bfloat16()
            for _ in range(3)
        )
        out, aux = fb.run_compiled_flex(
            q, k, v, kernel_options={"BACKEND": backend}, return_aux=AuxRequest(lse=True)
        )
        logits = q.float() @ k.float().transpose(-1, -2) / math.sqrt(128)
        torch.testing.assert_close(aux.lse.float(), logits.logsumexp(-1), atol=2e-2, rtol=1e-2)
        assert_output_close(
            out, q, k, v, torch.ones(seq_len, seq_len, dtype=torch.bool, device="cuda")
        )


def test_the_dense_mask_is_not_kept_from_inside_a_capture(monkeypatch):
    """Asked for first inside a CUDA-graph capture, the mask is built for that capture only (its
    tensors belong to the graph's pool); outside, one per device is kept."""
    built = []
    monkeypatch.setattr(
        fb, "_build_dense_block_mask", lambda device: built.append(device) or object()
    )
    fb._kept_dense_block_mask.cache_clear()
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert fb.dense_block_mask(cuda) is not fb.dense_block_mask(cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert fb.dense_block_mask(cuda) is fb.dense_block_mask(cuda)
    assert len(built) == 3
    fb._kept_dense_block_mask.cache_clear()
