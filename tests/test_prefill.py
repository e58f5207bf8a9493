"""The chunked prefill (models.decoder.prefill_chunked, the sampler's default) equals the dense
one-pass prefill it replaces: same cache at every slot that is ever read, same last-token logits,
same sampled tokens; on one device, on a mesh and with scanned layers; and its compiled memory
does not hold the prompt's [P, P] scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brpo.rollout import sampling as smp
from models import config, decoder as dec, masks

CFG = config.ModelConfig(vocab_size=64, d_model=192, n_layers=2, n_heads=6, n_kv_heads=2,
                         head_dim=32, mlp_dim=512, tie_embeddings=True, max_seq_len=2048)
# Left-padded to 40 slots: a full row, a one-token row and lengths in between.
LENGTHS = [40, 1, 17, 33, 8, 25]


@pytest.fixture(scope="module")
def params():
  p = dec.init_params(CFG, jax.random.PRNGKey(0))
  return jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, p)


def prompts():
  rng = np.random.default_rng(1)
  return [rng.integers(1, CFG.vocab_size, n).tolist() for n in LENGTHS]


def both(params, cfg, tokens, valid, n_new, chunk, block):
  """(dense, chunked) prefill of the same rows: (logits [B, V], cache)."""
  positions = masks.positions_from_valid(valid)
  start = jnp.argmax(valid, axis=1).astype(jnp.int32)
  b, p = tokens.shape
  dense = jax.jit(lambda pr: dec.prefill(pr, cfg, tokens, positions, masks.causal_mask(valid),
                                         dec.init_cache(cfg, b, p + n_new)))(params)
  chunked = jax.jit(lambda pr: dec.prefill_chunked(
      pr, cfg, tokens, positions, start, dec.init_cache(cfg, b, p + n_new), chunk=chunk,
      block=block))(params)
  return dense, chunked


def assert_same_cache(a: dec.KVCache, b: dec.KVCache, valid, n_new):
  """Equal at every slot a row reads (its valid prompt slots); the new slots still zero."""
  p = valid.shape[1]
  for x, y in zip(a.k + a.v, b.k + b.v):
    x, y = np.asarray(x), np.asarray(y)
    for r in range(valid.shape[0]):
      keep = np.asarray(valid[r])
      np.testing.assert_allclose(y[r][:, :p][:, keep], x[r][:, :p][:, keep], atol=2e-5, rtol=1e-5)
    assert not y[:, :, p:].any() and not x[:, :, p:].any()


@pytest.mark.parametrize("chunk,block", [(7, 8), (16, 256), (40, 16), (64, 8), (1, 4)])
def test_chunked_prefill_equals_dense(params, chunk, block):
  """Chunks that divide the prompt (16 does not: 40 = 8 + 16 + 16 with the first two
  overlapping), one chunk, a chunk longer than the prompt, one token at a time; key blocks
  smaller and larger than a chunk."""
  tokens, valid = smp.pad_prompts(prompts(), 0, 40)
  (l1, c1), (l2, c2) = both(params, CFG, tokens, valid, 5, chunk, block)
  np.testing.assert_allclose(l2, l1, atol=2e-5, rtol=1e-5)
  assert_same_cache(c1, c2, valid, 5)


def test_chunked_prefill_with_scanned_layers(params):
  cfg = CFG.replace(scan_layers=True)
  tokens, valid = smp.pad_prompts(prompts(), 0, 40)
  (l1, c1), (l2, c2) = both(dec.stack_layers(params), cfg, tokens, valid, 3, 16, 8)
  np.testing.assert_allclose(l2, l1, atol=2e-5, rtol=1e-5)
  assert_same_cache(c1, c2, valid, 3)


@pytest.mark.parametrize("chunk", [8, 13])
def test_sampler_with_chunked_prefill_equals_dense(params, chunk):
  """The whole sampler: the first token (sampled from the prefill's logits) and every later one
  and their log-probs, with the prefill in chunks or in one dense pass (decode the same)."""
  tokens, valid = smp.pad_prompts(prompts(), 0, 40)
  key = smp.row_keys(jax.random.PRNGKey(3), np.arange(len(LENGTHS)))
  kw = dict(pad_id=0, write_last=True, return_state=True)
  ref, s1 = smp.sample_padded(params, CFG, tokens, valid, 12, smp.Temperature(1.0), [[63]], key,
                              **kw)
  stops = smp.stop_array([[63]])
  s0 = smp.prefill_jit(params, CFG, tokens, valid, stops, key, n_new=12,
                       strategy=smp.Temperature(1.0), pad_id=0, dense=True)
  s2 = smp.prefill_jit(params, CFG, tokens, valid, stops, key, n_new=12,
                       strategy=smp.Temperature(1.0), pad_id=0, chunk=chunk, block=8)
  np.testing.assert_array_equal(s2.tokens[:, 0], s0.tokens[:, 0])
  np.testing.assert_allclose(s2.logprobs[:, 0], s0.logprobs[:, 0], atol=1e-5)
  assert_same_cache(s0.cache, s2.cache, valid, 12)
  got, _ = smp.sample_padded(params, CFG.replace(prefill_chunk=chunk), tokens, valid, 12,
                             smp.Temperature(1.0), [[63]], key, **kw)
  dense, _ = smp.sample_padded(params, CFG, tokens, valid, 12, smp.Temperature(1.0), [[63]], key,
                               dense=True, **kw)
  for out in (got, ref):
    np.testing.assert_array_equal(out.tokens, dense.tokens)
    np.testing.assert_array_equal(out.lengths, dense.lengths)
    np.testing.assert_allclose(out.logprobs, dense.logprobs, atol=1e-5)


def test_chunked_prefill_on_a_mesh(params):
  """On the (1, 4, 2) mesh (rows over fsdp, kv heads over tensor): the chunked prefill keeps the
  cache's layout and equals the dense prefill on one device."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from brpo import rows as rows_lib
  from models import sharding as shd

  mesh = shd.make_mesh((1, 4, 2))
  sp = shd.shard_tree(params, dec.param_axes(CFG), mesh)
  rows = prompts() + prompts()[:2]
  tokens, valid = smp.pad_prompts(rows, 0, 40)
  put = lambda x: jax.device_put(x, rows_lib.row_sharding(mesh, x.shape[0], x.ndim))
  key = smp.row_keys(jax.random.PRNGKey(5), np.arange(len(rows)))
  stops = smp.stop_array([[63]])
  kw = dict(n_new=6, strategy=smp.Temperature(1.0), pad_id=0)
  ref = smp.prefill_jit(params, CFG, tokens, valid, stops, key, dense=True, **kw)
  got = smp.prefill_jit(sp, CFG, put(tokens), put(valid), stops, put(key), chunk=16, block=8,
                        mesh=mesh, **kw)
  assert got.cache.k[0].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor")), 4)
  np.testing.assert_array_equal(got.tokens[:, 0], ref.tokens[:, 0])
  np.testing.assert_allclose(got.logprobs[:, 0], ref.logprobs[:, 0], atol=1e-5)
  assert_same_cache(ref.cache, got.cache, valid, 6)


def test_chunked_prefill_memory_is_linear_in_the_prompt(params):
  """XLA's temporaries of the compiled prefill: the dense pass holds [B, H, P, P] float32 scores
  (4x from P=256 to 512), the chunked one a chunk's (its temporaries under the dense pass's, and
  growing less than 2.5x with P)."""
  b, n_new = 8, 16

  def temp_bytes(p, dense):
    tok = jax.ShapeDtypeStruct((b, p), jnp.int32)
    val = jax.ShapeDtypeStruct((b, p), jnp.bool_)
    key = jax.ShapeDtypeStruct((b, 2), jnp.uint32)
    lowered = smp.prefill_jit.lower(params, CFG, tok, val, smp.stop_array([[63]]), key,
                                    n_new=n_new, strategy=smp.Greedy(), pad_id=0, dense=dense,
                                    chunk=64, block=64)
    return lowered.compile().memory_analysis().temp_size_in_bytes

  scores = lambda p: b * CFG.n_heads * p * p * 4
  dense = {p: temp_bytes(p, True) for p in (256, 512)}
  chunked = {p: temp_bytes(p, False) for p in (256, 512)}
  assert dense[512] >= scores(512), dense  # the dense pass does hold the scores
  assert chunked[512] < scores(512) / 4 and chunked[512] < dense[512] / 4, (chunked, dense)
  assert chunked[512] < 2.5 * chunked[256], chunked


def test_prefill_chunk_is_validated():
  with pytest.raises(ValueError, match="prefill_chunk=0: must be >= 1"):
    CFG.replace(prefill_chunk=0)
