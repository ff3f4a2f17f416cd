"""Synthetic long-range retrieval: its words, a word-level tokenizer, training data and NIAH
prompts, all generated from seeds (no downloads).

A haystack is filler sentences of made-up words. A needle is the sentence
"the pass key of <key>: <value> ." put between two sentences; the question
"what is the pass key of <key> ? the pass key of <key>:" must be answered with <value>.
One grammar serves both the retrieval model we train (`bench/train_retrieval.py`: several
needles, all asked at the end, loss on the questions and answers) and needle-in-a-haystack
prompts for any tokenizer (`bench/niah.py`: one needle at a given depth, length counted in
its tokens).
Keys and values are one word each, so with the word-level tokenizer every answer is one token.
"""

from __future__ import annotations

import itertools
import random

import numpy as np

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
_TWO = ["".join(p) for p in itertools.product(_SYLLABLES, repeat=2)]
_THREE = ["".join(p) for p in itertools.product(_SYLLABLES, repeat=3)]
#: Filler words (two syllables) and keys (three syllables): disjoint by construction.
FILLER = sorted(random.Random(1).sample(_TWO, 1024))
KEYS = sorted(random.Random(2).sample(_THREE, 512))
#: Values: four-digit numbers, so a general tokenizer's answer is a plain number.
VALUES = [str(n) for n in sorted(random.Random(3).sample(range(1000, 10000), 512))]
TEMPLATE = ["the", "pass", "key", "of", "is", ".", "what", "?"]
SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
SENTENCE_WORDS = (4, 12)
#: Share of training examples whose first question asks about a needle in the body's last
#: sentences. Without them the only value ~14 tokens before a question is the previous
#: question's answer, always wrong: a model trained so learned not to copy from there and
#: missed 10-25% of NIAH prompts at depth 1 (those with 0-2 filler words after the needle).
NEAR_END = 0.25


def labelled(key: str) -> str:
    """The key as it stands right before its value ("sukabe:"), one word and one token of
    the word-level tokenizer: answering is then copying the word that followed the same
    token earlier (an induction head), which a small model learns far sooner than matching
    a key two tokens back."""
    return key + ":"


def needle(key: str, value: str) -> list[str]:
    return ["the", "pass", "key", "of", labelled(key), value, "."]


def question(key: str) -> list[str]:
    """The question; the answer (the value) is the next word."""
    return [
        "what",
        "is",
        "the",
        "pass",
        "key",
        "of",
        key,
        "?",
        "the",
        "pass",
        "key",
        "of",
        labelled(key),
    ]


def filler_sentence(rng: random.Random) -> list[str]:
    return [rng.choice(FILLER) for _ in range(rng.randint(*SENTENCE_WORDS))] + ["."]


def build_tokenizer():
    """The word-level tokenizer of the grammar (a `PreTrainedTokenizerFast`; save it with
    `save_pretrained`). Whitespace-split words map one-to-one to ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL.values(), *TEMPLATE, *FILLER, *KEYS, *map(labelled, KEYS), *VALUES]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def _encode(tokenizer, pieces: list[list[str]]) -> list[list[int]]:
    texts = [" " + " ".join(words) for words in pieces]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def niah_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[list[int], str]:
    """One needle at `depth` (0 = start, 1 = just before the question) in a haystack of
    exactly `length` tokens of `tokenizer` (BOS first where it has one) -> (ids, answer)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is out of range: allowed [0, 1]")
    rng = random.Random(seed)
    key, value = rng.choice(KEYS), rng.choice(VALUES)
    needle_ids, question_ids = _encode(tokenizer, [needle(key, value), question(key)])
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    budget = length - len(bos) - len(needle_ids) - len(question_ids)
    if budget < 1:
        raise ValueError(f"length {length} is too short for the needle and the question")
    sentences: list[list[int]] = []
    total = 0
    while total < budget:
        batch = _encode(tokenizer, [filler_sentence(rng) for _ in range(256)])
        for ids in batch:
            if total >= budget:
                break
            sentences.append(ids)
            total += len(ids)
    # The needle goes at the sentence boundary nearest to `depth` of the (trimmed) filler.
    bounds = np.cumsum([0] + [len(s) for s in sentences])
    bounds = bounds[bounds <= budget]
    cut = int(bounds[np.abs(bounds - depth * budget).argmin()])
    filler = [t for s in sentences for t in s][:budget]
    ids = bos + filler[:cut] + needle_ids + filler[cut:] + question_ids
    return ids, value


def training_example(
    rng: np.random.Generator, vocab: dict[str, int], length: int, needles: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ids `[length]` and labels `[length]`: BOS, filler with `needles` needles (distinct
    keys) at random sentence boundaries, then every key asked in random order. In a share
    `NEAR_END` of the examples the key asked first has its needle within the last two
    sentences before the questions. Labels are -100 except on the questions and answers (the
    questions' second mention of the key is a short-range copy that helps the key-matching
    circuit form). Same grammar as `niah_prompt`, built in id space for speed."""
    keys = rng.choice(len(KEYS), needles, replace=False)
    values = rng.choice(len(VALUES), needles)
    pairs = [(KEYS[k], VALUES[v]) for k, v in zip(keys, values, strict=True)]
    order = rng.permutation(needles)
    near_end = rng.random() < NEAR_END
    if near_end:  # the last needle of the body is asked first
        order = np.concatenate([[needles - 1], order[order != needles - 1]])
    tail: list[int] = []
    for i in order:
        key, value = pairs[i]
        tail += [vocab[w] for w in question(key)]
        tail += [vocab[value], vocab["."]]
    needle_ids = [[vocab[w] for w in needle(*pair)] for pair in pairs]
    budget = length - 1 - len(tail) - sum(map(len, needle_ids))
    if budget < needles:
        raise ValueError(f"length {length} is too short for {needles} needles")
    filler_ids = np.array([vocab[w] for w in FILLER])
    words = filler_ids[rng.integers(0, len(filler_ids), budget)]
    gaps = rng.integers(SENTENCE_WORDS[0], SENTENCE_WORDS[1] + 1, budget // SENTENCE_WORDS[0] + 1)
    ends = np.cumsum(gaps + 1) - 1
    words[ends[ends < budget]] = vocab["."]
    bounds = np.concatenate([[0], ends[ends < budget] + 1])
    cuts = rng.choice(bounds, needles)
    if near_end:
        cuts[0] = rng.choice(np.append(bounds[-2:], budget))
    cuts = np.sort(cuts)
    pieces, start = [], 0
    for cut, ids in zip(cuts, needle_ids, strict=True):
        pieces += [words[start:cut], np.array(ids)]
        start = cut
    body = np.concatenate([[vocab["<bos>"]], *pieces, words[start:]])
    ids = np.concatenate([body, tail]).astype(np.int64)
    labels = np.full(length, -100, dtype=np.int64)
    labels[len(body) + 1 :] = ids[len(body) + 1 :]
    return ids, labels
