"""The `flexsample` torch.compile backend: rewrite SDPA calls, then compile with inductor."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexsample.compile.rewrite import rewrite_sdpa
from flexsample.config import SampleConfig, as_config


def backend(config: SampleConfig | None = None) -> Callable:
    """A torch.compile backend using `config`: `torch.compile(model, backend=backend(cfg))`."""
    config = as_config(config)

    def flexsample(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        rewrite_sdpa(gm, config)
        return compile_fx(gm, example_inputs)

    return flexsample


#: The default-config backend, registered as "flexsample" (entry point torch_dynamo_backends).
flexsample_backend = backend()
