"""The native CPU engine for LLaMA-family decoders (LLaMA, Mistral, Qwen2), gpt-fast style.

Weights live in plain tensors or GGUF blocks (fused QKV and gate/up projections), the KV cache is preallocated
(1, H_kv, S, D) per layer, and every forward writes at explicit positions start..start+T-1. Rolling back is
`length = n`: stale entries past the valid prefix are never read, and the next write overwrites them.

    runner = NativeRunner.from_hf(hf_model, dtype=torch.bfloat16)   # or torch.float32 for exactness
    runner = NativeRunner.from_hf(hf_model, dtype=torch.float16)    # fp16 weights, fp32 activations (x86 fbgemm)
    runner = NativeRunner.from_hf(gguf_q4_model, dtype=torch.float32)  # fp32 on GGUF Q4_1/Q8_0 blocks, read exactly
    little = runner.early_exit(2)                                   # shares weights, own cache

Files: `model` (configuration, layers, weights, KV cache), `convert` (from Hugging Face models), `pack` (weights
in the form the kernels take), `forward`, `runner` (the decoding loop's interface), `batch` (batched greedy
decoding for teacher data), `cpu` (what this CPU computes natively).
"""

from .batch import GreedyBatch, greedy_batch
from .convert import config_supported, context_length, from_hf, hf_config, hf_layer, supports
from .cpu import bf16_supported, fastest_dtype, fp16_supported, resolve_dtype
from . import gguf
from .forward import (apply_rope, blocks, decoder_layer, final_norm, forward, head_logits, linear, mlp, project,
                      project_qkv, rms_norm)
from .model import (STEP_TOKENS, KVCache, Layer, NativeConfig, NativeModel, Precision, allocate_cache, early_exit,
                    keep_layers, matmul_weights, reduced_head, rope_tables, streamed_bytes)
from .pack import onednn_weight, pack_like, pack_weight_like, round_blocks, with_int8
from .runner import NativeRunner

__all__ = ["gguf", "GreedyBatch", "greedy_batch", "config_supported", "context_length", "from_hf", "hf_config", "hf_layer", "supports",
           "bf16_supported", "fastest_dtype", "fp16_supported", "resolve_dtype", "apply_rope", "blocks", "decoder_layer", "mlp", "project_qkv",
           "final_norm", "forward", "head_logits", "linear", "project", "rms_norm", "STEP_TOKENS", "KVCache",
           "Layer", "NativeConfig", "NativeModel", "Precision", "allocate_cache", "early_exit", "keep_layers", "matmul_weights", "reduced_head", "rope_tables",
           "streamed_bytes", "onednn_weight", "pack_like", "pack_weight_like", "round_blocks", "with_int8",
           "NativeRunner"]
