"""The TTFT benchmark's CPU smoke mode: a tiny model through the modes, rows and profile."""

import dataclasses
import json

import torch

from bench import ttft
from flexsample import SampleConfig

MODES = ["eager", "inductor", "no-attention", "flexsample ~10%", "door ~10%"]


def test_cpu_smoke_writes_a_row_per_length_and_mode_and_a_profile(tmp_path):
    argv = ["--cpu-smoke", "--out", str(tmp_path), "--name", "smoke", "--profile", "64"]
    path = ttft.main([*argv, "--modes", *MODES])
    assert path == tmp_path / "smoke.md"
    tables = {
        t["heading"]: t["rows"] for t in json.loads((tmp_path / "smoke.json").read_text())["tables"]
    }
    rows = {(r["S"], r["mode"]): r for r in tables["TTFT"]}
    assert set(rows) == {(s, m) for s in (64, 96) for m in MODES}
    for (length, mode), row in rows.items():
        assert row["prefill s"] > 0 and row["x vs eager SDPA"] > 0, row
        assert "share of limit" in row and "x vs fastest dense" in row
        if mode != "eager":
            # One compile serves both lengths: graphs at the first, none (no recompile) later.
            assert row["graphs compiled"] == (1 if length == 64 else 0), row
    # Both sparse doors ran sparse on every layer of every call (2 layers, 2 calls).
    assert rows[(96, "flexsample ~10%")]["paths"] == "sparse=4"
    assert rows[(96, "door ~10%")]["paths"] == "sparse=4"
    assert rows[(96, "flexsample ~10%")]["rewritten"] == 0  # no new graph at 96
    assert rows[(64, "flexsample ~10%")]["rewritten"] == 2
    parts = {(r["mode"], r["part"]) for r in tables["Profile: per part"]}
    assert ("eager", "SDPA (dense attention)") in parts
    assert ("door ~10%", "flexsample::sample_attention (rest)") in parts
    assert (
        len([r for r in tables["Profile: top 25 ops by device time"] if r["mode"] == "eager"]) <= 25
    )


def test_copy_v_attention_returns_v_on_the_query_heads():
    q, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    out, weights = ttft.copy_v_attention(None, q, v, v, None)
    assert weights is None and out.shape == (1, 5, 4, 8)
    torch.testing.assert_close(out[:, :, 1], v[:, 1 // 2])
    torch.testing.assert_close(out[:, :, 3], v[:, 1])


def test_no_attention_model_runs_copy_v():
    setup = ttft.smoke_setup()
    models = ttft.Models(setup, 64)
    fn, config = ttft.build("no-attention", models, "aot_eager")
    assert config is None and models.model.config._attn_implementation == ttft.COPY_V
    assert ttft.build("eager", models)[0].config._attn_implementation == "sdpa"


def test_mode_configs():
    base = SampleConfig()
    assert ttft.config_of("door default", base) == base
    assert ttft.config_of("door group", base) == dataclasses.replace(base, group_estimate=True)
    assert ttft.config_of("door default unreplayed", base).graph_max_len == 0
    assert ttft.config_of("door ~5% layers", base).alpha == 1.0
