"""GGUF's own block kinds in bild/kernels (kquant.c): exact dequantisation against gguf's, fp32 and int8 products
on every ISA level this CPU runs, batch invariance, stacked weights, row gathers, the decoder stack on mixed kinds,
and (when the files are present) real Qwen2.5-Coder tensors."""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest
import torch

from bild import kernels

pytestmark = pytest.mark.skipif(kernels.unavailable() is not None, reason=f"{kernels.unavailable()}")
GGUF = {"gguf_q4_k": "Q4_K", "gguf_q6_k": "Q6_K", "gguf_q5_0": "Q5_0", "gguf_q8_0": "Q8_0"}
ISAS = kernels.supported_isas() if kernels.unavailable() is None else []


def random_blocks(kind: str, N: int, K: int, seed: int = 0) -> np.ndarray:
    """(N, row bytes) uint8: random bytes, with fp16 scales of normal size (no NaN or inf) where they lie."""
    rng = np.random.default_rng(seed)
    lay = kernels.LAYOUTS[kind]
    nb = K // lay.block_values
    raw = rng.integers(0, 256, size=(N, nb, lay.block_bytes), dtype=np.uint8)  # (N, nb, bytes)

    def fp16(scale):
        return (rng.standard_normal((N, nb)) * scale).astype(np.float16).view(np.uint8).reshape(N, nb, 2)
    if kind == "gguf_q6_k":
        raw[..., 208:210] = fp16(0.01)  # d at the end
    else:
        raw[..., 0:2] = fp16(0.01)
        if kind == "gguf_q4_k":
            raw[..., 2:4] = fp16(0.003)  # dmin
    return raw.reshape(N, -1)


def gguf_dequantise(raw: np.ndarray, kind: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants
    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[GGUF[kind]]).copy())


def weight(kind: str, N: int, K: int, seed: int = 0) -> kernels.BlockWeight:
    return kernels.from_gguf(random_blocks(kind, N, K, seed), GGUF[kind], (N, K))


def shape_for(kind: str) -> tuple[int, int]:
    return (37, 768) if kernels.LAYOUTS[kind].block_values == 256 else (37, 224)  # odd N; 3 and 7 blocks


@pytest.mark.parametrize("kind", GGUF)
def test_dequantise_is_gguf_bitwise(kind):
    N, K = shape_for(kind)
    raw = random_blocks(kind, N, K, seed=1)
    w = kernels.from_gguf(raw, GGUF[kind], (N, K))
    want = gguf_dequantise(raw, kind)  # (N, K)
    assert w.data.data_ptr() == torch.from_numpy(raw).data_ptr()  # zero-copy
    assert w.nbytes == raw.nbytes
    for isa in ISAS:
        got = kernels.embedding(w, torch.arange(N), isa=isa)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), isa  # bitwise, signs of zero too
    assert torch.equal(kernels.dequantise(w).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("kind", GGUF)
def test_the_fp32_kernel_uses_exactly_those_weights(kind):
    N, K = shape_for(kind)
    w = weight(kind, N, K, seed=2)
    cols = torch.tensor([0, 1, 31, 32, 100, K - 1])
    for isa in ISAS:
        picked = kernels.linear(torch.eye(K)[cols], w, isa=isa)  # (6, N): one-hot rows pick weight columns
        assert torch.equal(picked, kernels.dequantise(w)[:, cols].T), isa


@pytest.mark.parametrize("kind", GGUF)
def test_products_match_float64_and_are_bitwise_equal_on_every_isa(kind):
    torch.manual_seed(3)
    N, K = shape_for(kind)
    w = weight(kind, N, K, seed=3)
    dense = kernels.dequantise(w).double()  # (N, K)
    x = torch.randn(21, K)
    x[2, :32] = 0.0  # a zero block of x rounds to scale 0
    exact = x.double() @ dense.T  # (21, N)
    scale = x.double().abs() @ dense.abs().T  # (21, N): the float rounding bound's scale
    block = kernels.LAYOUTS[kind].block_values
    step = x.reshape(21, K // block, block).abs().amax(-1) / 127  # (21, nb): int8 step of x's blocks
    half_step = step.repeat_interleave(block, dim=1).double() / 2  # (21, K)
    bound = half_step @ dense.abs().T  # (21, N): the most rounding x can move an output
    fp32 = [kernels.linear(x, w, isa=isa) for isa in ISAS]
    int8 = [kernels.linear(x, kernels.with_int8(w), isa=isa) for isa in ISAS]
    for y in fp32:
        assert ((y.double() - exact).abs() <= 1e-5 * scale + 1e-30).all()
        assert torch.equal(y, fp32[0])
    for y in int8:
        assert ((y.double() - exact).abs() <= bound * 1.001 + 1e-5 * scale).all()
        assert (y.double() - exact).abs().max() > 1e-6 * exact.abs().max()  # it did round
        assert torch.equal(y, int8[0])


@pytest.mark.parametrize("kind", GGUF)
@pytest.mark.parametrize("int8", [False, True])
def test_every_row_count_is_batch_invariant(kind, int8):
    torch.manual_seed(4)
    N, K = shape_for(kind)
    w = weight(kind, N, K, seed=4)
    w = kernels.with_int8(w) if int8 else w
    x = torch.randn(40, K)  # more than two tiles of 16
    for isa in ISAS:
        full = kernels.linear(x, w, isa=isa)  # (40, N)
        alone = torch.cat([kernels.linear(x[t:t + 1], w, isa=isa) for t in range(40)])
        assert torch.equal(full, alone), isa
        for T in range(1, 17):
            assert torch.equal(kernels.linear(x[:T], w, isa=isa), full[:T]), (isa, T)
            assert torch.equal(kernels.linear(x[40 - T:], w, isa=isa), full[40 - T:]), (isa, T)


@pytest.mark.parametrize("int8", [False, True])
def test_many_rows_of_a_wide_input_cross_l2_chunks(int8):
    torch.manual_seed(5)
    w = weight("gguf_q4_k", 5, 8960, seed=5)  # the 1.5B's down projection width
    w = kernels.with_int8(w) if int8 else w
    x = torch.randn(50, 8960)  # several L2 chunks of rows
    y = kernels.linear(x, w)  # (50, 5)
    for t in (0, 13, 14, 15, 16, 31, 49):
        assert torch.equal(kernels.linear(x[t:t + 1], w), y[t:t + 1])


@pytest.mark.parametrize("kind", GGUF)
def test_int8_long_inputs_and_groups_of_rows_change_no_bit(kind):
    """Weight rows go in groups of 8 against register tiles of 8 rows of x, over a long K: every row count, alone
    or in tiles, and every ISA level give the same bits, within the int8 bound."""
    torch.manual_seed(10)
    K = 8960 if kernels.LAYOUTS[kind].block_values == 256 else 4864 + 32  # odd block count for Q5_0 / Q8_0
    w = kernels.with_int8(weight(kind, 19, K, seed=10))  # 19 rows: groups of 8 and a short one
    x = torch.randn(21, K)
    x[3, 64:96] = 0.0
    ys = [kernels.linear(x, w, isa=isa) for isa in ISAS]  # (21, 19)
    assert all(torch.equal(y, ys[0]) for y in ys)
    for T in (1, 2, 3, 7, 8, 9, 16):
        assert torch.equal(kernels.linear(x[:T], w), ys[0][:T]), T
        assert torch.equal(kernels.linear(x[21 - T:], w), ys[0][21 - T:]), T
    dense = kernels.dequantise(w).double()
    block = kernels.LAYOUTS[kind].block_values
    step = x.reshape(21, K // block, block).abs().amax(-1) / 127
    bound = (step.repeat_interleave(block, dim=1).double() / 2) @ dense.abs().T
    exact = x.double() @ dense.T
    assert ((ys[0].double() - exact).abs() <= bound * 1.001 + 1e-5 * (x.double().abs() @ dense.abs().T)).all()


def test_int8_extreme_q8_0_weights_and_activations_are_exact_integers():
    """Q8_0 weights of -128 and 127 against activations rounded to +-127: no int16 saturation on any ISA level;
    with x of one block scale, the output is d xd times the exact integer sum."""
    N, K = 9, 96
    raw = random_blocks("gguf_q8_0", N, K, seed=11).reshape(N, K // 32, 34)
    raw[..., 0:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)  # d = 1
    rng = np.random.default_rng(11)
    q = rng.choice(np.array([-128, 127, -127, 1], dtype=np.int8), size=(N, K // 32, 32))
    raw[..., 2:] = q.view(np.uint8)
    w = kernels.with_int8(kernels.from_gguf(raw.reshape(N, -1), "Q8_0", (N, K)))
    x = torch.from_numpy(rng.choice(np.array([-127.0, 127.0], dtype=np.float32), size=(3, K)))  # xd = 1, qx = x
    want = (x.double() @ torch.from_numpy(q.reshape(N, K).astype(np.float64)).T)  # exact integers
    for isa in ISAS:
        assert torch.equal(kernels.linear(x, w, isa=isa).double(), want), isa


def test_stacked_weights_are_their_parts_side_by_side():
    torch.manual_seed(6)
    q, k, v = weight("gguf_q4_k", 24, 512, 6), weight("gguf_q4_k", 8, 512, 7), weight("gguf_q6_k", 8, 512, 8)
    qkv = kernels.stack([q, k, v])
    assert qkv.shape == (40, 512) and qkv.kind == "gguf_q4_k+gguf_q6_k" and qkv.nbytes == q.nbytes + k.nbytes + v.nbytes
    assert kernels.stack([q, k]).kind == "gguf_q4_k"
    x = torch.randn(5, 512)
    for w in (qkv, kernels.with_int8(qkv)):
        parts = w.parts
        assert all(p.int8 == w.int8 for p in parts)
        assert torch.equal(kernels.linear(x, w), torch.cat([kernels.linear(x, p) for p in parts], dim=1))
    assert torch.equal(kernels.dequantise(qkv), torch.cat([kernels.dequantise(p) for p in (q, k, v)]))
    with pytest.raises(ValueError, match="input width"):
        kernels.stack([q, weight("gguf_q4_k", 8, 256)])
    with pytest.raises(ValueError, match="activations"):
        kernels.stack([q, kernels.with_int8(k)])


@pytest.mark.parametrize("kind", GGUF)
def test_embedding_gathers_exact_rows(kind):
    N, K = shape_for(kind)
    w = weight(kind, N, K, seed=9)
    ids = [5, 0, 36, 5]
    assert torch.equal(kernels.embedding(w, ids), kernels.dequantise(w)[ids])
    assert kernels.embedding(w, []).shape == (0, K)
    with pytest.raises(ValueError, match="0..36"):
        kernels.embedding(w, [37])
    with pytest.raises(ValueError, match="0..36"):
        kernels.embedding(w, [-1])


def test_embedding_of_bild_blocks():
    w = kernels.quantise(torch.randn(10, 64))
    assert torch.equal(kernels.embedding(w, [3, 1]), kernels.dequantise(w)[[3, 1]])


def test_from_gguf_checks_bytes_and_shapes():
    raw = random_blocks("gguf_q4_k", 4, 512)
    assert kernels.from_gguf(torch.from_numpy(raw), "gguf_q4_k", (4, 512)).kind == "gguf_q4_k"
    with pytest.raises(ValueError, match="1152 bytes"):
        kernels.from_gguf(raw[:, :-1].copy(), "Q4_K", (4, 512))
    with pytest.raises(ValueError, match="whole blocks of 256"):
        kernels.from_gguf(raw, "Q4_K", (4, 500))
    with pytest.raises(ValueError, match="uint8"):
        kernels.from_gguf(torch.from_numpy(raw).int(), "Q4_K", (4, 512))
    with pytest.raises(ValueError, match="not 'q8_0'"):  # bild's own layout is no GGUF type
        kernels.from_gguf(raw, "q8_0", (4, 512))
    with pytest.raises(ValueError, match="not 'Q3_K'"):
        kernels.from_gguf(raw, "Q3_K", (4, 512))
    w = kernels.from_gguf(raw, "Q4_K", (4, 512))
    broken = kernels.BlockWeight(w.kind, w.data[:, :1], (4, 512))
    with pytest.raises(ValueError, match="needs contiguous uint8 data"):
        kernels.linear(torch.randn(1, 512), broken)


def test_isa_choice_and_refusals(monkeypatch):
    assert kernels.isa() in kernels.ISAS and kernels.isa() == ISAS[-1]
    with pytest.raises(ValueError, match="unknown ISA"):
        kernels.isa("sse2")
    monkeypatch.setenv("BILD_ISA", "avx2")
    assert kernels.isa() == "avx2"
    assert kernels._library().kq_isa().decode() == "avx2"
    monkeypatch.setattr(kernels, "supported_isas", lambda: ["avx2"])  # a CPU without VNNI
    with pytest.raises(ValueError, match="cannot run the avx512vnni"):
        kernels.isa("avx512vnni")
    monkeypatch.setenv("BILD_ISA", "avxvnni")
    with pytest.raises(ValueError, match="cannot run the avxvnni"):
        kernels.linear(torch.randn(1, 256), weight("gguf_q4_k", 2, 256))


# ---- the decoder stack on GGUF kinds

DIMS = dict(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512)
MIXES = {  # per layer: q, k, v, o, gate, up, down
    "1.5B-like": ["gguf_q4_k", "gguf_q4_k", "gguf_q6_k", "gguf_q4_k", "gguf_q4_k", "gguf_q4_k", "gguf_q6_k"],
    "0.5B-like": ["gguf_q5_0", "gguf_q5_0", "gguf_q8_0", "gguf_q5_0", "gguf_q5_0", "gguf_q8_0", "gguf_q4_k"],
}


def random_layer(kinds: list[str], seed: int, int8: bool):
    c = DIMS
    q, kv, F, dim = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"], c["ffn_dim"], c["dim"]
    shapes = [(q, dim), (kv, dim), (kv, dim), (dim, q), (F, dim), (F, dim), (dim, F)]
    ws = [weight(kind, n, k, seed * 10 + i) for i, (kind, (n, k)) in enumerate(zip(kinds, shapes))]
    ws = [kernels.with_int8(w) if int8 else w for w in ws]
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(q + 2 * kv, generator=g) * 0.1
    norms = [1 + 0.1 * torch.randn(dim, generator=g) for _ in range(2)]
    products = [kernels.stack(ws[:3]), ws[3], kernels.stack(ws[4:6]), ws[6]]
    pointers = kernels.layer_pointers(products, [bias, None, None, None], *norms)
    return pointers, products, bias, norms


def rope_tables(S: int, D: int):
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).double() / D)  # (D/2,)
    ang = torch.arange(S).double()[:, None] * inv  # (S, D/2)
    cos = torch.cat([ang.cos(), ang.cos()], 1)  # (S, D)
    sin = torch.cat([-ang.sin(), ang.sin()], 1)  # rotate_half's sign folded in, as blocks.c takes it
    return cos.float().contiguous(), sin.float().contiguous()


def reference_forward(x, layers, cos, sin):
    """float64 Qwen2-style decoder layers from position 0 over x (T, dim), on the dequantised weights."""
    c = DIMS
    H, Hkv, D, F = c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn_dim"]
    x = x.double()
    T = x.shape[0]

    def norm(v, w):
        return w.double() * v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-6)

    def rope(v):  # (T, heads, D)
        h = D // 2
        rot = torch.cat([v[..., h:], v[..., :h]], -1)
        return v * cos[:T, None].double() + rot * sin[:T, None].double()
    for _, products, bias, norms in layers:
        wqkv, wo, w13, w2 = [kernels.dequantise(p).double() for p in products]
        qkv = norm(x, norms[0]) @ wqkv.T + bias.double()
        q = rope(qkv[:, :H * D].reshape(T, H, D))
        k = rope(qkv[:, H * D:(H + Hkv) * D].reshape(T, Hkv, D)).repeat_interleave(H // Hkv, 1)
        v = qkv[:, (H + Hkv) * D:].reshape(T, Hkv, D).repeat_interleave(H // Hkv, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)  # (H, T, T)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, H * D)
        x = x + y @ wo.T
        gu = norm(x, norms[1]) @ w13.T
        x = x + torch.nn.functional.silu(gu[:, :F]) * gu[:, F:] @ w2.T
    return x


def run_stack(x, layers, start, caches, cos, sin, isa=None):
    c = DIMS
    dims = kernels.Dims(c["dim"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn_dim"], caches[0][0].shape[2],
                        1e-6)
    out = x.clone()
    kernels.model_forward(out, start, dims, [p for p, *_ in layers], caches[0], caches[1], cos, sin, isa=isa)
    return out


def new_caches(n, S=32):
    c = DIMS
    return ([torch.zeros(1, c["n_kv_heads"], S, c["head_dim"]) for _ in range(n)],
            [torch.zeros(1, c["n_kv_heads"], S, c["head_dim"]) for _ in range(n)])


@pytest.mark.parametrize("int8", [False, True])
def test_decoder_stack_on_mixed_gguf_kinds(int8):
    torch.manual_seed(7)
    layers = [random_layer(MIXES["1.5B-like"], 1, int8), random_layer(MIXES["0.5B-like"], 2, int8)]
    assert all(p is not None and p.int8 == int(int8) for p, *_ in layers)
    cos, sin = rope_tables(32, DIMS["head_dim"])
    x = torch.randn(9, DIMS["dim"])
    want = reference_forward(x, layers, cos, sin)  # (9, dim)
    results = []
    for isa in ISAS:
        got = run_stack(x, layers, 0, new_caches(2), cos, sin, isa)
        results.append(got)
        tolerance = 0.05 if int8 else 1e-4
        assert (got.double() - want).abs().max() < tolerance * want.abs().max(), isa
        caches = new_caches(2)  # one-token steps give bitwise the same rows
        run_stack(x[:4], layers, 0, caches, cos, sin, isa)
        steps = torch.cat([run_stack(x[t:t + 1], layers, t, caches, cos, sin, isa) for t in range(4, 9)])
        assert torch.equal(steps, got[4:]), isa
    assert all(torch.equal(r, results[0]) for r in results)  # every ISA level: the same bits


def test_decoder_stack_refuses_mismatched_shapes():
    layers = [random_layer(MIXES["1.5B-like"], 1, False)]
    cos, sin = rope_tables(32, DIMS["head_dim"])
    c = dict(DIMS)
    caches = new_caches(1)
    wrong = kernels.Dims(c["dim"], c["n_heads"], c["n_kv_heads"], c["head_dim"], 1024, 32, 1e-6)
    with pytest.raises(ValueError, match="shapes"):
        kernels.model_forward(torch.randn(2, 256), 0, wrong, [layers[0][0]], *caches, cos, sin)
    right = kernels.Dims(c["dim"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn_dim"], 32, 1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.model_forward(torch.randn(2, 256), 31, right, [layers[0][0]], *caches, cos, sin)
    with pytest.raises(ValueError, match="float32"):
        kernels.model_forward(torch.randn(2, 128), 0, right, [layers[0][0]], *caches, cos, sin)
    with pytest.raises(ValueError, match="caches"):
        kernels.model_forward(torch.randn(2, 256), 0, right, [layers[0][0]], [torch.zeros(1, 2, 16, 64)],
                              caches[1], cos, sin)
    with pytest.raises(ValueError, match="rope"):
        kernels.model_forward(torch.randn(2, 256), 0, right, [layers[0][0]], *caches, cos[:1], sin[:1])


# ---- real tensors of Qwen2.5-Coder GGUF files, when present

def gguf_files() -> list[str]:
    root = os.environ.get("BILD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bild"))
    return sorted(p for p in glob.glob(os.path.join(root, "gguf", "*.gguf")) if "1.5B" in p or "0.5B" in p)


@pytest.mark.skipif(not gguf_files(), reason="no Qwen2.5-Coder GGUF files in $BILD_CACHE/gguf")
@pytest.mark.parametrize("path", gguf_files())
def test_real_tensors_dequantise_as_gguf_and_multiply_within_tolerance(path):
    from gguf import GGUFReader
    reader = GGUFReader(path)
    seen = set()
    torch.manual_seed(8)
    for kind_name in GGUF.values():
        tensors = sorted((t for t in reader.tensors if t.tensor_type.name == kind_name and len(t.shape) == 2),
                         key=lambda t: t.n_bytes)
        for t in tensors[:1] + tensors[-1:]:  # the smallest and the largest (the head or embedding)
            seen.add(kind_name)
            w = kernels.from_gguf_tensor(t)
            rows = min(64, w.shape[0])
            part = kernels.from_gguf(t.data[:rows], kind_name, (rows, w.shape[1]))  # (rows, K)
            want = gguf_dequantise(np.ascontiguousarray(t.data[:rows]), kernels.GGUF_KINDS[kind_name])
            assert torch.equal(kernels.dequantise(part).view(torch.int32), want.view(torch.int32)), t.name
            assert torch.equal(kernels.embedding(w, list(range(rows))), want), t.name
            x = torch.randn(3, w.shape[1])
            exact = x.double() @ want.double().T
            scale = x.double().abs() @ want.double().abs().T
            assert ((kernels.linear(x, part).double() - exact).abs() <= 1e-5 * scale).all(), t.name
            err = (kernels.linear(x, kernels.with_int8(part)).double() - exact).abs()
            assert (err <= 0.02 * scale).all(), t.name
    assert {"Q4_K", "Q6_K"} <= seen


@pytest.mark.parametrize("kind,bound", [("Q4_K", 0.09), ("Q6_K", 0.025)])
def test_k_quant_quantisers_make_blocks_gguf_and_the_kernels_read(kind, bound):
    """bild.native.quantize (for merged deltas): gguf dequantises its blocks to within the type's usual error of
    the input, quantising its own output again gives the same weights (on rows of normal values; a sub-block
    without negatives may move by a rounding step), and the kernels multiply with exactly those weights;
    refusals are clear."""
    from gguf import GGMLQuantizationType, quants

    from bild.native import quantize as Q
    w = np.random.default_rng(3).standard_normal((37, 768)).astype(np.float32) * 0.02
    w[5] = 0.0  # an all-zero row: zero scales, no NaN
    w[6, :256] = np.linspace(0.01, 0.02, 256)  # a sub-block without negatives
    raw = Q.quantize(w, kind)
    assert raw.shape == (37, 3 * Q.BLOCK_BYTES[kind]) and raw.dtype == np.uint8
    back = quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(w.shape)
    assert np.isfinite(back).all() and not back[5].any()
    assert np.abs(back - w).mean() < bound * np.abs(w).mean()
    again = quants.dequantize(Q.quantize(back, kind), GGMLQuantizationType[kind]).reshape(w.shape)
    normal = [r for r in range(37) if r != 6]
    assert np.array_equal(again[normal], back[normal]) and np.abs(again - back).max() < 1e-2 * np.abs(w).max()
    x = torch.randn(3, 768)
    got = kernels.linear(x, kernels.from_gguf(raw, kind, w.shape))  # fp32 activations: exact weights
    assert torch.allclose(got, x @ torch.from_numpy(back.copy()).T, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="whole blocks of 256"):
        Q.quantize(w[:, :100], kind)
    with pytest.raises(ValueError, match="not Q5_0"):
        Q.quantize(w, "Q5_0")
