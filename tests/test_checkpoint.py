"""Checkpoint import against transformers: tiny random Qwen2/Llama folders, the SmolLM2 GGUF;
loading onto a mesh of 8 fake devices, stacked or not. Also the errors a damaged checkpoint
raises: each must name the file and the tensor.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from models import checkpoint, decoder, masks
from models.checkpoint import CheckpointError
from models.config import get_config



@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
  # On a shared 2-core machine torch's OpenMP pool spin-waits against the other processes: one
  # thread made SmolLM2 generation 20x faster here. Restored so other modules are unaffected.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Tiny random Hugging Face models.

# Each covers GQA and a non-default rope_theta; together they cover qkv bias (qwen2 always, llama
# through attention_bias), tied and untied embeddings, and head_dim != hidden / heads.
TINY = {
    "qwen2_tied": (transformers.Qwen2Config, dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=256)),
    "qwen2_untied": (transformers.Qwen2Config, dict(
        vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, rope_theta=20_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=128)),
    "llama_untied": (transformers.LlamaConfig, dict(
        vocab_size=72, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, rope_theta=500_000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        max_position_embeddings=512)),
    "llama_bias_tied": (transformers.LlamaConfig, dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=3_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=True, max_position_embeddings=64)),
}


def _tiny_model(name: str, seed: int = 0, nonzero_out_bias: bool = False):
  """A random-weight HF model; every tensor (norms and biases too) drawn away from its init."""
  config_cls, kw = TINY[name]
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      config_cls(**kw), attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "norm" in pname:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "o_proj.bias" in pname and not nonzero_out_bias:
        # Llama's attention_bias also biases o_proj; models.decoder has no slot for it, so the
        # import accepts it only when it is zero.
        p.zero_()
      else:
        p.normal_(0.0, 0.15)
  return model.eval()


def _save(model, folder, **kw) -> str:
  model.save_pretrained(folder, safe_serialization=True, **kw)
  return str(folder)


def _hf_logits(model, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
  positions = np.asarray(masks.positions_from_valid(jnp.asarray(valid)))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64)),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def _our_logits(params, cfg, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
  # One compiled program per shape: op-by-op dispatch of the layer stack is far slower.
  fwd = jax.jit(lambda p, t, v: decoder.forward(p, cfg, t, masks.positions_from_valid(v),
                                                masks.causal_mask(v)))
  return np.asarray(fwd(params, jnp.asarray(tokens), jnp.asarray(valid)))


def _batches(vocab: int):
  """One unpadded prompt, and a left-padded batch of three (0, 3 and 6 pad tokens)."""
  rng = np.random.default_rng(7)
  single = rng.integers(0, vocab, (1, 11))
  batch = rng.integers(0, vocab, (3, 13))
  valid = np.ones_like(batch, bool)
  valid[1, :3] = False
  valid[2, :6] = False
  batch[~valid] = 0  # Pad id; its value must not matter.
  return [(single, np.ones_like(single, bool)), (batch, valid)]


@pytest.mark.parametrize("name", sorted(TINY))
def test_load_hf_logits_match_transformers(name, tmp_path):
  model = _tiny_model(name)
  cfg, params = checkpoint.load_hf(_save(model, tmp_path))
  kw = TINY[name][1]
  assert cfg.family == model.config.model_type
  assert cfg.tie_embeddings == kw["tie_word_embeddings"]
  assert cfg.qkv_bias == (cfg.family == "qwen2" or kw.get("attention_bias", False))
  assert cfg.rope_theta == kw["rope_theta"] and cfg.rms_eps == kw["rms_norm_eps"]
  assert cfg.n_kv_heads == kw["num_key_value_heads"] < cfg.n_heads
  assert cfg.head_dim == kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
  assert ("lm_head" in params) != cfg.tie_embeddings
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
      tuple, decoder.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  for tokens, valid in _batches(cfg.vocab_size):
    ours = _our_logits(params, cfg, tokens, valid)
    theirs = _hf_logits(model, tokens, valid)
    diff = np.abs(ours - theirs)[valid].max()
    print(f"{name} batch {tokens.shape}: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4, diff


def test_load_hf_sharded_and_bfloat16(tmp_path):
  model = _tiny_model("qwen2_untied")
  _, single = checkpoint.load_hf(_save(model, tmp_path / "single"))
  folder = _save(model, tmp_path / "sharded", max_shard_size="40KB")
  assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
  cfg, sharded = checkpoint.load_hf(folder)
  jax.tree.map(np.testing.assert_array_equal, single, sharded)
  cfg16, half = checkpoint.load_hf(folder, dtype="bfloat16")
  assert cfg16 == cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.astype(jnp.bfloat16), b), single,
               half)


def test_tied_checkpoint_with_equal_lm_head_is_accepted(tmp_path):
  folder = _save(_tiny_model("qwen2_tied"), tmp_path)
  path = os.path.join(folder, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  safetensors.numpy.save_file(tensors, path)
  cfg, params = checkpoint.load_hf(folder)
  assert cfg.tie_embeddings and "lm_head" not in params


@pytest.mark.parametrize("shape,scan", [((1, 2, 4), False), ((2, 2, 2), True)])
def test_load_hf_into_a_mesh(shape, scan, tmp_path, monkeypatch):
  # Each parameter is made in its sharding from blocks of the file: compare the placement with
  # models.params.param_shardings and the values with the plain load.
  from models import hf, params as params_lib, sharding

  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  folder = _save(_tiny_model("qwen2_untied"), tmp_path, max_shard_size="40KB")
  cfg, plain = checkpoint.load_hf(folder)
  reads = []
  read = hf._SafetensorsFile.read
  monkeypatch.setattr(hf._SafetensorsFile, "read",
                      lambda self, name, index=None: reads.append((name, index)) or read(
                          self, name, index))
  mesh = sharding.make_mesh(shape)
  scfg, sharded = checkpoint.load_hf(folder, mesh=mesh, scan_layers=scan)
  assert scfg == cfg.replace(scan_layers=scan)
  want = params_lib.param_shardings(scfg, mesh)
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(
      f"{x.sharding} != {s}"), sharded, want)
  # 6 heads on tensor=4 stay whole (replicated); the MLP, vocab and embed dimensions split.
  w_up = sharded["layers"]["w_up"] if scan else sharded["layers"][1]["w_up"]
  spec = (None, "fsdp", "tensor") if scan else ("fsdp", "tensor")
  assert tuple(w_up.sharding.spec) == spec[:w_up.ndim] and len(w_up.sharding.device_set) == 8
  assert w_up.addressable_shards[0].data.shape[-2:] == (48 // shape[1], 64 // shape[2])
  # The file was read in blocks: up_proj [mlp 64, embed 48] in fsdp x tensor pieces ...
  blocks = [ix for n, ix in reads if n == "model.layers.1.mlp.up_proj.weight"]
  sizes = {tuple(s.stop - s.start for s in ix) for ix in blocks}
  assert sizes == {(64 // shape[2], 48 // shape[1])}, sizes
  # ... each read once, though with data=2 two devices hold it.
  assert len(blocks) == len({str(ix) for ix in blocks}) == shape[1] * shape[2]
  if scan:
    sharded = params_lib.unstack_layers(sharded)
  jax.tree.map(np.testing.assert_array_equal, plain, sharded)


def test_checkpoint_command_line(tmp_path):
  folder = _save(_tiny_model("llama_untied"), tmp_path)
  lines = checkpoint.inspect(hf=folder, dtype="bfloat16", mesh_shape=(1, 4, 2))
  assert lines[0].startswith(f"loaded {folder}") and "n_layers=2" in lines[1]
  assert "dtype='bfloat16'" in lines[1] and "P('tensor', 'fsdp')" in lines[2]
  with pytest.raises(ValueError, match="exactly one"):
    checkpoint.inspect()
  with pytest.raises(ValueError, match="--export_tokenizer needs --gguf"):
    checkpoint.inspect(hf=folder, export_tokenizer=str(tmp_path / "tok"))


# ---------------------------------------------------------------------------------------------
# Errors a user can cause: each names the file and the tensor (or key).


@pytest.fixture
def llama_folder(tmp_path):
  return _save(_tiny_model("llama_untied"), tmp_path / "llama")


def _rewrite(folder: str, edit) -> str:
  path = os.path.join(folder, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path)
  return path


def test_truncated_safetensors_names_file_and_tensor(llama_folder):
  path = os.path.join(llama_folder, "model.safetensors")
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  last = max(header, key=lambda k: header[k]["data_offsets"][1])
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(CheckpointError, match="truncated") as e:
    checkpoint.load_hf(llama_folder)
  assert path in str(e.value) and repr(last) in str(e.value)
  with open(path, "r+b") as f:
    f.truncate(n // 2)  # Inside the JSON header.
  with pytest.raises(CheckpointError, match="truncated") as e:
    checkpoint.load_hf(llama_folder)
  assert path in str(e.value)


def test_shape_mismatch_names_file_and_tensor(llama_folder):
  name = "model.layers.1.self_attn.k_proj.weight"
  path = _rewrite(llama_folder, lambda t: t.update({name: np.zeros((24, 48), np.float32)}))
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_hf(llama_folder)
  msg = str(e.value)
  assert path in msg and repr(name) in msg and "(24, 48)" in msg and "(16, 48)" in msg


def test_config_disagreeing_with_tensors_names_file_and_tensor(llama_folder):
  conf_path = os.path.join(llama_folder, "config.json")
  with open(conf_path) as f:
    conf = json.load(f)
  conf["intermediate_size"] = 96
  with open(conf_path, "w") as f:
    json.dump(conf, f)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_hf(llama_folder)
  msg = str(e.value)
  assert os.path.join(llama_folder, "model.safetensors") in msg
  assert any(f"'model.layers.0.mlp.{p}_proj.weight'" in msg for p in ("gate", "up", "down"))
  assert "(96," in msg or ", 96)" in msg


def test_missing_tensor_names_file_and_tensor(llama_folder):
  name = "model.layers.1.mlp.up_proj.weight"
  path = _rewrite(llama_folder, lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match="missing tensor") as e:
    checkpoint.load_hf(llama_folder)
  assert path in str(e.value) and repr(name) in str(e.value)


def test_unexpected_tensor_names_file_and_tensor(llama_folder):
  name = "model.layers.0.self_attn.extra_proj.weight"
  path = _rewrite(llama_folder, lambda t: t.update({name: np.ones((4, 4), np.float32)}))
  with pytest.raises(CheckpointError, match="unexpected tensor") as e:
    checkpoint.load_hf(llama_folder)
  assert path in str(e.value) and repr(name) in str(e.value)


def test_missing_shard_and_unknown_architecture(llama_folder, tmp_path):
  conf_path = os.path.join(llama_folder, "config.json")
  with open(conf_path) as f:
    conf = json.load(f)
  with open(conf_path, "w") as f:
    json.dump(dict(conf, model_type="gpt_neox"), f)
  with pytest.raises(CheckpointError, match="unknown architecture") as e:
    checkpoint.load_hf(llama_folder)
  assert conf_path in str(e.value) and "gpt_neox" in str(e.value)

  folder = _save(_tiny_model("llama_untied"), tmp_path / "sharded", max_shard_size="40KB")
  index = os.path.join(folder, "model.safetensors.index.json")
  with open(index) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(os.path.join(folder, shard))
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_hf(folder)
  assert index in str(e.value) and shard in str(e.value)


def test_tied_checkpoint_with_different_lm_head_is_rejected(tmp_path):
  folder = _save(_tiny_model("qwen2_tied"), tmp_path)
  path = _rewrite(folder, lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"] + 1.0}))
  with pytest.raises(CheckpointError, match="tie_word_embeddings") as e:
    checkpoint.load_hf(folder)
  assert path in str(e.value) and "'lm_head.weight'" in str(e.value)


def test_nonzero_attention_output_bias_is_rejected(tmp_path):
  folder = _save(_tiny_model("llama_bias_tied", nonzero_out_bias=True), tmp_path)
  with pytest.raises(CheckpointError, match="nonzero attention output bias") as e:
    checkpoint.load_hf(folder)
  assert os.path.join(folder, "model.safetensors") in str(e.value)
  assert "self_attn.o_proj.bias'" in str(e.value)


# ---------------------------------------------------------------------------------------------
# GGUF files written at test time (llama.cpp conventions), checked against load_hf.


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """What llama.cpp's converter does to Q/K rows (independent of checkpoint.py's inverse)."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_gguf(path, model, arch: str, edit=lambda tensors, meta: None, q8_0=()):
  """Writes an HF model as a GGUF the way llama.cpp's converter lays it out."""
  c = model.config
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  tensors = {}
  for name, t in model.state_dict().items():
    w = t.numpy().astype(np.float32)
    if name == "model.embed_tokens.weight":
      tensors["token_embd.weight"] = w
    elif name == "model.norm.weight":
      tensors["output_norm.weight"] = w
    elif name == "lm_head.weight":
      if not c.tie_word_embeddings:
        tensors["output.weight"] = w
    else:
      i, rest = name.removeprefix("model.layers.").split(".", 1)
      module, kind = rest.rsplit(".", 1)
      gname = f"blk.{i}.{_GGUF_NAMES[module]}.{kind}"
      if arch == "llama" and ("attn_q" in gname or "attn_k" in gname):
        w = _llama_cpp_permute(w, c.num_attention_heads if "attn_q" in gname
                               else c.num_key_value_heads)
      tensors[gname] = w
  meta = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
          "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
          "head_count": c.num_attention_heads, "head_count_kv": c.num_key_value_heads,
          "rope_freq_base": c.rope_parameters["rope_theta"],
          "layer_norm_rms_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
          "key_length": head_dim, "rope_dimension_count": head_dim}
  edit(tensors, meta)
  w = gguf.GGUFWriter(str(path), arch)
  for key, value in meta.items():
    getattr(w, f"add_{key}")(value)
  for name, t in tensors.items():
    if name in q8_0:
      w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                   raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("name,arch", [("llama_untied", "llama"), ("llama_bias_tied", "llama"),
                                       ("qwen2_tied", "qwen2")])
def test_load_gguf_equals_load_hf(name, arch, tmp_path):
  model = _tiny_model(name)
  hf_cfg, hf_params = checkpoint.load_hf(_save(model, tmp_path / "hf"))
  cfg, params = checkpoint.load_gguf(_write_gguf(tmp_path / "m.gguf", model, arch))
  assert cfg == hf_cfg.replace(max_seq_len=cfg.max_seq_len)
  jax.tree.map(np.testing.assert_array_equal, hf_params, params)


def test_load_gguf_dequantizes_q8_0(tmp_path):
  # Q8_0 blocks hold 32 values along a row, so this needs rows of 64; written as a llama file
  # (qkv biases and all) so the quantized Q is also permuted.
  model = _tiny_model("qwen2_tied")
  _, hf_params = checkpoint.load_hf(_save(model, tmp_path / "hf"))
  path = _write_gguf(tmp_path / "q.gguf", model, "llama",
                     q8_0=("blk.0.ffn_up.weight", "blk.1.attn_q.weight"))
  _, params = checkpoint.load_gguf(path)
  for i, key in ((0, "w_up"), (1, "wq")):
    a, b = np.asarray(hf_params["layers"][i][key]), np.asarray(params["layers"][i][key])
    assert not np.array_equal(a, b)  # Quantized, so not bit-equal ...
    np.testing.assert_allclose(a, b, atol=np.abs(a).max() / 100)  # ... but within 8-bit steps.
  np.testing.assert_array_equal(hf_params["layers"][0]["wq"], params["layers"][0]["wq"])


def _gguf_error(tmp_path, edit, truncate: int = 0):
  path = _write_gguf(tmp_path / "bad.gguf", _tiny_model("llama_untied"), "llama", edit)
  shutil.copy(path, tmp_path / "good.gguf")
  if truncate:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - truncate)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_gguf(path)
  assert path in str(e.value)
  return str(e.value)


def test_gguf_errors_name_file_and_tensor(tmp_path):
  msg = _gguf_error(tmp_path, lambda t, m: t.pop("blk.1.ffn_up.weight"))
  assert "missing tensor 'blk.1.ffn_up.weight'" in msg
  msg = _gguf_error(tmp_path, lambda t, m: t.update(
      {"blk.0.attn_extra.weight": np.ones((4, 8), np.float32)}))
  # GGUF dimensions are reversed on disk; messages use numpy order like the file's readers.
  assert "unexpected tensor 'blk.0.attn_extra.weight' with shape (4, 8)" in msg
  msg = _gguf_error(tmp_path, lambda t, m: m.update(feed_forward_length=96))
  assert "'blk.0.ffn_gate.weight' has shape (80, 48)" in msg and "(96, 48)" in msg
  msg = _gguf_error(tmp_path, lambda t, m: m.update(head_count_kv=2))
  assert "'blk.0.attn_k.weight' has shape (16, 48)" in msg and "(32, 48)" in msg
  msg = _gguf_error(tmp_path, lambda t, m: None, truncate=1000)
  last = max(gguf.GGUFReader(str(tmp_path / "good.gguf")).tensors, key=lambda t: t.data_offset)
  assert f"truncated: tensor {last.name!r}" in msg
  msg = _gguf_error(tmp_path, lambda t, m: m.pop("embedding_length"))
  assert "'llama.embedding_length'" in msg
  # Cut inside the metadata: no tensor is known yet, so only the file can be named.
  size = os.path.getsize(tmp_path / "good.gguf")
  msg = _gguf_error(tmp_path, lambda t, m: None, truncate=size - 200)
  assert "not a readable GGUF file" in msg


def test_gguf_unknown_architecture(tmp_path):
  path = _write_gguf(tmp_path / "gpt2.gguf", _tiny_model("llama_untied"), "gpt2")
  with pytest.raises(CheckpointError, match="unknown architecture") as e:
    checkpoint.load_gguf(path)
  assert path in str(e.value) and "'gpt2'" in str(e.value)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF (Q4_1) against transformers' own GGUF loader.

SMOLLM2_PROMPTS = (
    "<|im_start|>user\nWhat is 17 + 25? Let's think step by step.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "The three primary colors are",
    "def fibonacci(n):\n    \"\"\"Returns the n-th Fibonacci number.\"\"\"\n",
)
N_NEW = 32


def _smollm2_or_skip() -> str:
  try:
    return checkpoint.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """(path, our config, our params, transformers model, our tokenizer) loaded once."""
  from models.tokenizer import HFTokenizer

  path = _smollm2_or_skip()
  cfg, params = checkpoint.load_gguf(path)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
      attn_implementation="eager").eval()
  tok = HFTokenizer(checkpoint.tokenizer_from_gguf(path, str(tmp_path_factory.mktemp("tok"))))
  return path, cfg, params, theirs, tok


def test_smollm2_config_matches_named_config(smollm2):
  _, cfg, params, _, _ = smollm2
  # Every field agrees; the file's float32 rms epsilon (9.99999975e-06) reads back as 1e-05.
  assert cfg == get_config("smollm2-135m")
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.n_params


def _left_padded(tok, prompts) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> (ids [B, T], valid [B, T]) padded on the left with the pad id."""
  enc = [tok.encode(p) for p in prompts]
  t = max(map(len, enc))
  ids = np.full((len(enc), t), tok.pad_id, np.int64)
  valid = np.zeros((len(enc), t), bool)
  for row, e in enumerate(enc):
    ids[row, t - len(e):], valid[row, t - len(e):] = e, True
  return ids, valid


def test_smollm2_logits_match_transformers(smollm2):
  # One left-padded batch of the three prompts: one compilation, and padding is exercised.
  _, cfg, params, theirs, tok = smollm2
  ids, valid = _left_padded(tok, SMOLLM2_PROMPTS)
  diff = np.abs(_our_logits(params, cfg, ids, valid) - _hf_logits(theirs, ids, valid))
  for row in range(len(ids)):
    print(f"SmolLM2 prompt {row} ({valid[row].sum()} tokens): max |logits diff| = "
          f"{diff[row][valid[row]].max():.2e}")
  assert diff[valid].max() <= 1e-3, diff[valid].max()


@functools.partial(jax.jit, static_argnums=(1, 4))
def _our_greedy(params, cfg, ids, valid, n: int):
  """Prefill left-padded prompts [B, T] into a KV cache, then n greedy steps -> [B, n]."""
  b, t = ids.shape
  cache = decoder.init_cache(cfg, b, t + n)
  positions = masks.positions_from_valid(valid)
  logits, cache = decoder.prefill(params, cfg, ids, positions, masks.causal_mask(valid), cache)
  # A new token sees the prompt's real tokens and every generated slot up to its own.
  seen = jnp.concatenate([valid, jnp.ones((b, n), bool)], axis=1)
  slots = jnp.arange(t + n)

  def step(i, carry):
    out, cache, last = carry
    index = t + i - 1
    kv_mask = (seen & (slots <= index))[:, None, :]
    pos = positions[:, -1:] + i
    logits, cache = decoder.decode_step(params, cfg, last[:, None], pos, cache, index, kv_mask)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(out.dtype)
    return out.at[:, i].set(nxt), cache, nxt

  first = jnp.argmax(logits, axis=-1).astype(ids.dtype)
  out = jnp.zeros((b, n), ids.dtype).at[:, 0].set(first)
  out, _, _ = jax.lax.fori_loop(1, n, step, (out, cache, first))
  return out


def test_smollm2_greedy_continuation_matches_transformers(smollm2):
  _, cfg, params, theirs, tok = smollm2
  ids, valid = _left_padded(tok, SMOLLM2_PROMPTS)
  ours = np.asarray(_our_greedy(params, cfg, jnp.asarray(ids), jnp.asarray(valid), N_NEW))
  with torch.no_grad():
    # eos_token_id=None: no early stop, both sides produce exactly N_NEW tokens per row.
    out = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)),
                          do_sample=False, max_new_tokens=N_NEW, eos_token_id=None,
                          pad_token_id=tok.pad_id)
  ref = out[:, ids.shape[1]:].numpy()
  for row in range(len(ids)):
    print(f"SmolLM2 greedy {row}: ours == theirs: {np.array_equal(ours[row], ref[row])}; "
          f"{tok.decode(ours[row])!r}")
  assert ref.shape == (len(ids), N_NEW)
  np.testing.assert_array_equal(ours, ref)
