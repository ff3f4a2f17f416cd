"""Train a small Llama-architecture model to retrieve a key's value from a long haystack.

The task is `bench.retrieval`'s grammar: up to `--max-needles` needles ("the pass key of
<key>: <value> .") at random sentence boundaries of filler text, then every key asked at the
end; the loss is on the questions and answers. Answering needs attention from the end of the
context to the needle wherever it is (an induction head: find the earlier "<key>:", copy
the word after it), the pattern needle-in-a-haystack tests. Lengths grow over the run (a
curriculum: nearly filler-free sequences teach the circuit in cheap steps, long ones make it
sharp enough for 16K). Then it saves the model (`save_pretrained`) with its tokenizer and
evaluates dense retrieval accuracy by length and depth on single-needle prompts
(`bench.retrieval.niah_prompt`, the prompts `bench/niah.py` uses), written to
bench/results/<name>.{md,json} with the training log.

GPU: `python -m bench.train_retrieval --out /tmp/retrieval` (8.5 min of training).
CPU smoke run: `python -m bench.train_retrieval --cpu-smoke --out /tmp/retrieval-tiny`.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bench.harness import RESULTS, progress, write_results
from bench.retrieval import VALUES, build_tokenizer, niah_prompt, training_example

EVAL_COLUMNS = ["S", "depth", "samples", "accuracy"]
LOG_COLUMNS = ["step", "S", "seconds", "loss", "answer accuracy"]
#: A stage (all but the last) ends once two checks in a row answer this share of the
#: training batch's questions: 4x longer contexts then start from a working copy circuit.
ADVANCE = 0.95
CHECK_EVERY = 25


def model_config(vocab_size: int, max_len: int, *, tiny: bool):
    """Llama architecture (RoPE, GQA 2:1, SwiGLU); `tiny` for CPU tests."""
    from transformers import LlamaConfig

    width = (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=3,
        )
        if tiny
        else dict(
            hidden_size=512,
            intermediate_size=1536,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_hidden_layers=4,
        )
    )
    return LlamaConfig(
        vocab_size=-(-vocab_size // 64) * 64,
        max_position_embeddings=max_len,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **width,
    )


def curriculum(max_len: int) -> list[tuple[int, float]]:
    """(sequence length, share of the training time) from 32 tokens up to `max_len`.

    The copy circuit forms only after ~1.5K steps, and only where there is little filler:
    on CPU a 2-layer d128 model (AdamW 1e-3, batch 32) answered all questions at 32 tokens
    by step 1600, while tiny models started at 64-256 tokens answered none within 600-1100
    steps. So the run starts nearly filler-free, where steps are cheap, then grows 4x a stage.
    A stage ends early once the model answers its questions (`ADVANCE`); its unused time goes
    to the later stages in proportion to their shares. The first stage's share is a cap, not
    a plan: on the H100 the circuit formed at step ~575 in one run and past step 1000 in the
    next, where a 10% share had already moved on without it (that model answered 77%:
    bench/results/train_retrieval_late_circuit.md)."""
    lengths = [n for n in (32, 128, 512, 2048, 8192) if n < max_len] + [max_len]
    shares = [0.25, 0.1, 0.1, 0.1, 0.15][: len(lengths) - 1]
    return list(zip(lengths, [*shares, 1.0 - sum(shares)], strict=True))


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor, value_ids: torch.Tensor) -> float:
    """Share of the batch's answers (labels that are values) predicted by the argmax."""
    target = labels[:, 1:]
    answers = torch.isin(target, value_ids)
    hits = (logits[:, :-1].argmax(-1) == target) & answers
    return (hits.sum() / answers.sum().clamp(min=1)).item()


def learning_rate(peak: float, step: int, elapsed: float, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then cosine in elapsed time (share of the time
    budget, 0..1) down to 10% of `peak`: a time-budgeted run ends at the schedule's end."""
    return (
        peak
        * min(1.0, (step + 1) / warmup)
        * (0.1 + 0.9 * math.cos(0.5 * math.pi * min(elapsed, 1.0)))
    )


def train_step(model, optimizer, ids: torch.Tensor, labels: torch.Tensor, lr: float):
    """One AdamW step on ids/labels `[B, S]` at learning rate `lr` (bf16 autocast on CUDA,
    gradient clipping at 1); returns the model output (loss, logits)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=ids.device.type == "cuda"):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def batch(rng, vocab, length: int, size: int, max_needles: int, device):
    most = max(1, min(max_needles, length // 64))  # 32-token sequences hold one needle
    examples = [
        training_example(rng, vocab, length, int(rng.integers(1, most + 1))) for _ in range(size)
    ]
    ids, labels = (torch.from_numpy(np.stack(x)).to(device) for x in zip(*examples, strict=True))
    return ids, labels


@torch.no_grad()
def evaluate(model, tokenizer, lengths, depths, samples: int, device, seed: int = 10_000):
    """Dense retrieval accuracy (greedy next token = the value) per (length, depth)."""
    model.eval()
    rows = []
    for length in lengths:
        for depth in depths:
            prompts = [niah_prompt(tokenizer, length, depth, seed + i) for i in range(samples)]
            hits = 0
            for start in range(0, samples, 4):
                chunk = prompts[start : start + 4]
                ids = torch.tensor([p for p, _ in chunk], device=device)
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
                predicted = tokenizer.batch_decode(logits.argmax(-1)[:, None])
                answers = [answer for _, answer in chunk]
                hits += sum(p.strip() == a for p, a in zip(predicted, answers, strict=True))
            rows.append(
                {"S": length, "depth": depth, "samples": samples, "accuracy": hits / samples}
            )
            progress(f"  eval S={length} depth={depth}: {hits}/{samples}")
    model.train()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for save_pretrained")
    parser.add_argument("--max-len", type=int, default=16384)
    parser.add_argument("--minutes", type=float, default=8.5, help="training time budget")
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--max-needles", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="train_retrieval")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, short run, CPU")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if args.cpu_smoke:
        args.max_len, args.tokens_per_step, args.max_needles = 512, 2048, 4
        args.eval_lengths, args.samples = [256, 512], 4
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    value_ids = torch.tensor([vocab[v] for v in VALUES], device=device)
    torch.manual_seed(args.seed)
    config = model_config(len(vocab), args.max_len, tiny=args.cpu_smoke)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    params = sum(p.numel() for p in model.parameters())
    progress(f"model: {params / 1e6:.1f}M parameters, {config.num_hidden_layers} layers")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95)
    )
    rng = np.random.default_rng(args.seed)
    budget_s = args.minutes * 60
    start = time.perf_counter()
    steps, log = 0, []
    stages = curriculum(args.max_len)
    for index, (length, share) in enumerate(stages):
        stage_start = time.perf_counter()
        remaining = budget_s - (stage_start - start)
        stage_end = stage_start + remaining * share / sum(s for _, s in stages[index:])
        last_stage = index == len(stages) - 1
        # Short stages need steps more than tokens: cap their batch.
        size = min(128, max(1, args.tokens_per_step // length))
        passed = 0
        while time.perf_counter() < stage_end and passed < 2:
            lr = learning_rate(args.lr, steps, (time.perf_counter() - start) / budget_s)
            ids, labels = batch(rng, vocab, length, size, args.max_needles, device)
            out = train_step(model, optimizer, ids, labels, lr)
            steps += 1
            if steps % CHECK_EVERY == 0:
                entry = {
                    "step": steps,
                    "S": length,
                    "seconds": time.perf_counter() - start,
                    "loss": out.loss.item(),
                    "answer accuracy": answer_accuracy(out.logits, labels, value_ids),
                }
                log.append(entry)
                passed = 0 if last_stage or entry["answer accuracy"] < ADVANCE else passed + 1
                progress(
                    f"step {steps} S={length} loss {entry['loss']:.3f} answers "
                    f"{entry['answer accuracy']:.3f} lr {lr:.2e} {entry['seconds']:.0f}s"
                )
    train_s = time.perf_counter() - start
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    progress(f"saved to {args.out} after {steps} steps, {train_s:.0f}s")
    rows = evaluate(model, tokenizer, args.eval_lengths, args.depths, args.samples, device)
    summary = []
    for length in args.eval_lengths:
        mine = [r for r in rows if r["S"] == length]
        summary.append(
            {
                "S": length,
                "depth": "all",
                "samples": sum(r["samples"] for r in mine),
                "accuracy": float(np.mean([r["accuracy"] for r in mine])),
            }
        )
    notes = [
        f"Model: LlamaForCausalLM {params / 1e6:.1f}M parameters: {config.num_hidden_layers} "
        f"layers, hidden {config.hidden_size}, Hq {config.num_attention_heads}, Hkv "
        f"{config.num_key_value_heads}, rope {config.rope_parameters}, vocab "
        f"{config.vocab_size} (word-level tokenizer of bench/retrieval.py), random init, seed "
        f"{args.seed}.",
        f"Training: {steps} steps in {train_s:.0f} s, curriculum "
        f"{[(n, round(x, 3)) for n, x in stages]} "
        f"(length, share of time; a stage ends early after two checks in a row at >= "
        f"{ADVANCE} answer accuracy), {args.tokens_per_step} tokens per step, "
        f"1..{args.max_needles} needles per sequence, AdamW lr {args.lr} (warm-up, cosine to "
        "10%), bf16 autocast on CUDA, loss on the questions and answers; 'answer accuracy' in "
        "the log is the argmax hit rate on the training batch's answers.",
        "Eval: single-needle prompts from bench.retrieval.niah_prompt (seeds 10000+), dense "
        "SDPA, greedy next token must equal the value.",
    ]
    tables = [
        ("Dense retrieval accuracy by length", EVAL_COLUMNS, summary),
        ("By length and depth", EVAL_COLUMNS, rows),
        ("Training log", LOG_COLUMNS, log),
    ]
    out_dir = RESULTS / "cpu" if args.cpu_smoke else RESULTS
    path = write_results(
        args.name, "Retrieval model: training and dense accuracy", tables, notes, out_dir
    )
    print(open(path).read())


if __name__ == "__main__":
    main()
