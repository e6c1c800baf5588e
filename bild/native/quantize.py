"""Quantisers for the GGUF K-quant types gguf.quants only reads (Q4_K, Q6_K), so that a weight with a trained delta
merged into it keeps its file's type: its kernel, its bytes per weight. The blocks are llama.cpp's layouts, which
gguf.quants.dequantize and bild/kernels read; the choice of scales is simpler than llama.cpp's search (a min/max
start and least-squares refits of each sub-block's scale and offset).

    quantize(w (N, K) float32, "Q4_K" | "Q6_K") -> (N, K / 256 * block bytes) uint8
"""

from __future__ import annotations

import numpy as np

BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}


def quantize(w: np.ndarray, kind: str) -> np.ndarray:
    if kind not in BLOCK_BYTES:
        raise ValueError(f"quantize makes {', '.join(BLOCK_BYTES)}, not {kind}")
    N, K = w.shape
    if K % 256:
        raise ValueError(f"{kind} rows are whole blocks of 256 values, not {K}")
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, 256)  # (B, 256): one super-block a row
    blocks = _q4_k(x) if kind == "Q4_K" else _q6_k(x)
    return blocks.reshape(N, K // 256 * BLOCK_BYTES[kind])


def _f16(v: np.ndarray) -> np.ndarray:
    """(B,) float -> (B, 2) bytes of fp16."""
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _q4_k(x: np.ndarray) -> np.ndarray:
    """w = d sc_j q - dmin m_j over 8 sub-blocks j of 32, q in 0..15, sc_j and m_j 6-bit."""
    sub = x.reshape(-1, 8, 32)  # (B, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)  # (B, 8): the offset is never positive
    scale, offset = (sub.max(-1) - lo) / 15, -lo
    for _ in range(2):  # least squares of sub ≈ scale q - offset for the q these give
        q = np.clip(np.rint((sub + offset[..., None]) / np.where(scale > 0, scale, 1)[..., None]), 0, 15)
        scale, offset = _fit(sub, q, scale, offset)
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)  # (B,)
    dmin = (offset.max(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)  # (B, 8)
    m = np.clip(np.rint(offset / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    step, off = (d[:, None] * sc)[..., None], (dmin[:, None] * m)[..., None]  # (B, 8, 1)
    q = np.clip(np.rint((sub + off) / np.where(step > 0, step, 1)), 0, 15).astype(np.uint8)  # (B, 8, 32)
    packed = np.empty((len(x), 12), np.uint8)  # llama.cpp's get_scale_min_k4, inverted
    packed[:, 0:4] = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    packed[:, 4:8] = m[:, :4] | (m[:, 4:] >> 4) << 6
    packed[:, 8:12] = (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4
    pairs = q.reshape(-1, 4, 2, 32)  # (B, chunk of 64, low | high half, 32)
    qs = (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(-1, 128)  # byte 32c + l: values 64c + l, 64c + 32 + l
    return np.concatenate([_f16(d), _f16(dmin), packed, qs], axis=1)


def _fit(sub, q, scale, offset):
    """Per sub-block, the least-squares scale s and offset o of sub ≈ s q - o (kept where q is constant)."""
    n = sub.shape[-1]
    sq, sx, sqq, sqx = q.sum(-1), sub.sum(-1), (q * q).sum(-1), (q * sub).sum(-1)
    det = n * sqq - sq * sq
    ok = det > 0
    s = np.where(ok, (n * sqx - sq * sx) / np.where(ok, det, 1), scale)
    o = np.where(ok, (s * sq - sx) / n, offset)
    good = ok & (s > 0) & (o >= 0)
    return np.where(good, s, scale), np.where(good, o, offset)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """w = d sc_j (q - 32) over 16 sub-blocks j of 16, q in 0..63, sc_j int8."""
    sub = x.reshape(-1, 16, 16)  # (B, 16, 16)
    at = np.abs(sub).argmax(-1)[..., None]
    peak = np.take_along_axis(sub, at, -1)[..., 0]  # (B, 16): the value of largest magnitude, signed
    scale = peak / -32  # that value lands on q = 0 (-32), as llama.cpp's make_qx_quants starts
    big = np.abs(scale).max(-1)  # (B,)
    d = (big / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), -128, 127).astype(np.int8)  # (B, 16)
    step = (d[:, None] * sc)[..., None]  # (B, 16, 1)
    q = (np.clip(np.rint(sub / np.where(step != 0, step, 1)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    # ggml's layout per half h of 128 values: ql[64h + l] = q(l) | q(l + 64) << 4, ql[64h + 32 + l] = q(l + 32) |
    # q(l + 96) << 4 (low 4 bits), qh[32h + l] = the high 2 bits of q(l), q(l + 32), q(l + 64), q(l + 96)
    ql = np.concatenate([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4, q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4], axis=2)
    qh = (q[:, :, 0] >> 4) | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6  # (B, 2, 32)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16(d)], axis=1)
