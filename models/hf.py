"""Hugging Face import: a Llama or Qwen2 folder (config.json + safetensors) -> (config, params).

Tensors are read through `safetensors.safe_open` block by block, straight into their shardings.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from models import sharding as shd
from models import tensor_map as tm
from models.config import ModelConfig
from models.params import Params
from models.tensor_map import CheckpointError

# ml_dtypes registers bfloat16 with numpy, which safe_open(framework="numpy") needs for BF16.
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64}


class _SafetensorsFile:
  """One safetensors file: its header checked on open, its tensors read through safe_open.

  The header is parsed here first (it is a length and a JSON document) so that a truncated or
  inconsistent file reports the first tensor whose bytes are missing, which safe_open's own
  error does not name.
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
    data_size = size - 8 - n
    self.shapes: dict[str, tuple[int, ...]] = {}
    for name, e in header.items():
      if e.get("dtype") not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {e.get('dtype')!r}; "
                              f"expected one of {sorted(_ST_DTYPES)}")
      shape = tuple(int(s) for s in e["shape"])
      begin, end = (int(o) for o in e["data_offsets"])
      if end - begin != math.prod(shape) * np.dtype(_ST_DTYPES[e["dtype"]]).itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} and dtype "
                              f"{e['dtype']} has {end - begin} bytes")
      if end > data_size:
        raise CheckpointError(f"{path}: truncated: tensor {name!r} needs data bytes "
                              f"[{begin}, {end}) but the file holds {data_size}")
      self.shapes[name] = shape
    self._handle = None

  def open(self, stack: contextlib.ExitStack) -> None:
    from safetensors import safe_open

    try:
      self._handle = stack.enter_context(safe_open(self.path, framework="numpy"))
    except Exception as e:  # safetensors raises its own SafetensorError.
      raise CheckpointError(f"{self.path}: safetensors cannot open it ({e})") from None

  def read(self, name: str, index: tm.Index | None = None) -> np.ndarray:
    """Tensor `name`, or only its block `index` (a tuple of slices), as a numpy array."""
    try:
      if index is None:
        return self._handle.get_tensor(name)
      return self._handle.get_slice(name)[index]
    except Exception as e:
      raise CheckpointError(f"{self.path}: tensor {name!r} cannot be read ({e})") from None


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


def load_hf(folder: str, dtype: str = "float32", mesh: Mesh | None = None,
            scan_layers: bool = False,
            rules: Mapping[str, Any] = shd.RULES) -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face Llama or Qwen2 folder (config.json + safetensors, sharded or not).

  Returns (config, params) with params in our layout (models.params) as `dtype` arrays; the
  config's compute and storage dtypes are both `dtype`. With `mesh`, every parameter is placed
  in its sharding (models.params.param_shardings) as it is read, each process reading only its
  devices' blocks; without, whole arrays on the default device. `scan_layers` loads the layers
  stacked ([L, ...]) and returns a config with scan_layers=True.
  """
  tm.check_dtype(dtype)
  conf_path = os.path.join(folder, "config.json")
  if not os.path.isfile(conf_path):
    raise CheckpointError(f"{folder}: no config.json")
  try:
    with open(conf_path) as f:
      conf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{conf_path}: unreadable JSON ({e})") from None
  cfg = config_from_hf(conf, conf_path, dtype).replace(scan_layers=scan_layers)
  files = [_SafetensorsFile(p) for p in _hf_files(folder)]
  owner: dict[str, _SafetensorsFile] = {}
  for st in files:
    for name in st.shapes:
      if name in owner:
        raise CheckpointError(f"{st.path}: tensor {name!r} is also in {owner[name].path}")
      owner[name] = st
  slots = tm.hf_slots(cfg)
  found = {name: st.shapes[name] for name, st in owner.items()}
  # Old checkpoints store the rotary frequencies; they are recomputed from rope_theta.
  ignored = lambda name: name.endswith("rotary_emb.inv_freq") or (
      cfg.tie_embeddings and name == "lm_head.weight") or (
          conf.get("attention_bias") and name.endswith("self_attn.o_proj.bias"))
  # A missing tensor belongs to no file: name the one file, or the index of the shards.
  source = (files[0].path if len(files) == 1 else
            os.path.join(folder, "model.safetensors.index.json"))
  tm.check_tensors(source, found, slots, lambda n: owner[n].path, conf_path, ignored)
  with contextlib.ExitStack() as stack:
    for st in files:
      st.open(stack)
    if cfg.tie_embeddings and "lm_head.weight" in owner:
      # Some exports write the tied matrix twice; accept that copy only when it is the same.
      head, emb = owner["lm_head.weight"], owner["model.embed_tokens.weight"]
      if (found["lm_head.weight"] != found["model.embed_tokens.weight"] or
          not np.array_equal(head.read("lm_head.weight"),
                             emb.read("model.embed_tokens.weight"))):
        raise CheckpointError(f"{head.path}: tensor 'lm_head.weight' differs from "
                              "'model.embed_tokens.weight' but config.json says "
                              "tie_word_embeddings=true")
    for name in found:
      if name.endswith("self_attn.o_proj.bias"):
        tm.check_zero(owner[name].path, name, owner[name].read(name))
    params = tm.assemble(cfg, slots, lambda n, ix: owner[n].read(n, ix), mesh, rules)
  return cfg, params
