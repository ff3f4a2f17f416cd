"""Structured attention inputs: q, k, v whose attention looks like a long-context LLM's.

Each head's logits are built from four parts, after the patterns reported by attention studies:
- an attention sink on token 0 (StreamingLLM, Xiao et al. 2023: most heads put large mass on
  the first token);
- local decay: a Gaussian bump in i - j whose width is a fraction of S (the diagonal band of
  MInference, Jiang et al. 2024, and the local window that SampleAttention sizes as a share
  of the sequence). It is a Fourier series with Gaussian weights on evenly spaced frequencies
  of period 2S, so it decays to ~0 with no revivals: random frequencies would add diagonal
  lines far from the band, a pattern that is not the one described here. Head dim D gives
  F = (3D/4 - 2)/2 frequencies, which fixes the narrowest clean band at 3S/(pi F) (4% of S at
  D 64, 1.7% at D 128); `local_fraction` may widen it;
- column stripes: a few keys at random positions that every later query attends to (the
  "vertical lines" of MInference and SampleAttention's column stripes);
- background noise, which spreads the remaining mass nearly uniformly.
Keys carry the structure (shared by the query heads of a GQA group); each query head scales
the parts by its kind: "local" heads (strong band), "stripe" heads (strong stripes, more of
them) and "diffuse" heads (weak structure, near-uniform mass), in turn. Seeded and
device-agnostic, so the same call gives the same tensors on CPU and GPU up to dtype rounding.
"""

from __future__ import annotations

import dataclasses
import math

import torch

# (sink, stripe, local) logit strengths and the stripe count per KV head, per head kind.
# Gaps of 10-16 logits over the background keep the heavy keys dominant at 32K-128K keys, as
# in trained LLMs whose sink and local logits sit far above the rest.
HEAD_KINDS = {
    "local": (14.0, 11.0, 16.0),
    "stripe": (12.0, 14.0, 10.0),
    "diffuse": (7.0, 7.0, 7.0),
}


@dataclasses.dataclass
class StructuredInputs:
    """q `[B, Hq, S, D]`, k/v `[B, Hkv, S, D]`, stripe key positions `[Hkv, n_stripes]`,
    and the kind of each query head."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    stripe_positions: torch.Tensor
    head_kinds: list[str]


def structured_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    seed: int = 0,
    n_stripes: int = 8,
    local_fraction: float | None = None,
    noise: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StructuredInputs:
    """Seeded structured inputs; with the default scale 1/sqrt(D), head h's logit of key j is
    `sink*[j=0] + stripe*[j is a stripe] + local*band(i-j) + noise`, strengths by kind."""
    if head_dim < 16:
        raise ValueError(f"head_dim {head_dim} is too small: structured inputs need >= 16")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} must be a multiple of kv_heads {kv_heads}")
    gen = torch.Generator().manual_seed(seed)
    noise_dims = head_dim // 4
    freqs = (head_dim - 2 - noise_dims) // 2
    kinds = [list(HEAD_KINDS)[h % len(HEAD_KINDS)] for h in range(q_heads)]
    strengths = torch.tensor([HEAD_KINDS[kind] for kind in kinds])  # [Hq, 3]

    pos = torch.arange(seq_len, dtype=torch.float64)
    omega = torch.arange(freqs, dtype=torch.float64) * math.pi / max(seq_len, 1)
    narrowest = 3.0 / (math.pi * max(freqs, 1))
    width = max(narrowest, local_fraction or 0.0) * seq_len
    weight = torch.exp(-0.5 * (omega * width) ** 2)
    weight = (weight / weight.sum()).sqrt()  # band(i) . band(j) = sum_f w_f cos(omega_f (i-j))
    phase = pos[:, None] * omega[None, :]
    band = (torch.cat([phase.cos() * weight, phase.sin() * weight], -1)).float()  # [S, 2F]

    stripe_positions = (
        torch.stack(
            [
                torch.randperm(seq_len - 1, generator=gen)[: min(n_stripes, seq_len - 1)] + 1
                for _ in range(kv_heads)
            ]
        )
        if seq_len > 1
        else torch.zeros(kv_heads, 0, dtype=torch.long)
    )
    k = torch.zeros(batch, kv_heads, seq_len, head_dim)
    k[..., 0, 0] = 1.0
    for h in range(kv_heads):
        k[:, h, stripe_positions[h], 1] = 1.0
    k[..., 2 : 2 + 2 * freqs] = band
    k[..., 2 + 2 * freqs :] = torch.randn(batch, kv_heads, seq_len, noise_dims, generator=gen)

    q = torch.zeros(batch, q_heads, seq_len, head_dim)
    q[..., 0] = strengths[:, 0, None]
    q[..., 1] = strengths[:, 1, None]
    q[..., 2 : 2 + 2 * freqs] = band * strengths[:, 2, None, None]
    q[..., 2 + 2 * freqs :] = (
        torch.randn(batch, q_heads, seq_len, noise_dims, generator=gen)
        * noise
        / math.sqrt(noise_dims)
    )
    q = q * math.sqrt(head_dim)  # cancels the default softmax scale
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype)

    return StructuredInputs(cast(q), cast(k), cast(v), stripe_positions, kinds)
