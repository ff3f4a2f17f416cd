"""Train a small long-context code model on the Python source of the installed packages.

The judge for real-text accuracy (`bench/realtext.py`): a transformers `LlamaForCausalLM`
(GQA, head dim 128, RoPE theta 5e5) trained from scratch on `bench.corpus`'s training split
with a byte-level BPE tokenizer (vocab 8K, trained here on a sample of that split), with a
length curriculum 2K -> 8K -> 16K (-> 32K with `--max-len 32768`) under a wall-clock budget.
Long documents of whole packages (many files of one code base in a row) reward attending far
back: names, signatures and idioms defined thousands of tokens earlier recur.

Writes the checkpoint (`save_pretrained`), the tokenizer (`AutoTokenizer.from_pretrained(out)`
loads it) and `corpus.json` (the corpus record, so the evaluation rebuilds the same held-out
split) to `--out`; the tokenized training split is cached there (`train_tokens.npy`) for a
re-run on the same corpus. Results: bench/results/train_realtext.{json,md}.

GPU (the reference size, ~57M parameters): `python -m bench.train_realtext --out DIR`
(defaults fit corpus + tokenizer + training in ~6.5 min on an H100).
CPU smoke run: `python -m bench.train_realtext --tiny --out /tmp/rt-tiny`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import time

import numpy as np
import torch

from bench.corpus import CorpusConfig, build_corpus
from bench.harness import RESULTS, progress, write_results
from bench.train_retrieval import learning_rate, train_step

EOS, PAD = "<|endoftext|>", "<|pad|>"
#: Model sizes: "base" is the reference judge; "tiny" runs in seconds on a CPU.
SIZES = {
    "base": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=128,
        num_hidden_layers=8,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        num_hidden_layers=4,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
    ),
}
LOG_COLUMNS = ["step", "S", "seconds", "tokens", "loss"]
STAGE_COLUMNS = ["S", "steps", "batch", "tokens", "seconds", "first loss", "last loss"]
PACKAGE_COLUMNS = ["package", "split", "version", "files", "bytes", "documents", "used_bytes"]


def train_tokenizer(texts: list[str], vocab_size: int = 8192, sample_bytes: int = 24_000_000):
    """Byte-level BPE on an evenly strided sample of `texts` (<= ~sample_bytes), wrapped as a
    `PreTrainedTokenizerFast` (EOS doubles as BOS; no cleanup of spaces, so decode(encode(x))
    == x for any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    total = sum(len(t) for t in texts)
    stride = max(1, math.ceil(total / sample_bytes))
    tok.train_from_iterator(texts[::stride], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (uint16 when the vocab fits), encoded in parallel by the Rust
    tokenizer (all cores), without special tokens."""
    backend = tokenizer.backend_tokenizer
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
    return [np.asarray(e.ids, dtype=dtype) for e in batch(texts, add_special_tokens=False)]


def token_stream(docs: list[np.ndarray], eos_id: int) -> np.ndarray:
    """Documents joined into one stream, EOS before each: `[N]`."""
    eos = np.asarray([eos_id], dtype=docs[0].dtype)
    return np.concatenate([part for doc in docs for part in (eos, doc)])


def prepare(
    out: pathlib.Path, corpus_config: CorpusConfig, vocab_size: int, tokenizer_bytes: int
) -> tuple[object, np.ndarray, dict, dict]:
    """Corpus plan, tokenizer and tokenized training stream, reusing `out`'s cache when the
    corpus hash and vocab size match. Returns (tokenizer, stream, corpus record, seconds)."""
    from transformers import AutoTokenizer

    times = {}
    start = time.perf_counter()
    corpus = build_corpus(corpus_config)
    record = corpus.record()
    key = hashlib.sha256(f"{record['file_list_sha256']}:{vocab_size}".encode()).hexdigest()
    cache = out / "train_tokens.npy"
    times["corpus plan s"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "cache_key.txt"
    if cache.exists() and meta.exists() and meta.read_text() == key:
        tokenizer = AutoTokenizer.from_pretrained(out)
        stream = np.load(cache)
        times["cached"] = 1.0
        return tokenizer, stream, record, {k: round(v, 1) for k, v in times.items()}
    start = time.perf_counter()
    texts = corpus.texts("train")
    times["read s"] = time.perf_counter() - start
    start = time.perf_counter()
    tokenizer = train_tokenizer(texts, vocab_size, tokenizer_bytes)
    times["tokenizer s"] = time.perf_counter() - start
    start = time.perf_counter()
    stream = token_stream(encode(tokenizer, texts), tokenizer.eos_token_id)
    times["tokenize s"] = time.perf_counter() - start
    record["train_tokens"] = int(len(stream))
    record["bytes_per_token"] = record["train_bytes"] / len(stream)
    tokenizer.save_pretrained(out)
    np.save(cache, stream)
    meta.write_text(key)
    (out / "corpus.json").write_text(json.dumps(record, indent=1))
    return tokenizer, stream, record, {k: round(v, 1) for k, v in times.items()}


def model_config(vocab_size: int, max_len: int, size: str = "base"):
    """LlamaConfig of `size` (`SIZES`), RoPE theta 5e5, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=-(-vocab_size // 64) * 64,
        max_position_embeddings=max_len,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
        **SIZES[size],
    )


def curriculum(max_len: int, start: int = 2048) -> list[tuple[int, float]]:
    """(sequence length, share of the training time): short sequences first (cheap steps to
    learn the language), then 4x longer stages up to `max_len`, which teach long context."""
    lengths = sorted(
        {min(n, max_len) for n in (start, 4 * start, 16384, 32768) if n <= max_len} | {max_len}
    )
    shares = {1: [1.0], 2: [0.5, 0.5], 3: [0.4, 0.3, 0.3], 4: [0.35, 0.25, 0.2, 0.2]}
    weights = shares.get(len(lengths), [1.0 / len(lengths)] * len(lengths))
    return list(zip(lengths, weights, strict=True))


def crops(rng: np.random.Generator, stream: np.ndarray, length: int, size: int, device):
    """`size` random windows of `length` tokens from the stream: `[size, length]` int64."""
    starts = rng.integers(0, len(stream) - length, size)
    ids = np.stack([stream[s : s + length] for s in starts]).astype(np.int64)
    return torch.from_numpy(ids).to(device)


def train(model, stream: np.ndarray, stages, args, device) -> tuple[list, list]:
    """The time-budgeted curriculum; returns (log rows, stage rows)."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95)
    )
    rng = np.random.default_rng(args.seed)
    budget_s = args.minutes * 60
    start = time.perf_counter()
    steps, tokens, log, stage_rows = 0, 0, [], []
    for index, (length, share) in enumerate(stages):
        length = min(length, len(stream) - 1)
        stage_start = time.perf_counter()
        remaining = budget_s - (stage_start - start)
        stage_end = stage_start + remaining * share / sum(s for _, s in stages[index:])
        size = max(1, args.tokens_per_step // length)
        losses, stage_steps, window = [], 0, []
        while time.perf_counter() < stage_end or stage_steps == 0:
            lr = learning_rate(
                args.lr, steps, (time.perf_counter() - start) / budget_s, warmup=args.warmup
            )
            ids = crops(rng, stream, length, size, device)
            loss = train_step(model, optimizer, ids, ids, lr).loss.item()
            losses.append(loss)
            window.append(loss)
            steps, stage_steps, tokens = steps + 1, stage_steps + 1, tokens + ids.numel()
            seconds = time.perf_counter() - start
            if steps % args.log_every == 0:
                log.append(
                    {
                        "step": steps,
                        "S": length,
                        "seconds": seconds,
                        "tokens": tokens,
                        "loss": float(np.mean(window)),
                    }
                )
                window = []
                progress(
                    f"step {steps} S={length} loss {log[-1]['loss']:.3f} lr {lr:.2e} "
                    f"{seconds:.0f}s {tokens / 1e6:.1f}M tokens"
                )
        tail = max(1, len(losses) // 10)
        stage_rows.append(
            {
                "S": length,
                "steps": stage_steps,
                "batch": size,
                "tokens": stage_steps * size * length,
                "seconds": time.perf_counter() - stage_start,
                "first loss": float(np.mean(losses[:tail])),
                "last loss": float(np.mean(losses[-tail:])),
            }
        )
    return log, stage_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags (shared with `bench.realtext --train`)."""
    parser.add_argument(
        "--out",
        default="bench/checkpoints/realtext",
        help="directory for the checkpoint, tokenizer and token cache",
    )
    parser.add_argument("--minutes", type=float, default=4.5, help="training time budget")
    parser.add_argument("--max-len", type=int, default=16384, help="last curriculum length")
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke run: tiny model, small corpus, short sequences",
    )
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument(
        "--tokenizer-mb", type=float, default=24.0, help="MB of training text the BPE is trained on"
    )
    parser.add_argument("--train-mb", type=float, default=160.0, help="training split cap")
    parser.add_argument(
        "--packages",
        nargs="+",
        default=None,
        help="restrict the corpus to these top-level packages",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--results-dir", default=None, help="default bench/results (bench/results/cpu with --tiny)"
    )


def corpus_config(args: argparse.Namespace) -> CorpusConfig:
    """The corpus caps these flags ask for (`--tiny` shrinks everything)."""
    only = tuple(args.packages) if args.packages else None
    if args.tiny:
        return CorpusConfig(
            doc_bytes=24_000,
            train_bytes=2_000_000,
            eval_bytes=400_000,
            package_bytes=1_000_000,
            min_eval_bytes=200_000,
            only=only,
        )
    return CorpusConfig(train_bytes=int(args.train_mb * 1e6), only=only)


def main(argv: list[str] | None = None) -> pathlib.Path:
    """Train and save; returns the checkpoint directory."""
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    if args.tiny:
        args.size, args.max_len, args.vocab = "tiny", min(args.max_len, 256), min(args.vocab, 512)
        args.tokens_per_step, args.tokenizer_mb = min(args.tokens_per_step, 1024), 0.5
        args.log_every = min(args.log_every, 5)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = pathlib.Path(args.out)
    wall = time.perf_counter()
    tokenizer, stream, record, prep = prepare(
        out, corpus_config(args), args.vocab, int(args.tokenizer_mb * 1e6)
    )
    progress(
        f"corpus: {record['train_documents']} train / {record['eval_documents']} eval "
        f"documents, {len(stream) / 1e6:.1f}M training tokens, eval packages "
        f"{record['eval_packages']}; {prep}"
    )
    torch.manual_seed(args.seed)
    config = model_config(len(tokenizer), args.max_len, args.size)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    params = sum(p.numel() for p in model.parameters())
    progress(f"model: {params / 1e6:.1f}M parameters on {device}")
    stages = curriculum(args.max_len, start=min(2048, args.max_len // 4 or 1))
    start = time.perf_counter()
    log, stage_rows = train(model, stream, stages, args, device)
    train_s = time.perf_counter() - start
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    total_s = time.perf_counter() - wall
    progress(
        f"saved to {out}: {sum(r['steps'] for r in stage_rows)} steps, {train_s:.0f}s "
        f"training, {total_s:.0f}s in all"
    )

    packages = [{"package": name, **info} for name, info in record["packages"].items()]
    notes = [
        f"Model: LlamaForCausalLM {params / 1e6:.1f}M parameters ({args.size}): "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, Hq "
        f"{config.num_attention_heads}, Hkv {config.num_key_value_heads}, head dim "
        f"{config.head_dim}, rope {config.rope_parameters}, vocab {config.vocab_size}, "
        f"random init, seed {args.seed}, SDPA attention.",
        f"Training: {sum(r['steps'] for r in stage_rows)} steps, "
        f"{sum(r['tokens'] for r in stage_rows) / 1e6:.1f}M tokens in {train_s:.0f} s (budget "
        f"{args.minutes} min), curriculum {stages} (length, share of time), "
        f"{args.tokens_per_step} tokens per step, AdamW lr {args.lr} (warm-up {args.warmup} "
        "steps, cosine in time to 10%), weight decay 0.1, bf16 autocast on CUDA; random "
        "windows of the EOS-joined training stream; 'loss' is the mean training loss (nats/"
        "token) of the steps since the previous log row.",
        f"Time: {total_s:.0f} s from start to saved checkpoint; preparation {prep}.",
        f"Tokenizer: byte-level BPE, vocab {len(tokenizer)}, trained on ~{args.tokenizer_mb} MB "
        f"of the training split; {record.get('bytes_per_token', float('nan')):.2f} bytes/token "
        "on the training split.",
        f"Corpus: {record['train_documents']} train documents ({record['train_bytes'] / 1e6:.1f}"
        f" MB, {len(stream) / 1e6:.1f}M tokens), {record['eval_documents']} eval documents "
        f"({record['eval_bytes'] / 1e6:.1f} MB) from held-out packages "
        f"{record['eval_packages']}; file list sha256 {record['file_list_sha256']}; caps "
        f"{record['config']}; roots {record['roots']}.",
        f"Checkpoint: {out} (not committed; rerun the command to reproduce).",
    ]
    tables = [
        ("Curriculum stages", STAGE_COLUMNS, stage_rows),
        ("Training log", LOG_COLUMNS, log),
        ("Corpus packages", PACKAGE_COLUMNS, packages),
    ]
    results = (
        pathlib.Path(args.results_dir)
        if args.results_dir
        else (RESULTS / "cpu" if args.tiny else RESULTS)
    )
    path = write_results("train_realtext", "Real-text judge: training", tables, notes, results)
    data = json.loads((results / "train_realtext.json").read_text())
    data.update(
        corpus=record, args=vars(args), seconds={"total": total_s, "train": train_s, **prep}
    )
    (results / "train_realtext.json").write_text(json.dumps(data, indent=1, default=str))
    progress(f"results: {path}")
    return out


if __name__ == "__main__":
    main()
