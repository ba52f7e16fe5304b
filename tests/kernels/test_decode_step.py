"""The decode-step kernels (design §14): one token of the linear recurrence (diagonal family
and delta rule) and one query over a K/V cache, against the float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax.kernels.attention import decode_attention
from lasp_jax.kernels.linear_attention import recurrent_step
from tests import references as refs
from tests.references import rel_err

B, N, H, DK, DV = 2, 12, 3, 8, 5


def _inputs(decay, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (B, N, H, DK))
  k = jax.random.normal(ks[1], (B, N, H, DK)) / np.sqrt(DK)
  v = jax.random.normal(ks[2], (B, N, H, DV))
  s0 = jax.random.normal(ks[3], (B, H, DK, DV))
  g = {None: None,
       "head": -jax.random.uniform(ks[4], (H,)),
       "token": -jax.random.uniform(ks[4], (B, N, H)),
       "channel": -jax.random.uniform(ks[4], (B, N, H, DK))}[decay]
  return q, k, v, s0, g


@jax.jit
def _run_steps(q, k, v, s0, g, beta):
  """``recurrent_step`` over the N tokens: (o (B, N, H, Dv), final state)."""
  per_token = g is not None and g.ndim > 1

  def body(s, i):
    gi = g[:, i] if per_token else g
    bi = None if beta is None else beta[:, i]
    o, s = recurrent_step(s, q[:, i], k[:, i], v[:, i], gi, beta=bi, scale=0.5)
    return s, o

  s, o = jax.lax.scan(body, s0, jnp.arange(N))
  return jnp.moveaxis(o, 0, 1), s


@pytest.mark.parametrize("decay", [None, "head", "token", "channel"])
@pytest.mark.parametrize("delta", [False, True])
def test_steps_match_the_recurrence(decay, delta):
  q, k, v, s0, g = _inputs(decay)
  beta = 2.0 * jax.random.uniform(jax.random.key(9), (B, N, H)) if delta else None
  o, s = _run_steps(q, k, v, s0, g, beta)
  if delta:
    o_ref, s_ref = refs.f64(refs.delta_recurrence, q, k, v, beta, g, scale=0.5, initial_state=s0)
  else:
    o_ref, s_ref = refs.f64(refs.linear_recurrence, q, k, v, g, scale=0.5, initial_state=s0)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_step_keeps_q_dtype_and_a_float32_state():
  q, k, v, s0, _ = _inputs(None)
  o, s = recurrent_step(s0, q[:, 0].astype(jnp.bfloat16), k[:, 0].astype(jnp.bfloat16),
                        v[:, 0].astype(jnp.bfloat16), scale=None)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  ref = s0 + k[:, 0, :, :, None].astype(jnp.bfloat16).astype(jnp.float32) * \
      v[:, 0, :, None, :].astype(jnp.bfloat16).astype(jnp.float32)
  assert rel_err(s, ref) < 1e-6


def test_step_errors_name_the_value():
  q, k, v, s0, _ = _inputs(None)
  with pytest.raises(ValueError, match=r"q must have shape \(2, 3, 8\)"):
    recurrent_step(s0, q[:, 0, :2], k[:, 0], v[:, 0])
  with pytest.raises(ValueError, match="log_decay must have shape"):
    recurrent_step(s0, q[:, 0], k[:, 0], v[:, 0], jnp.zeros((H + 1,)))
  with pytest.raises(ValueError, match=r"beta must have shape \(B, H\)=\(2, 3\)"):
    recurrent_step(s0, q[:, 0], k[:, 0], v[:, 0], beta=jnp.ones((B, N, H)))
  with pytest.raises(TypeError, match="k must be a float array"):
    recurrent_step(s0, q[:, 0], k[:, 0].astype(jnp.int32), v[:, 0])


@pytest.mark.parametrize("length", [1, 5, 9])
def test_decode_attention_matches_softmax_over_the_filled_slots(length):
  ks = jax.random.split(jax.random.key(3), 3)
  hq, hkv, d, cap = 4, 2, 8, 9
  q = jax.random.normal(ks[0], (B, hq, d))
  k = jax.random.normal(ks[1], (B, cap, hkv, d))
  v = jax.random.normal(ks[2], (B, cap, hkv, d))
  # Slots from `length` on hold junk a wrong mask would pick up.
  k = k.at[:, length:].set(30.0)
  v = v.at[:, length:].set(1e4)
  o = jax.jit(decode_attention)(q, k, v, jnp.int32(length))
  # Reference: the one query as the last position of a causal float64 softmax over the slots.
  rep = hq // hkv
  kk, vv = (jnp.repeat(x[:, :length], rep, axis=2) for x in (k, v))
  ref = refs.f64(refs.softmax_attention, q[:, None], kk, vv, causal=False)[:, 0]
  assert rel_err(o, ref) < 1e-5


def test_decode_attention_errors():
  q = jnp.zeros((B, 4, 8))
  kv = jnp.zeros((B, 6, 2, 8))
  with pytest.raises(ValueError, match=r"length must be in \[1, 6\].*got 7"):
    decode_attention(q, kv, kv, 7)
  with pytest.raises(ValueError, match="Hkv=3 key heads do not divide H=4"):
    decode_attention(q, jnp.zeros((B, 6, 3, 8)), jnp.zeros((B, 6, 3, 8)), 1)
  with pytest.raises(ValueError, match="must share B=2 and D=8"):
    decode_attention(q, jnp.zeros((B, 6, 2, 4)), jnp.zeros((B, 6, 2, 4)), 1)
