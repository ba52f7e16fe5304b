"""The flash attention kernel against the float64 dense softmax reference, on one device.

bfloat16 through this kernel is tested in tests/sequence_parallel/test_lasp2h.py (one compile less).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax.kernels.attention import block_classes, flash_attention, pick_block
from tests.references import f64, rel_err, softmax_attention

TOL = 2e-4


def make_inputs(*, b=2, nq=48, nk=64, h=4, hkv=2, d=8, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, nq, h, d), dtype)
  k = jax.random.normal(ks[1], (b, nk, hkv, d), dtype)
  v = jax.random.normal(ks[2], (b, nk, hkv, d), dtype)
  do = jax.random.normal(ks[3], (b, nq, h, d), jnp.float32)
  return q, k, v, do


def reference(q, k, v, do, **kw):
  """Float64 output and (dq, dk, dv) of sum(o * do)."""
  def run(q, k, v, do):
    def loss(q, k, v):
      o = softmax_attention(q, k, v, **kw)
      return jnp.sum(o * do), o
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)[::-1]
  return f64(jax.jit(run), q, k, v, do)


def ours(q, k, v, do, **kw):
  def run(q, k, v):
    def loss(q, k, v):
      o = flash_attention(q, k, v, **kw)
      return jnp.sum(o.astype(jnp.float32) * do), o
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)[::-1]
  return jax.jit(run)(q, k, v)


def check(got, want, tol):
  (o, grads), (o_ref, grads_ref) = got, want
  assert rel_err(o, o_ref) < tol, ("o", rel_err(o, o_ref))
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert rel_err(g, g_ref) < tol, (f"d{name}", rel_err(g, g_ref))


@pytest.mark.parametrize("causal", [True, False])
def test_positions_segments_gqa(causal):
  # Permuted key positions (as a gathered zigzag sequence has), queries at a subset of them, GQA,
  # packed documents, tiles that straddle the diagonal and document boundaries.
  q, k, v, do = make_inputs()
  rng = np.random.default_rng(0)
  kv_pos = jnp.asarray(np.concatenate([np.arange(32, 64), np.arange(0, 32)]), jnp.int32)
  q_pos = kv_pos[8:56]
  seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, 64)), axis=1), jnp.int32)
  kv_seg = seg[:, np.asarray(kv_pos)]
  q_seg = kv_seg[:, 8:56]
  kw = dict(causal=causal, scale=0.3)
  got = ours(q, k, v, do, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
             kv_segment_ids=kv_seg, block_q=8, block_k=16, **kw)
  want = reference(q, k, v, do, q_positions=q_pos, kv_positions=kv_pos,
                   segment_ids=(q_seg, kv_seg), **kw)
  check(got, want, TOL)


def test_defaults_self_attention_mha():
  # scale=None is D**-0.5, positions default to arange, automatic tile sizes.
  q, k, v, do = make_inputs(nq=64, hkv=4)
  check(ours(q, k, v, do), reference(q, k, v, do, causal=True), TOL)


def test_rows_without_visible_keys_are_zero_not_nan():
  q, k, v, do = make_inputs(nq=16, nk=16)
  q_pos = jnp.arange(16, dtype=jnp.int32)
  kv_pos = q_pos + 8  # the first 8 queries precede every key
  o, grads = ours(q, k, v, do, q_positions=q_pos, kv_positions=kv_pos, block_q=4, block_k=4)
  want = reference(q, k, v, do, q_positions=q_pos, kv_positions=kv_pos)
  assert all(np.isfinite(np.asarray(x)).all() for x in (o, *grads))
  assert np.all(np.asarray(o)[:, :8] == 0) and np.all(np.asarray(grads[0])[:, :8] == 0)
  check((o, grads), want, TOL)


def test_block_classes_match_the_dense_mask():
  # Skipped tiles (0) must have no visible entry; unmasked tiles (2) must be fully visible.
  rng = np.random.default_rng(1)
  q_pos = rng.permutation(64)[:32]
  kv_pos = rng.permutation(64)
  q_seg = np.sort(rng.integers(0, 3, (2, 32)), axis=1)
  kv_seg = np.sort(rng.integers(0, 3, (2, 64)), axis=1)
  for seg in (False, True):
    cls = block_classes(q_pos, kv_pos, 8, 16, causal=True, q_segment_ids=q_seg if seg else None,
                        kv_segment_ids=kv_seg if seg else None, xp=np)
    vis = (q_pos[:, None] >= kv_pos[None, :])[None]
    if seg:
      vis = vis & (q_seg[:, :, None] == kv_seg[:, None, :])
    tiles = vis.reshape(vis.shape[0], 4, 8, 4, 16)
    any_vis = tiles.any(axis=(0, 2, 4))
    all_vis = tiles.all(axis=(0, 2, 4))
    assert not np.any((cls == 0) & any_vis)
    assert not np.any((cls == 2) & ~all_vis)
  # Sorted positions: the skip rule is exact.
  cls = block_classes(np.arange(32), np.arange(32), 8, 8, causal=True, xp=np)
  np.testing.assert_array_equal(cls, np.tril(np.ones((4, 4), int)) + np.tril(np.ones((4, 4)), -1))


@pytest.mark.parametrize("bad, match", [
    (dict(k=jnp.zeros((2, 64, 3, 8)), v=jnp.zeros((2, 64, 3, 8))),
     "H=4 must be a multiple of key/value heads Hkv=3"),
    (dict(v=jnp.zeros((2, 64, 2, 4))), "k and v must have the same shape"),
    (dict(q=jnp.zeros((2, 48, 4))), r"q must have shape \(B, N, H, D\)"),
    (dict(q_segment_ids=jnp.zeros((2, 48), jnp.int32)), "must be given together"),
    (dict(q_segment_ids=jnp.zeros((2, 48)), kv_segment_ids=jnp.zeros((2, 64))),
     "q_segment_ids must be an integer array"),
    (dict(q_segment_ids=jnp.zeros((2, 47), jnp.int32),
          kv_segment_ids=jnp.zeros((2, 64), jnp.int32)), r"q_segment_ids must have shape"),
    (dict(q_positions=jnp.arange(47)), r"q_positions must have shape \(48,\)"),
    (dict(block_q=7), "block_q=7 does not divide the sequence length 48"),
    (dict(block_k=0), "block_k must be a positive int, got 0"),
    (dict(block_q=-4), "block_q must be a positive int, got -4"),
    # Empty sequences, heads or head dims used to raise ZeroDivisionError.
    (dict(q=jnp.zeros((2, 0, 4, 8)), k=jnp.zeros((2, 0, 2, 8)), v=jnp.zeros((2, 0, 2, 8))),
     r"q must have N, H, D > 0, got shape \(2, 0, 4, 8\)"),
    (dict(k=jnp.zeros((2, 0, 2, 8)), v=jnp.zeros((2, 0, 2, 8))),
     r"k must have N, H, D > 0, got shape \(2, 0, 2, 8\)"),
    (dict(q=jnp.zeros((2, 48, 0, 8)), k=jnp.zeros((2, 64, 0, 8)), v=jnp.zeros((2, 64, 0, 8))),
     r"q must have N, H, D > 0, got shape \(2, 48, 0, 8\)"),
    (dict(k=jnp.zeros((2, 64, 0, 8)), v=jnp.zeros((2, 64, 0, 8))),
     r"k must have N, H, D > 0, got shape \(2, 64, 0, 8\)"),
    (dict(q=jnp.zeros((2, 48, 4, 0)), k=jnp.zeros((2, 64, 2, 0)), v=jnp.zeros((2, 64, 2, 0))),
     r"q must have N, H, D > 0, got shape \(2, 48, 4, 0\)"),
    # int64 ids cannot be held with x64 off: 2**32 would become 0, merging two documents.
    (dict(q_segment_ids=np.zeros((2, 48), np.int64),
          kv_segment_ids=np.full((2, 64), 2 ** 32, np.int64)),
     "kv_segment_ids .* int32 range .* got max 4294967296"),
    # uint32 with int32 needs int64: 2**31 and -2**31 would both become -2**31.
    (dict(q_segment_ids=np.full((2, 48), 2 ** 31, np.uint32),
          kv_segment_ids=np.full((2, 64), -2 ** 31, np.int32)),
     "q_segment_ids .* int32 range .* got max 2147483648"),
])
def test_bad_input(bad, match):
  q, k, v, _ = make_inputs()
  args = dict(q=q, k=k, v=v)
  args.update(bad)
  with pytest.raises((ValueError, TypeError), match=match):
    flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_pick_block_rejects_non_positive_sizes():
  assert pick_block(600) == 300 and pick_block(48) == 48
  with pytest.raises(ValueError, match="n must be a positive int, got 0"):
    pick_block(0)
  with pytest.raises(ValueError, match="target must be a positive int, got -5"):
    pick_block(600, -5)


def test_segment_ids_wider_than_int32_keep_their_width():
  # With x64 on, int64 ids 0 and 2**32 are two documents (a cast to int32 made both 0).
  q, k, v, _ = make_inputs(nq=32, nk=32)
  labels = np.repeat(np.arange(2), 16)[None].repeat(2, axis=0)
  run = jax.jit(lambda s: flash_attention(q, k, v, q_segment_ids=s, kv_segment_ids=s, block_q=8,
                                          block_k=8))
  want = run(jnp.asarray(labels, jnp.int32))
  with jax.enable_x64(True):
    got = run(jnp.asarray(labels * 2 ** 32, jnp.int64))  # traced ids keep their dtype
  # x64 mode may change float rounding a little, never a document's mask.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
