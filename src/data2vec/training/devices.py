"""Where and in which precision a run computes."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from data2vec.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`train.device`: "auto" is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether the device multiplies bf16 matrices in hardware: CUDA with bf16 support, or a CPU
    with AMX tiles or AVX512-BF16 (elsewhere oneDNN emulates bf16 products, far slower than fp32)."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """`train.precision` on this device: "auto" is bf16 where `native_bf16`, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device.type) else "fp32"
    return precision


def precision_warning(device: torch.device, precision: str) -> str | None:
    """A warning for bf16 asked for on a device that only emulates it."""
    if precision != "bf16" or native_bf16(device.type):
        return None
    return (
        f"warning: train.precision=bf16 on a {device.type} without bf16 matrix units (no AMX or AVX512-BF16): "
        "bf16 products are emulated and run many times slower than fp32 (benchmarks/precision.py); "
        "train.precision=auto picks fp32 here"
    )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (CPU with AMX, CUDA); fp32 is a no-op; "auto" as `resolve_precision`."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
