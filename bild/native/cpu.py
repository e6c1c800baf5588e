"""What this CPU computes natively, and the dtype the native engine runs in by default."""

from __future__ import annotations

import warnings

import torch


def bf16_supported() -> bool:
    """Native bf16 dot products (AVX512-BF16, AMX or Arm BF16); elsewhere bf16 is emulated and slow."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return True  # no flags to read: trust oneDNN
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def fp16_supported() -> bool:
    """fbgemm's fp16-weight GEMM (x86 with AVX2 and F16C), what float16 weights run on."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def fastest_dtype() -> torch.dtype:
    """bf16 where the CPU computes it natively, else fp16 weights where fbgemm has them, else fp32."""
    if bf16_supported():
        return torch.bfloat16
    return torch.float16 if fp16_supported() else torch.float32


def resolve_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """None -> fastest_dtype(); a bf16 request on a CPU without it falls back to fp32.
    float16 means fp16 weights with fp32 activations (pack_fp16), never fp16 arithmetic."""
    if dtype is None:
        return fastest_dtype()
    if dtype == torch.bfloat16 and not bf16_supported():
        warnings.warn("this CPU has no native bf16; the native forward runs in float32")
        return torch.float32
    if dtype == torch.float16 and not fp16_supported():
        raise ValueError("float16 weights need fbgemm's fp16 GEMM (x86 CPUs); use float32 or bfloat16")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"native forward runs in float32, bfloat16 or float16 (weights only), not {dtype}")
    return dtype
