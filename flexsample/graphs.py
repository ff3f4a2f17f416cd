"""CUDA-graph replay of the op's sparse path for short prompts, where launching it costs more
than running it.

One call of the sparse path issues about ten kernels through Python (the estimate, the
selection, the BlockMask, compiled flex and FlashAttention-4's Python launcher): ~0.9 ms of
host time, against ~0.4 ms of device time for the real-text model's attention at 16K (H100,
bench/results/op_host_16k.md); the op's call, 1.4 ms (H200, op_graphs.md). Up to
`SampleConfig.graph_max_len` tokens per call the op replays a CUDA graph of the whole path
instead, 0.16 ms of host time: the path has no host sync (`sample_block_mask`), so one capture
holds it.

One graph per input signature (device, dtype, shapes, config, scale), captured at its first
call after one unreplayed warm-up run (which compiles the kernels: nothing may compile inside
a capture) and kept in a small LRU (`CACHE_SIZE`). A graph reads fixed buffers, so each call
copies q, k and v into the graph's contiguous inputs (the copies the op makes anyway of
transformers' transposed views) and the caller copies the output out. A first call costs the
warm-up, the capture and a device-wide sync (capture empties torch's cached memory), once per
signature: every layer of a prefill shares it. A signature whose capture fails is warned about
once and runs unreplayed from then on.

Replay happens only on the device's default stream: a capture of the caller's own (a model
compiled with `mode="reduce-overhead"`) captures the op's kernels into its graph instead, and
that mode's warm-up runs on a side stream with allocations routed to its own memory pool,
where a graph of ours would share blocks with the model's activations. The cache is guarded by
a lock; two streams replaying one signature at once would share its buffers, hence the
default-stream rule.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch

from flexsample import tail
from flexsample.attention import resolve_scale, sparse_attention
from flexsample.config import SampleConfig

logger = logging.getLogger("flexsample")

#: Graphs kept (least recently used dropped first). Each holds its static q, k, v and output
#: and the memory pool of its temporaries: 96-852 MiB from 16K to 32K tokens
#: (bench/results/op_graphs_splits.md, 'graph MiB').
CACHE_SIZE = 4


class Replay(NamedTuple):
    """A captured sparse path: replaying `graph` reads `inputs` (q, k, v, contiguous) and
    writes `output`."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    output: torch.Tensor


class GraphCache:
    """An LRU of captured paths by signature; `capture` builds one (None when it cannot:
    remembered apart, so a failed signature neither retries nor takes a slot)."""

    def __init__(self, capture: Callable[..., Replay | None], size: int = CACHE_SIZE) -> None:
        self.capture = capture
        self.size = size
        self.entries: collections.OrderedDict[tuple, Replay] = collections.OrderedDict()
        self.failed: set[tuple] = set()
        self.lock = threading.Lock()

    def get(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        config: SampleConfig,
        scale: float | None,
    ) -> Replay | None:
        """The replay for these inputs' signature, captured on a miss; None where its capture
        failed."""
        scale = resolve_scale(q, scale)
        key = (q.device, q.dtype, *(tuple(x.shape) for x in (q, k, v)), config, scale)
        with self.lock:
            if key in self.failed:
                return None
            if key not in self.entries:
                replay = self.capture(q, k, v, config, scale)
                if replay is None:
                    self.failed.add(key)
                    return None
                self.entries[key] = replay
                while len(self.entries) > self.size:
                    self.entries.popitem(last=False)
            self.entries.move_to_end(key)
            return self.entries[key]

    def clear(self) -> None:
        """Drop every graph (their memory returns to the caching allocator) and every
        remembered failure."""
        with self.lock:
            self.entries.clear()
            self.failed.clear()


def capture_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SampleConfig,
    scale: float,
) -> Replay | None:
    """Capture `sparse_attention` on contiguous copies of q `[B, Hq, S, D]`, k, v
    `[B, Hkv, S, D(v)]` after one warm-up run, on q's device; None (and a warning) where the
    warm-up or the capture fails (out of memory included: the unreplayed path needs less)."""
    with torch.cuda.device(q.device):
        side = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        try:
            inputs = tuple(x.contiguous().clone() for x in (q, k, v))
            side.wait_stream(torch.cuda.current_stream())
            # Warm-up and capture plan alike (compiles happen in the warm-up, not the capture).
            with tail.for_replay():
                with torch.cuda.stream(side):
                    sparse_attention(*inputs, config, scale=scale)
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    output = sparse_attention(*inputs, config, scale=scale)
        except Exception as error:  # noqa: BLE001 - any failure means: run this signature unreplayed
            logger.warning(
                "flexsample: could not capture the sparse path for q %s in a CUDA graph "
                "(%s: %s); these inputs run without one",
                tuple(q.shape),
                type(error).__name__,
                error,
            )
            return None
    return Replay(graph, inputs, output)


_cache = GraphCache(capture_sparse_attention)


def replay_applies(q: torch.Tensor, config: SampleConfig) -> bool:
    """Whether the op replays a graph for a sparse call with q `[B, Hq, S, D]`: CUDA, B * S at
    most `config.graph_max_len`, and q's device on its default stream (no capture, no
    allocation pool of someone else's in force)."""
    if not q.is_cuda or q.shape[0] * q.shape[2] > config.graph_max_len:
        return False
    with torch.cuda.device(q.device):
        default = torch.cuda.current_stream() == torch.cuda.default_stream()
        return default and not torch.cuda.is_current_stream_capturing()


def sparse_attention_into(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SampleConfig,
    scale: float | None,
) -> torch.Tensor:
    """`sparse_attention(q, k, v, config, scale=scale)` written into `out` `[B, Hq, S, Dv]` (any
    layout), by replaying this signature's graph (captured at its first call); unreplayed where
    it cannot be captured. Only where `replay_applies`."""
    replay = _cache.get(q, k, v, config, scale)
    if replay is None:
        contiguous = (x.contiguous() for x in (q, k, v))
        return out.copy_(sparse_attention(*contiguous, config, scale=scale))
    with torch.cuda.device(q.device):
        for static, x in zip(replay.inputs, (q, k, v), strict=True):
            static.copy_(x)
        replay.graph.replay()
        return out.copy_(replay.output)


def clear() -> None:
    """Drop every captured graph and its memory."""
    _cache.clear()
