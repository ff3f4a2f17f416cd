#!/usr/bin/env bash
# Offline install of FlashAttention-4 (flex_attention's FLASH backend) from wheel folders.
#
#   bash bench/fa4_install.sh [--target DIR] WHEEL_DIR [WHEEL_DIR ...]
#
# Wheels that were split to fit a transfer limit (`split -b 50M X.whl X.whl.part-`) are joined
# again from their `X.whl.part-*` pieces, in name order, across all the folders; a SHA256SUMS
# file in any folder is checked. Installs with `pip --no-deps --no-index --target DIR` (default
# /tmp/fa4site): the machine's torch, numpy, cuda-bindings etc. stay as they are. The CuTe DSL
# finds its packages through a .pth file, which only `site.addsitedir` processes (PYTHONPATH
# does not), so point flexsample at DIR with FLEXSAMPLE_FA4_SITE=DIR.
set -euo pipefail

target=/tmp/fa4site
if [[ "${1:-}" == "--target" ]]; then
    target=$2
    shift 2
fi
if [[ $# -eq 0 ]]; then
    echo "usage: $0 [--target DIR] WHEEL_DIR [WHEEL_DIR ...]" >&2
    exit 2
fi
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for dir in "$@"; do
    cp "$dir"/*.whl "$work"/ 2>/dev/null || true
    cp "$dir"/*.whl.part-* "$work"/ 2>/dev/null || true
    [[ -f "$dir/SHA256SUMS" ]] && cp "$dir/SHA256SUMS" "$work/SHA256SUMS"
done
shopt -s nullglob
for first in "$work"/*.whl.part-aa; do
    wheel=${first%.part-aa}
    cat "$wheel".part-* > "$wheel"
    rm "$wheel".part-*
    echo "joined $(basename "$wheel")"
done
if [[ -f "$work/SHA256SUMS" ]]; then
    (cd "$work" && sha256sum --check --quiet SHA256SUMS)
    echo "checksums ok"
fi

"$python" -m pip install --no-deps --no-index --target "$target" "$work"/*.whl
echo
echo "FA4 installed into $target. Use it with:"
echo "  export FLEXSAMPLE_FA4_SITE=$target   # flexsample calls site.addsitedir on it"
echo "or, in Python before anything imports flash_attn:  import site; site.addsitedir('$target')"
echo

FLEXSAMPLE_FA4_SITE=$target "$python" - <<'EOF'
import os
import site

import torch

site.addsitedir(os.environ["FLEXSAMPLE_FA4_SITE"])
from flash_attn.cute.interface import _flash_attn_fwd  # noqa: F401  (what inductor's template imports)
from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
import cutlass.cute  # noqa: F401

print("import check ok: flash_attn.cute, cutlass.cute")
if torch.cuda.is_available():
    try:
        from flexsample import SampleConfig
        from flexsample.flex_backend import flash_unavailable_reason
    except ImportError:
        print("flexsample not importable here; skipped its check")
    else:
        q = torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
        reason = flash_unavailable_reason(q, SampleConfig())
        print("flexsample picks FLASH" if reason is None else f"flexsample keeps Triton: {reason}")
EOF
