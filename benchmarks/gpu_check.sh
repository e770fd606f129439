#!/usr/bin/env bash
# The checks to run whenever a GPU is at hand (issue 18): steps against the CPU in fp32 and bf16,
# train.compile, the SDPA kernel chosen, 2-process DDP on one device, extraction, speed against
# the transformers peer with MFU. One Markdown table on stdout and in OUT_DIR/gpu_check.md, plus
# OUT_DIR/gpu_check.json; exit status 1 when any row FAILs. Under 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Without CUDA, or with GPU_CHECK_DEVICE=cpu, the same sequence runs on the CPU in a reduced size
# (the CPU fallback, run in CI by tests/test_gpu_check.py). PYTHON picks the interpreter
# (default: python3 on PATH). Details: benchmarks/gpu_check.py.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" --out "$1" --device "${GPU_CHECK_DEVICE:-auto}"
