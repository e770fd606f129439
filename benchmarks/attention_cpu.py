"""SDPA forward+backward on CPU: flash vs math kernel, fp32 vs bf16, at data2vec token counts.

Why `nn/transformer.py` routes short bf16 sequences on CPU to the math kernel.

    python benchmarks/attention_cpu.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(128, 6, 17, 32), (32, 6, 65, 32), (64, 6, 65, 32), (16, 12, 128, 64), (16, 12, 197, 64)]


def time_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend, reps: int = 5) -> float:
    with sdpa_kernel(backend):
        for i in range(reps + 3):
            if i == 3:
                t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v).sum().backward()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    print("| (B, H, T, d) | dtype | flash ms | math ms |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        for dt in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(*shape, dtype=dt, requires_grad=True) for _ in range(3))
            f = time_ms(q, k, v, SDPBackend.FLASH_ATTENTION)
            m = time_ms(q, k, v, SDPBackend.MATH)
            print(f"| {shape} | {str(dt).removeprefix('torch.')} | {f:.1f} | {m:.1f} |")


if __name__ == "__main__":
    main()
