"""Named tolerances per dtype: (atol, rtol) for outputs compared with a float64 reference."""

import torch

OUTPUT_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
# Block scores are probabilities summed over rows: absolute error against the float64 oracle.
SCORE_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = list(OUTPUT_TOL)
