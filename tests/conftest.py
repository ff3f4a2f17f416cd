import os

import torch

# Triton kernels run in the interpreter where there is no GPU; set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" keeps the default run CPU-sized; "props" (nox -s props) runs many more examples.
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # poisoned buffers: one patch for all examples
    ],
)
settings.register_profile(
    "props",
    max_examples=300,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # poisoned buffers: one patch for all examples
    ],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def op_masks(monkeypatch):
    """Shapes of the masks that reach the flexsample op at run time, in call order (None: no
    mask); compiled code runs the op's real implementation, so this sees its real inputs."""
    from flexsample import op

    seen = []
    real = op.dense_reason

    def spy(q, k, config, attn_mask=None, reading=None):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        return real(q, k, config, attn_mask, reading)

    monkeypatch.setattr(op, "dense_reason", spy)
    return seen
