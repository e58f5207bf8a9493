"""Model configurations: one frozen dataclass covers the Llama and Qwen2 decoder families.

Named configs are looked up with `get_config(name, **overrides)`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

REMAT_MODES = ("none", "full", "dots")
# Blocks of the packed-row attention kernel: divisors of the rows' padding (brpo.train.packing.BLOCK).
ATTENTION_BLOCKS = (16, 32, 64, 128)
# ModelConfig fields that change how the model runs, not what it computes (set per run from the
# flags of the same names; a saved model serves any value of them).
RUNTIME_FIELDS = ("remat", "scan_layers", "attention_block", "decode_block", "prefill_chunk")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rms_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2 has biases on the q, k and v projections.
  tie_embeddings: bool = False  # Output projection = input embedding transposed.
  max_seq_len: int = 4096
  dtype: str = "float32"  # Compute dtype of activations and matmuls.
  param_dtype: str = "float32"  # Storage dtype of the parameters.
  family: str = "llama"  # "llama" or "qwen2": only informational (import picks tensor names).
  # How the layer stack runs; neither changes a value, only memory and compile time.
  # remat: "none" keeps every activation for the backward pass; "full" keeps only each layer's
  # input (jax.checkpoint per layer); "dots" also keeps the projections' outputs (matmuls
  # without batch dimensions) and recomputes attention scores, norms and activations. Pair it
  # with scan_layers: with unrolled layers XLA:CPU's scheduler recomputes every layer up front
  # and the compiled update was no smaller (1.5B, 4096 tokens: 84 GiB either way; scanned: 80
  # GiB none, 19 GiB dots, 10 GiB full, from jit(...).lower(...).compile().memory_analysis()).
  remat: str = "none"
  # scan_layers: params["layers"] is one dict of [L, ...] arrays (models.params.stack_layers)
  # and the stack is a jax.lax.scan, so compile time does not grow with the depth.
  scan_layers: bool = False
  # Query and key block of the blockwise attention kernel of packed training rows
  # (models.attention.blockwise_attention). Rows are padded to multiples of 128, so it divides
  # 128. 128 suits long rows on accelerators; short rows on CPU run faster with smaller blocks,
  # which skip more of the tree mask (tiny task, 512-slot rows: 32 is 1.44x faster than 128, `benchmarks/packing.py --blocks`).
  attention_block: int = 128
  # Key block of the decode attention over the KV cache (models.attention.decode_attention):
  # blocks are read up to the filled length, so a smaller block reads fewer empty slots and a
  # larger one makes fewer, bigger reads. Any size (values unchanged up to rounding); the
  # sampler and the anytime rollout use it unless called with their own `block`. On 2 CPU
  # cores (`python -m benchmarks.attention_layouts`) sizes 64-512 differ by less than the
  # run-to-run noise on full caches; a 300-slot fill of 512 slots ran 2.4x faster in blocks
  # of 64 (320 slots read) than of 256 (512 read).
  decode_block: int = 256
  # Prompt tokens per step of the rollout's prefill (models.decoder.prefill_chunked): each chunk
  # is written into the KV cache and attends over it with the decode kernel, so the prefill holds
  # one chunk's activations beside the cache, not [B, H, P, P] scores. Any size (values
  # unchanged up to rounding); smaller is less memory, more passes over the weights.
  prefill_chunk: int = 256

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{f}={getattr(self, f)!r}: expected float32, bfloat16 or float16")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"remat={self.remat!r}: expected one of {', '.join(REMAT_MODES)}")
    if self.attention_block not in ATTENTION_BLOCKS:
      raise ValueError(f"attention_block={self.attention_block}: expected one of "
                       f"{', '.join(map(str, ATTENTION_BLOCKS))} (a divisor of the packed rows' "
                       "padding, 128)")
    if self.decode_block < 1:
      raise ValueError(f"decode_block={self.decode_block}: must be >= 1")
    if self.prefill_chunk < 1:
      raise ValueError(f"prefill_chunk={self.prefill_chunk}: must be >= 1")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def n_params(self) -> int:
    d, h, k, dh, f, v = (self.d_model, self.n_heads, self.n_kv_heads, self.head_dim,
                         self.mlp_dim, self.vocab_size)
    per_layer = d * h * dh * 2 + d * k * dh * 2 + 3 * d * f + 2 * d
    if self.qkv_bias:
      per_layer += (h + 2 * k) * dh
    return v * d * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d

  def flops_per_token(self, context: int = 0) -> float:
    """Forward matmul FLOPs for one token attending to `context` keys (2 per multiply-add)."""
    d, h, k, dh, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.mlp_dim
    per_layer = 2 * (d * h * dh * 2 + d * k * dh * 2 + 3 * d * f) + 2 * 2 * h * dh * context
    return self.n_layers * per_layer + 2 * d * self.vocab_size


CONFIGS: dict[str, ModelConfig] = {
    # A small model for CPU tests and the embedded default run; vocab_size is replaced by the
    # tokenizer's size when the tiny task builds it. Sized by brpo.warmstart: 2 layers of d_model
    # 128 learn the task's one-digit chains to ~50% in 700-800 steps (under 2 minutes on 2 cores);
    # 8 heads of 16 learnt slower, and 4 layers of d_model 192 cost 4x per step.
    "tiny": ModelConfig(
        vocab_size=128, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
        mlp_dim=256, rope_theta=10_000.0, rms_eps=1e-6, tie_embeddings=True, max_seq_len=2048),
    # HuggingFaceTB/SmolLM2-135M-Instruct.
    "smollm2-135m": ModelConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        mlp_dim=1536, rope_theta=100_000.0, rms_eps=1e-5, tie_embeddings=True,
        max_seq_len=8192, family="llama"),
    # Qwen/Qwen2.5-1.5B(-Instruct).
    "qwen2.5-1.5b": ModelConfig(
        vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
        mlp_dim=8960, rope_theta=1_000_000.0, rms_eps=1e-6, qkv_bias=True, tie_embeddings=True,
        max_seq_len=32768, family="qwen2"),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (the paper's model; Qwen2.5-Math-1.5B based).
    "deepseek-r1-distill-qwen-1.5b": ModelConfig(
        vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
        mlp_dim=8960, rope_theta=10_000.0, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False,
        max_seq_len=131072, family="qwen2"),
    # Qwen/Qwen2.5-7B(-Instruct).
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
        mlp_dim=18944, rope_theta=1_000_000.0, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False,
        max_seq_len=32768, family="qwen2"),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """Returns the named config with `overrides` applied (e.g. dtype="bfloat16")."""
  if name not in CONFIGS:
    raise ValueError(f"unknown model config {name!r}; known: {', '.join(sorted(CONFIGS))}")
  return CONFIGS[name].replace(**overrides) if overrides else CONFIGS[name]
