"""The retrieval task generator, the training script and the NIAH harness, end to end on CPU."""

import json

import numpy as np
import pytest
import torch

from bench import niah, train_retrieval
from bench.retrieval import (
    KEYS,
    NEAR_END,
    SENTENCE_WORDS,
    VALUES,
    build_tokenizer,
    labelled,
    niah_prompt,
    training_example,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _needle_value(ids: list[int], key_id: int, tok) -> list[int]:
    """Values v of every needle '... of key: v .' in ids (key_id is the 'key:' token)."""
    dot = tok.convert_tokens_to_ids(".")
    return [ids[i + 1] for i in range(len(ids) - 2) if ids[i] == key_id and ids[i + 2] == dot]


@pytest.mark.parametrize("length", [200, 1000, 4097])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_prompt_is_exact_length_deterministic_and_answerable(tokenizer, length, depth):
    ids, answer = niah_prompt(tokenizer, length, depth, seed=3)
    assert len(ids) == length
    assert (ids, answer) == niah_prompt(tokenizer, length, depth, seed=3)
    assert niah_prompt(tokenizer, length, depth, seed=4) != (ids, answer)
    assert ids[0] == tokenizer.bos_token_id
    words = tokenizer.decode(ids).split()
    key = words[-1]
    assert key.removesuffix(":") in KEYS and answer in VALUES
    assert _needle_value(ids, tokenizer.convert_tokens_to_ids(key), tokenizer) == [
        tokenizer.convert_tokens_to_ids(answer)
    ]
    start = next(i for i in range(len(words)) if words[i : i + 4] == ["the", "pass", "key", "of"])
    budget = length - 1 - 7 - 13  # filler tokens: all but BOS, needle and question
    assert abs(start - 1 - depth * budget) <= 13  # the nearest sentence boundary


def test_niah_prompt_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        niah_prompt(tokenizer, 1000, 1.5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        niah_prompt(tokenizer, 20, 0.5, seed=0)


def test_training_example_answers_are_the_needles_values(tokenizer):
    vocab = tokenizer.get_vocab()
    ids, labels = training_example(np.random.default_rng(7), vocab, 2048, needles=6)
    again = training_example(np.random.default_rng(7), vocab, 2048, needles=6)
    assert np.array_equal(ids, again[0]) and np.array_equal(labels, again[1])
    assert ids.shape == labels.shape == (2048,)
    tail = np.nonzero(labels != -100)[0]
    assert np.array_equal(labels[tail], ids[tail]) and tail[-1] == 2047
    keys = set(tokenizer.convert_tokens_to_ids([labelled(k) for k in KEYS]))
    positions = [p for p in tail if ids[p - 1] in keys]
    assert len(positions) == 6
    for p in positions:
        key = ids[p - 1]  # "... of <key>:" then the answer
        assert _needle_value(list(ids[: positions[0] - 13]), key, tokenizer) == [labels[p]]
    # The fast id path is the tokenizer's encoding of the same words.
    text = tokenizer.decode(ids)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids.tolist()


def test_training_examples_put_some_needles_right_before_their_question(tokenizer):
    """NIAH at depth 1 asks about a needle a dozen tokens back; uniform positions alone
    almost never train that distance."""
    vocab = tokenizer.get_vocab()
    rng = np.random.default_rng(0)
    near, trials = 0, 300
    for _ in range(trials):
        ids, labels = training_example(rng, vocab, 2048, needles=4)
        first = np.nonzero(labels != -100)[0][0] - 1  # "what" starts the first question
        key = ids[first + 6]  # "what is the pass key of <key>"
        needle_key = tokenizer.convert_tokens_to_ids(
            labelled(tokenizer.convert_ids_to_tokens(int(key)))
        )
        where = [i for i in range(first) if ids[i] == needle_key]
        assert len(where) == 1
        near += first - where[0] <= 2 * (SENTENCE_WORDS[1] + 1) + 2
    assert abs(near / trials - NEAR_END) < 0.07


@pytest.mark.slow
def test_train_retrieval_saves_a_checkpoint_that_from_pretrained_loads(tmp_path):
    out = tmp_path / "ckpt"
    train_retrieval.main(["--cpu-smoke", "--minutes", "0.05", "--samples", "1", "--out", str(out)])
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama"
    ids, _ = niah_prompt(tok, 300, 0.5, seed=0)
    assert ids == niah_prompt(build_tokenizer(), 300, 0.5, seed=0)[0]
    assert model(input_ids=torch.tensor([ids])).logits.shape[:2] == (1, 300)


@pytest.mark.slow
def test_niah_runs_every_method_end_to_end(tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    config = train_retrieval.model_config(len(tokenizer), 1024, tiny=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    niah.main(
        [
            "--model",
            str(ckpt),
            "--lengths",
            "192",
            "320",
            "--depths",
            "0",
            "1",
            "--samples",
            "1",
            "--min-seq-len",
            "256",
            "--max-new-tokens",
            "2",
            "--out-dir",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "niah.json").read_text())
    cells = data["tables"][1]["rows"]
    assert len(cells) == 4 * 2 * 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the CI install has no matplotlib: the script says how to plot
        assert not (tmp_path / "niah.png").exists()
    else:
        assert (tmp_path / "niah.png").stat().st_size > 0
    for row in cells:
        assert 0.0 <= row["accuracy"] <= 1.0
        sparse = row["S"] >= 256
        if row["method"] in ("attn", "window-sink"):
            assert isinstance(row["density"], float) == sparse
            if sparse:
                assert 0.0 < row["density"] <= 1.0
        if row["method"] == "compile":
            assert row["rewritten"] > 0
            assert (row["sparse calls"] > 0) == sparse


def test_answer_of_takes_the_first_number():
    assert niah.answer_of(" 4821 . the") == "4821"
    assert niah.answer_of("the pass key") is None


def test_window_sink_baseline_keeps_padding_masks_dense():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from flexsample import SampleConfig

    config = SampleConfig(min_seq_len=0, q_block=16, kv_block=16)
    log = niah.DensityLog()
    forward = niah.window_sink_attention(config, log)
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    padded = torch.ones(64, 64, dtype=torch.bool).tril()[None, None].clone()
    padded[..., :3] = False  # three left-padded keys
    padded[..., :3, 0] = True  # padded rows keep one key, as transformers does
    out, _ = forward(module, q, k, v, padded)
    want, _ = sdpa_attention_forward(module, q, k, v, padded)
    assert torch.equal(out, want) and log.values == []
    causal = torch.ones(64, 64, dtype=torch.bool).tril()[None, None]
    forward(module, q, k, v, causal)
    assert len(log.values) == 1  # exactly causal: the sparse baseline ran
