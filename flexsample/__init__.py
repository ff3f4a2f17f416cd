"""flexsample: SampleAttention (arXiv 2406.15486) on PyTorch FlexAttention for fast prefill."""

from flexsample.attention import sample_attention, sample_block_mask
from flexsample.compile import backend
from flexsample.config import SampleConfig
from flexsample.paths import path_counts

__all__ = ["SampleConfig", "backend", "path_counts", "sample_attention", "sample_block_mask"]
__version__ = "0.1.0"
