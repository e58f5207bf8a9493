"""The decoder: cached decode equals the full forward (with left padding), masks, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config, decoder as dec, masks, sharding

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
