"""The decoder: cached decode equals the full forward (with left padding), masks, sharding;
the parameter table, rematerialisation and scanned layers equal the plain path."""

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config, decoder as dec, masks, params as params_lib, sharding

# Fixed here (not the named "tiny", which may be retuned): expected tokens depend on it.
CFG = config.ModelConfig(vocab_size=64, d_model=192, n_layers=2, n_heads=6, n_kv_heads=2,
                         head_dim=32, mlp_dim=512, tie_embeddings=True, max_seq_len=2048)


@pytest.fixture(scope="module")
def params():
  return dec.init_params(CFG, jax.random.PRNGKey(0))


def _batch():
  tok = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 0, 64)
  valid = jnp.ones((3, 12), bool).at[1, :3].set(False).at[2, :7].set(False)
  return tok, valid


def test_config_param_count_matches_init(params):
  assert CFG.n_params == sum(x.size for x in jax.tree.leaves(params))
  for name in config.CONFIGS:
    c = config.get_config(name)
    shapes = jax.tree.leaves(dec.param_shapes(c), is_leaf=lambda x: isinstance(x, tuple))
    assert c.n_params == sum(int(np.prod(s)) for s in shapes), name


def test_named_configs_sizes():
  assert 130e6 < config.get_config("smollm2-135m").n_params < 140e6
  assert 1.4e9 < config.get_config("qwen2.5-1.5b").n_params < 1.6e9
  assert 1.7e9 < config.get_config("deepseek-r1-distill-qwen-1.5b").n_params < 1.9e9
  assert 7.0e9 < config.get_config("qwen2.5-7b").n_params < 7.7e9
  with pytest.raises(ValueError, match="unknown model config 'nope'"):
    config.get_config("nope")


def test_causal_mask_and_positions():
  valid = jnp.array([[False, False, True, True, True]])
  m = np.asarray(masks.causal_mask(valid))[0]
  expected = np.zeros((5, 5), bool)
  for q in range(2, 5):
    expected[q, 2:q + 1] = True
  np.testing.assert_array_equal(m, expected)
  np.testing.assert_array_equal(masks.positions_from_valid(valid)[0], [0, 0, 0, 1, 2])


def test_tree_mask_rule():
  # Row: prompt+thinking slots 0..3 (trunk), branch 1 = slots 4,5 cut after trunk slot 1 (limit 2),
  # branch 2 = slot 6 with limit 4, slot 7 padding.
  branch = jnp.array([[0, 0, 0, 0, 1, 1, 2, -1]])
  limit = jnp.array([[1, 2, 3, 4, 2, 2, 4, 0]])
  m = np.asarray(masks.tree_mask(branch, limit))[0]
  assert m[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
  assert m[5].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
  assert m[4].tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
  assert m[6].tolist() == [1, 1, 1, 1, 0, 0, 1, 0]
  assert not m[:, 7].any() and not m[7].any()


def test_cached_decode_equals_full_forward(params):
  tok, valid = _batch()
  pos = masks.positions_from_valid(valid)
  full = dec.forward(params, CFG, tok, pos, masks.causal_mask(valid))
  n_pre, slots = 8, 16
  cache = dec.init_cache(CFG, 3, slots)
  m = masks.causal_mask(valid)
  last, cache = dec.prefill(params, CFG, tok[:, :n_pre], pos[:, :n_pre], m[:, :n_pre, :n_pre],
                            cache)
  np.testing.assert_allclose(last, full[:, n_pre - 1], atol=1e-5)
  start = jnp.argmax(valid, axis=1)
  s = jnp.arange(slots)
  for t in range(n_pre, 12):
    kv_mask = ((s[None] >= start[:, None]) & (s[None] <= t))[:, None]
    lg, cache = dec.decode_step(params, CFG, tok[:, t:t + 1], pos[:, t:t + 1], cache, t, kv_mask)
    np.testing.assert_allclose(lg[:, 0], full[:, t], atol=1e-5)


def test_left_padding_invariance_of_forward(params):
  tok, valid = _batch()
  pos = masks.positions_from_valid(valid)
  full = dec.forward(params, CFG, tok, pos, masks.causal_mask(valid))
  # Row 2 alone, without its padding.
  alone = dec.forward(params, CFG, tok[2:, 7:], pos[2:, 7:], masks.causal_mask(valid[2:, 7:]))
  np.testing.assert_allclose(full[2, 7:], alone[0], atol=1e-5)


def test_bfloat16_forward_close_to_float32(params):
  tok, valid = _batch()
  pos = masks.positions_from_valid(valid)
  f32 = dec.forward(params, CFG, tok, pos, masks.causal_mask(valid))
  bf = dec.forward(params, CFG.replace(dtype="bfloat16"), tok, pos, masks.causal_mask(valid))
  assert bf.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(bf - f32))) < 0.1


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2), (1, 8, 1)])
def test_sharded_forward_equals_single_device(params, shape):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  cfg = CFG.replace(n_heads=6, n_kv_heads=2)
  tok, valid = _batch()
  tok = jnp.concatenate([tok] * 8)[:8]
  valid = jnp.concatenate([valid] * 8)[:8]
  pos = masks.positions_from_valid(valid)
  mask = masks.causal_mask(valid)
  fwd = jax.jit(dec.forward, static_argnums=1)
  ref = fwd(params, cfg, tok, pos, mask)
  mesh = sharding.make_mesh(shape)
  sp = sharding.shard_tree(params, dec.param_axes(cfg), mesh)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
  out = fwd(sp, cfg, put(tok), put(pos), put(mask))
  # Parameters really are split across devices.
  assert len(sp["layers"][0]["w_gate"].sharding.device_set) == 8
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_mesh_errors():
  with pytest.raises(ValueError, match="needs 6 devices, but 8"):
    sharding.make_mesh((1, 3, 2))
  assert sharding.make_mesh((2, -1, 1)).shape["fsdp"] == 4
  mesh = sharding.make_mesh((1, 4, 2))
  # 3 kv heads do not divide over tensor=2: replicated rather than an error.
  spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), mesh)
  assert tuple(spec) == ("fsdp", None, None)


# ---------------------------------------------------------------------------------------------
# The parameter table, rematerialisation and scanned layers.

# Digests of init_params computed with the code before the parameter table existed (path
# strings decided the initializer): the table must draw the same keys in the same order.
_PIN_CFG = config.ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                              head_dim=8, mlp_dim=48, qkv_bias=True, tie_embeddings=False)
_PINNED_DIGESTS = {
    "float32": "5e8d3777716cc3a9434f429bd5cafe8e7845c176b1773e222593982f6a318f4c",
    "bfloat16": "782925e8724927084eccb4703a16cca84e0709ef7d2658c263b56c487fc091b7",
}


def _digest(tree) -> str:
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()


@pytest.mark.parametrize("dtype", sorted(_PINNED_DIGESTS))
def test_init_params_bit_identical_to_before_the_table(dtype):
  cfg = _PIN_CFG.replace(param_dtype=dtype)
  p = dec.init_params(cfg, jax.random.PRNGKey(3))
  assert _digest(p) == _PINNED_DIGESTS[dtype]
  if dtype == "float32":  # Readable spot checks of the same draw.
    np.testing.assert_equal(float(p["layers"][2]["wq"][1, 2, 3]), 0.01954827457666397)
    np.testing.assert_equal(float(p["lm_head"][5, 7]), 0.012484896928071976)
    assert float(p["layers"][1]["bk"].sum()) == 0 and float(p["final_norm"].min()) == 1


def test_param_table_drives_shapes_axes_and_shardings():
  for scan in (False, True):
    cfg = _PIN_CFG.replace(scan_layers=scan)
    info = params_lib.param_info(cfg)
    is_info = lambda x: isinstance(x, params_lib.ArrayInfo)
    p = jax.eval_shape(lambda: dec.init_params(cfg, jax.random.PRNGKey(0)))
    assert jax.tree.map(lambda x: x.shape, p) == jax.tree.map(
        tuple, dec.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    assert jax.tree.structure(dec.param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)) == (
        jax.tree.structure(info, is_leaf=is_info))
  mesh = sharding.make_mesh((1, 4, 2))
  flat = params_lib.param_shardings(_PIN_CFG.replace(scan_layers=True), mesh)
  assert tuple(flat["layers"]["wq"].spec) == (None, "fsdp", "tensor", None)
  assert tuple(flat["layers"]["w_down"].spec) == (None, "tensor", "fsdp")
  assert tuple(params_lib.param_shardings(_PIN_CFG, mesh)["layers"][0]["wq"].spec) == (
      "fsdp", "tensor", None)
  abstract = params_lib.abstract_params(_PIN_CFG, mesh)
  assert abstract["embed"].sharding.spec == flat["embed"].spec
  # The weight-decay mask is the same whether or not the layers are stacked (by rank > 1 within
  # a layer, as warm starts have always decayed).
  plain = jax.eval_shape(lambda: dec.init_params(_PIN_CFG, jax.random.PRNGKey(0)))
  assert params_lib.decay_mask(_PIN_CFG) == jax.tree.map(lambda x: x.ndim > 1, plain)
  stacked_mask = params_lib.decay_mask(_PIN_CFG.replace(scan_layers=True))["layers"]
  assert stacked_mask == jax.tree.map(lambda x: x.ndim > 1, plain["layers"][0])


def test_stack_unstack_round_trip(params):
  stacked = dec.stack_layers(params)
  assert stacked["layers"]["wq"].shape == (CFG.n_layers, *params["layers"][0]["wq"].shape)
  back = dec.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  # A scanned config initialises to the stacked values of the unscanned one.
  scanned = dec.init_params(CFG.replace(scan_layers=True), jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, scanned, stacked)
  with pytest.raises(ValueError, match="stack_layers"):
    tok, valid = _batch()
    dec.forward(stacked, CFG, tok, masks.positions_from_valid(valid), masks.causal_mask(valid))


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", False), ("none", True),
                                        ("dots", True)])
def test_remat_and_scan_equal_plain_logits_and_gradients(params, remat, scan):
  tok, valid = _batch()
  pos, mask = masks.positions_from_valid(valid), masks.causal_mask(valid)
  target = jax.random.normal(jax.random.PRNGKey(5), (3, 12, CFG.vocab_size))

  def loss(p, cfg):
    return jnp.sum(dec.forward(p, cfg, tok, pos, mask) * target)

  run = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_loss, ref_grad = run(params, CFG)
  cfg = CFG.replace(remat=remat, scan_layers=scan)
  p = dec.stack_layers(params) if scan else params
  got_loss, got_grad = run(p, cfg)
  if scan:
    got_grad = dec.unstack_layers(got_grad)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got_grad, ref_grad)
  np.testing.assert_allclose(jax.jit(dec.forward, static_argnums=1)(p, cfg, tok, pos, mask),
                             jax.jit(dec.forward, static_argnums=1)(params, CFG, tok, pos, mask),
                             rtol=1e-6, atol=1e-6)


def test_remat_lowers_the_compiled_memory_of_a_scanned_update():
  # XLA's own figure for the backward pass, compiled ahead of time without weights. Measured
  # here: none 34 MiB, dots 13, full 9.6. Unrolled layers (scan_layers=False) showed no saving on
  # XLA:CPU, whose scheduler recomputes every layer up front: use remat with scan_layers.
  base = config.ModelConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                            head_dim=16, mlp_dim=128, scan_layers=True)
  args = (jax.ShapeDtypeStruct((2, 256), jnp.int32), jax.ShapeDtypeStruct((2, 256), bool))
  temp = {}
  for remat in ("none", "dots", "full"):
    cfg = base.replace(remat=remat)

    def loss(p, tok, valid, cfg=cfg):
      pos, mask = masks.positions_from_valid(valid), masks.causal_mask(valid)
      return jnp.sum(dec.forward_hidden(p, cfg, tok, pos, mask))

    compiled = jax.jit(jax.grad(loss)).lower(params_lib.abstract_params(cfg), *args).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["full"] < temp["dots"] < temp["none"] / 2, temp


def test_memory_benchmark_counts_the_cpu_float32_copies_of_bfloat16_weights():
  """benchmarks.memory's cpu_upcast_gb: in a decode-like loop over bfloat16 weights, XLA:CPU
  makes float32 copies of them in the entry computation; the helper finds exactly their bytes
  (and none for float32 weights)."""
  from benchmarks import memory

  def loop(ws, x):
    body = lambda i, h: jnp.tanh(functools.reduce(lambda a, w: a @ w, ws, h)).astype(h.dtype)
    return jax.lax.fori_loop(0, 8, body, x)

  for dt, want in ((jnp.bfloat16, 3 * 256 * 256 * 4), (jnp.float32, 0)):
    ws = [jax.ShapeDtypeStruct((256, 256), dt)] * 3
    compiled = jax.jit(loop).lower(ws, jax.ShapeDtypeStruct((8, 256), dt)).compile()
    assert memory.cpu_upcast_gb(compiled) * 1e9 == want, dt


def test_scanned_decoder_carries_per_layer_states(params):
  # prefill + decode_step thread a KV cache through the scanned stack: same logits, same cache.
  tok, valid = _batch()
  pos, m = masks.positions_from_valid(valid), masks.causal_mask(valid)
  scfg = CFG.replace(scan_layers=True, remat="full")
  sp = dec.stack_layers(params)
  outs = []
  for c, p in ((CFG, params), (scfg, sp)):
    last, cache = dec.prefill(p, c, tok[:, :8], pos[:, :8], m[:, :8, :8],
                              dec.init_cache(c, 3, 12))
    kv_mask = jnp.broadcast_to(valid[:, None, :], (3, 1, 12)) & (jnp.arange(12) <= 8)
    lg, cache = dec.decode_step(p, c, tok[:, 8:9], pos[:, 8:9], cache, 8, kv_mask)
    outs.append((last, lg, cache))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), outs[0], outs[1])


def test_remat_is_checked():
  with pytest.raises(ValueError, match="remat='some'"):
    CFG.replace(remat="some")
