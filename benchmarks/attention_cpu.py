"""SDPA on CPU: flash vs math kernel, fp32 vs bf16, forward alone and forward+backward, at
data2vec token counts.

Why `nn/transformer.py` sends short bf16 sequences on CPU to the math kernel only when the
pass needs gradients: the flash kernel's bf16 backward is the slow part; its forward is fast.

    python benchmarks/attention_cpu.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(128, 6, 17, 32), (32, 6, 65, 32), (64, 6, 65, 32), (16, 12, 128, 64), (16, 12, 197, 64)]


def time_ms(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend, backward: bool, reps: int = 5
) -> float:
    """Median milliseconds of one SDPA call (and its backward when `backward`)."""
    times = []
    with sdpa_kernel(backend):
        for i in range(reps + 2):
            t0 = time.perf_counter()
            if backward:
                F.scaled_dot_product_attention(q, k, v).sum().backward()
            else:
                with torch.inference_mode():
                    F.scaled_dot_product_attention(q, k, v)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; median of 5 calls after 2 warm-up")
    print("| (B, H, T, d) | dtype | forward flash ms | forward math ms | fwd+bwd flash ms | fwd+bwd math ms |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        for dt in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(*shape, dtype=dt, requires_grad=True) for _ in range(3))
            cells = [
                time_ms(q, k, v, backend, backward)
                for backward in (False, True)
                for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
            ]
            print(f"| {shape} | {str(dt).removeprefix('torch.')} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
