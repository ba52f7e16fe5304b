"""Independent float64 references for the building blocks and layers that had none: RMSNorm,
SwiGLU, RoPE, the softmax-attention layer (RoPE + GQA + causal + documents) and every
diagonal-decay linear-attention layer (gates, feature maps, Based/ReBased).

Each reference is written here from the formulas in the modules' docstrings, in float64 numpy /
jnp, from the module's own parameters; it shares no code with the library. The recurrence itself
is ``tests.references.linear_recurrence``; Based and ReBased are checked against their dense
kernel form (``1 + s + s^2/2`` and ``(q~ . k~)^2``), which does not go through the feature maps.
Parameters initialised to constants (norm gains, ReBased's gamma/beta, GLA biases) are redrawn
at random so that a layer ignoring one of them fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lasp_jax import models
from lasp_jax.models import layers
from lasp_jax.models import linear_attention as la
from lasp_jax.models import softmax_attention as sa
from lasp_jax.models.sharding_rules import make_context
from tests import references as refs
from tests.references import rel_err

TOL = 1e-4  # float32 layer against float64: rounding only


def _params(module):
  """``{name: array}`` of a module's parameters (last path element)."""
  return {path[-1]: v[...] for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _randomize(module, names, key, *, loc=0.0, scale=0.5):
  """Redraws the named parameters ``loc + scale * normal`` (constant inits hide wiring bugs)."""
  for i, name in enumerate(names):
    p = getattr(module, name)
    p[...] = (loc + scale * jax.random.normal(jax.random.fold_in(key, i), p.shape)).astype(p.dtype)


def _np(x):
  return np.asarray(x, np.float64)


def _silu(x):
  return x / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------------------------
# RMSNorm, SwiGLU, RoPE.

def _rms_norm_ref(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def test_rms_norm_matches_float64():
  norm = layers.RMSNorm(16, eps=1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  _randomize(norm, ["weight"], jax.random.key(1), loc=1.0)
  x = 3.0 * jax.random.normal(jax.random.key(2), (2, 5, 16)) + 0.5
  cfg = models.get_config("tiny")
  got = norm(x, make_context(cfg))
  want = _rms_norm_ref(_np(x), _np(norm.weight[...]), 1e-5)
  assert rel_err(got, want) < 1e-6
  # Tiny inputs: the eps matters (|x|^2 ~ eps), so a misplaced eps shows.
  small = 1e-3 * x
  want = _rms_norm_ref(_np(small), _np(norm.weight[...]), 1e-5)
  assert rel_err(norm(small, make_context(cfg)), want) < 1e-6


def test_zero_centered_rms_norm_matches_float64():
  """Qwen3.5's norm: the weight is an offset from one (zeros at init: the identity gain)."""
  norm = layers.RMSNorm(16, eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0), zero_centered=True)
  assert not np.any(_np(norm.weight[...]))
  _randomize(norm, ["weight"], jax.random.key(1), loc=0.0)
  x = 3.0 * jax.random.normal(jax.random.key(2), (2, 5, 16)) + 0.5
  got = norm(x, make_context(models.get_config("tiny")))
  assert rel_err(got, _rms_norm_ref(_np(x), 1.0 + _np(norm.weight[...]), 1e-6)) < 1e-6


def test_swiglu_matches_float64_forward_and_grads():
  mlp = layers.SwiGLU(16, 24, std=0.3, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 5, 16))
  ctx = make_context(models.get_config("tiny"))
  p = _params(mlp)

  def ref(x, w_gate, w_up, w_down):
    gate, up = x @ w_gate, x @ w_up
    return (gate * jax.nn.sigmoid(gate) * up) @ w_down

  got = mlp(x, ctx)
  want = refs.f64(ref, x, p["w_gate"], p["w_up"], p["w_down"])
  assert rel_err(got, want) < 1e-6
  # A numpy forward too (not jax.nn): silu(g) = g sigmoid(g).
  xn = _np(x)
  gate = xn @ _np(p["w_gate"])
  want_np = (_silu(gate) * (xn @ _np(p["w_up"]))) @ _np(p["w_down"])
  assert rel_err(got, want_np) < 1e-6

  ct = jax.random.normal(jax.random.key(4), got.shape)

  graphdef, state = nnx.split(mlp)

  def loss_layer(x, state):
    return jnp.sum(nnx.merge(graphdef, state)(x, ctx) * ct)

  gx, gp = jax.grad(loss_layer, argnums=(0, 1))(x, state)
  want_g = refs.f64(jax.grad(lambda x, a, b, c, ct: jnp.sum(ref(x, a, b, c) * ct),
                             argnums=(0, 1, 2, 3)),
                    x, p["w_gate"], p["w_up"], p["w_down"], ct)
  gp = _params_of_state(gp)
  for got_g, want_gi in zip((gx, gp["w_gate"], gp["w_up"], gp["w_down"]), want_g):
    assert rel_err(got_g, want_gi) < 1e-5


def _params_of_state(state):
  return {path[-1]: v[...] for path, v in nnx.to_flat_state(state)}


def _rope_ref(x, positions, base):
  """Half-split RoPE in float64 numpy, via complex numbers: channel pair ``(i, i + D/2)`` is
  ``z = x_i + 1j x_{i+D/2}``, multiplied by ``exp(1j p base**(-2i/D))``."""
  x = _np(x)
  d = x.shape[-1]
  z = x[..., : d // 2] + 1j * x[..., d // 2:]
  theta = float(base) ** (-2.0 * np.arange(d // 2) / d)
  pos = _np(positions)
  ang = pos[..., None] * theta                                 # (N, F) or (B, N, F)
  rot = np.exp(1j * ang)
  rot = rot[None, :, None, :] if pos.ndim == 1 else rot[:, :, None, :]
  z = z * rot
  return np.concatenate([z.real, z.imag], -1)


@pytest.mark.parametrize("batched_positions", [False, True])
def test_apply_rope_matches_float64(batched_positions):
  x = jax.random.normal(jax.random.key(5), (2, 12, 3, 8))
  if batched_positions:   # positions within packed documents, one row per sequence
    pos = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], list(range(7, 19))], jnp.int32)
  else:
    pos = jnp.arange(12, dtype=jnp.int32) * 3 + 1
  got = layers.apply_rope(x, pos, 10000.0)
  assert rel_err(got, _rope_ref(x, pos, 10000.0)) < 1e-5
  # Relative property of the reference itself: rotated q.k depends on the offset only.
  q = _rope_ref(x[:, :1], np.array([5]), 10000.0)
  k = _rope_ref(x[:, 1:2], np.array([2]), 10000.0)
  q2 = _rope_ref(x[:, :1], np.array([13]), 10000.0)
  k2 = _rope_ref(x[:, 1:2], np.array([10]), 10000.0)
  np.testing.assert_allclose(np.sum(q * k, -1), np.sum(q2 * k2, -1), rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# The softmax-attention layer: projections, RoPE at true positions, GQA, causal (and documents).

def _softmax_layer_ref(x, w_q, w_k, w_v, w_o, *, positions, base, segment_ids=None):
  """``y = softmax(RoPE(x W_q) RoPE(x W_k)^T / sqrt(D) + mask) (x W_v) W_o``, GQA: query head
  ``h`` reads key/value head ``h // (H / Hkv)``."""
  q = jnp.einsum("bnd,dhk->bnhk", x, w_q)
  k = jnp.einsum("bnd,dhk->bnhk", x, w_k)
  v = jnp.einsum("bnd,dhk->bnhk", x, w_v)
  q, k = _rope_jnp(q, positions, base), _rope_jnp(k, positions, base)
  o = refs.softmax_attention(q, k, v, causal=True, segment_ids=segment_ids)
  return jnp.einsum("bnhk,hkd->bnd", o, w_o)


def _rope_jnp(x, positions, base):
  """The complex-number RoPE of ``_rope_ref`` in jnp (differentiable), for the layer reference."""
  d = x.shape[-1]
  theta = base ** (-2.0 * jnp.arange(d // 2, dtype=x.dtype) / d)
  ang = positions.astype(x.dtype)[..., None] * theta
  ang = ang[None, :, None, :] if positions.ndim == 1 else ang[:, :, None, :]
  re, im = x[..., : d // 2], x[..., d // 2:]
  c, s = jnp.cos(ang), jnp.sin(ang)
  return jnp.concatenate([re * c - im * s, re * s + im * c], -1)


def _softmax_cfg():
  # GQA 4 query heads over 2 kv heads; a small RoPE base so that every frequency turns.
  return models.get_config("tiny_hybrid", rope_base=1000.0, init_std=0.3)


@pytest.mark.parametrize("packed", [pytest.param(False, marks=pytest.mark.slow), True])
def test_softmax_layer_matches_float64(packed):
  cfg = _softmax_cfg()
  assert cfg.num_heads == 4 and cfg.kv_heads == 2
  layer = sa.SoftmaxAttention(cfg, 3, rngs=nnx.Rngs(params=7))
  n = 24
  x = jax.random.normal(jax.random.key(8), (2, n, cfg.d_model))
  ctx = make_context(cfg)
  if packed:
    seg = jnp.asarray([[0] * 10 + [1] * 9 + [2] * 5, [4] * 3 + [5] * 21], jnp.int32)
    pos = layers._positions_in_documents(seg)
    # The positions within documents, written out: a wrong start would shift RoPE.
    want_pos = np.array([list(range(10)) + list(range(9)) + list(range(5)),
                         list(range(3)) + list(range(21))])
    np.testing.assert_array_equal(np.asarray(pos), want_pos)
  else:
    seg, pos = None, jnp.arange(n, dtype=jnp.int32)
  got = layer(x, ctx, pos, seg)
  p = _params(layer)
  ws = (p["w_q"], p["w_k"], p["w_v"], p["w_o"])

  def ref(x, w_q, w_k, w_v, w_o, pos, seg):
    return _softmax_layer_ref(x, w_q, w_k, w_v, w_o, positions=pos, base=cfg.softmax.rope_base,
                              segment_ids=seg)

  want = refs.f64(ref, x, *ws, pos, seg)
  assert rel_err(got, want) < TOL

  # Gradients (inputs and all four weights) against float64 autodiff of the reference.
  ct = jax.random.normal(jax.random.key(9), got.shape)

  graphdef, state = nnx.split(layer)

  def loss_layer(x, state):
    return jnp.sum(nnx.merge(graphdef, state)(x, ctx, pos, seg) * ct)

  gx, gs = jax.grad(loss_layer, argnums=(0, 1))(x, state)
  gs = _params_of_state(gs)
  want_g = refs.f64(jax.grad(lambda x, a, b, c, d, ct, pos, seg:
                             jnp.sum(ref(x, a, b, c, d, pos, seg) * ct), argnums=(0, 1, 2, 3, 4)),
                    x, *ws, ct, pos, seg)
  for got_g, want_gi in zip((gx, gs["w_q"], gs["w_k"], gs["w_v"], gs["w_o"]), want_g):
    assert rel_err(got_g, want_gi) < TOL


# ----------------------------------------------------------------------------------------------
# The diagonal-decay linear-attention layers.

def _alibi_slopes_ref(h):
  """Press et al.: ``2**(-8 (i+1) / h)`` for a power of two; else those of the nearest smaller
  power of two ``m``, then the first ``h - m`` of the slopes ``2**(-8 (2i+1) / 2m)``."""
  m = 2 ** int(np.floor(np.log2(h)))
  slopes = [2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]
  slopes += [2.0 ** (-8.0 * (2 * i + 1) / (2 * m)) for i in range(h - m)]
  return np.array(slopes)


def _log_decay_ref(p, x, cfg, layer_idx):
  """``g`` of the variant in float64 (``LinearAttention``'s docstring), from the parameters."""
  v, h = cfg.linear.variant, cfg.num_heads
  if v == "lightning":
    depth = 1.0 - layer_idx / (cfg.num_layers - 1) + 1e-5
    return jnp.asarray(-_alibi_slopes_ref(h) * depth)
  if v == "retention":
    return jnp.asarray(np.log(1.0 - 2.0 ** (-5.0 - np.arange(h))))
  if v == "gla":
    logit = jnp.einsum("bnd,dr,rhk->bnhk", x, p["w_g1"], p["w_g2"]) + p["b_g"]
    return -jax.nn.softplus(-logit) / cfg.linear.gate_normalizer     # logsigmoid = -softplus(-x)
  if v == "simple_gla":
    logit = jnp.einsum("bnd,dh->bnh", x, p["w_g"]) + p["b_g"]
    return -jax.nn.softplus(-logit) / cfg.linear.gate_normalizer
  return None


def _phi_ref(x, name):
  if name == "identity":
    return x
  if name == "swish":
    return x * jax.nn.sigmoid(x)
  if name == "relu":
    return jnp.maximum(x, 0.0)
  if name == "elu_plus_one":
    return jnp.where(x > 0, x + 1.0, jnp.exp(x))
  raise AssertionError(name)


def _dense_normalised(q, k, v, kernel):
  """``o_i = sum_{j<=i} K(q_i, k_j) v_j / (sum_{j<=i} K(q_i, k_j) + 1e-6)`` with ``K`` applied
  to the dot products ``s_ij = q_i . k_j`` per head."""
  n = q.shape[1]
  s = kernel(jnp.einsum("bihf,bjhf->bhij", q, k))
  s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, 0.0)
  num = jnp.einsum("bhij,bjhv->bihv", s, v)
  den = jnp.einsum("bhij->bih", s)[..., None]
  return num / (den + 1e-6)


def _linear_layer_ref(p, x, cfg, layer_idx):
  """The diagonal-decay ``LinearAttention`` block in float64 from its parameters ``p``."""
  bsz, n, _ = x.shape
  h, dh, v = cfg.num_heads, cfg.dim_per_head, cfg.linear.variant

  def proj(w):
    return jnp.einsum("bnd,dhk->bnhk", x, w)

  def conv(y, w):
    out = refs.causal_conv1d(y.reshape(bsz, n, -1), w.reshape(w.shape[0], -1), activation="silu")
    return out.reshape(bsz, n, h, -1)

  q, k, val = (proj(p[f"w_{c}"]) for c in "qkv")
  if cfg.linear.short_conv:
    q, k, val = (conv(y, p[f"conv_{c}"]) for y, c in zip((q, k, val), "qkv"))
  if v in ("based", "rebased"):
    q = q / jnp.sqrt(q.shape[-1])
    if v == "based":
      o = _dense_normalised(q, k, val, lambda s: 1.0 + s + 0.5 * s * s)
    else:
      def ln(y):
        mu = jnp.mean(y, -1, keepdims=True)
        var = jnp.mean((y - mu) ** 2, -1, keepdims=True)
        return (y - mu) / jnp.sqrt(var + 1e-5) * p["fm_gamma"] + p["fm_beta"]
      o = _dense_normalised(ln(q), ln(k), val, lambda s: s * s)
  else:
    q, k = _phi_ref(q, cfg.linear.feature_map), _phi_ref(k, cfg.linear.feature_map)
    g = _log_decay_ref(p, x, cfg, layer_idx)
    o, _ = refs.linear_recurrence(q, k, val, g, scale=dh ** -0.5)
  o = o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + cfg.norm.eps) * p["o_norm"]
  gate = jnp.einsum("bnd,dhk->bnhk", x, p["w_og"])
  o = o * gate * jax.nn.sigmoid(gate)
  return jnp.einsum("bnhk,hkd->bnd", o, p["w_o"])


# (variant, feature_map, short_conv, num_heads): every diagonal variant, every feature map
# (identity, relu, elu_plus_one run nowhere else), with and without the short conv, and a head
# count that is not a power of two for Lightning's ALiBi slopes.
LINEAR_CASES = [
    ("basic", "identity", 0, 4),
    ("basic", "swish", 4, 4),
    ("basic", "relu", 0, 4),
    ("basic", "elu_plus_one", 4, 4),
    ("lightning", "swish", 4, 4),
    ("lightning", "elu_plus_one", 0, 6),
    ("retention", "swish", 4, 4),
    ("retention", "identity", 0, 4),
    ("gla", "swish", 4, 4),
    ("gla", "relu", 0, 4),
    ("simple_gla", "swish", 4, 4),
    ("simple_gla", "elu_plus_one", 0, 4),
    ("based", "swish", 4, 4),
    ("based", "swish", 0, 4),
    ("rebased", "swish", 4, 4),
    ("rebased", "swish", 0, 4),
]

# Parameters whose init is a constant: redrawn so that the layer must use them.
_CONSTANT_INITS = {"o_norm": 1.0, "fm_gamma": 1.0, "fm_beta": 0.0, "b_g": 0.0}


def _linear_layer(variant, fmap, short_conv, heads, layer_idx=1):
  # 3 layers so that Lightning's depth factor at layer 1 is 1/2 + 1e-5 (not 1 or ~0).
  cfg = models.get_config("tiny", linear_variant=variant, feature_map=fmap, short_conv=short_conv,
                          num_heads=heads, head_dim=8, num_layers=3, init_std=0.3,
                          gate_normalizer=4.0)
  layer = la.LinearAttention(cfg, layer_idx, rngs=nnx.Rngs(params=11))
  for i, (name, loc) in enumerate(_CONSTANT_INITS.items()):
    if hasattr(layer, name):
      _randomize(layer, [name], jax.random.key(20 + i), loc=loc, scale=0.5)
  return cfg, layer


@pytest.mark.parametrize("variant,fmap,short_conv,heads", LINEAR_CASES)
def test_linear_layer_matches_float64(variant, fmap, short_conv, heads):
  cfg, layer = _linear_layer(variant, fmap, short_conv, heads)
  x = jax.random.normal(jax.random.key(12), (2, 32, cfg.d_model))
  got = layer(x, make_context(cfg))
  p = _params(layer)
  want = refs.f64(lambda x, **p: _linear_layer_ref(p, x, cfg, 1), x, **p)
  assert rel_err(got, want) < TOL
  # The decay is not trivially 1 where the variant has one (a zeroed gate would pass otherwise).
  g = refs.f64(lambda x, **p: _log_decay_ref(p, x, cfg, 1), x, **p)
  if variant in ("lightning", "retention", "gla", "simple_gla"):
    assert np.max(np.abs(g)) > 1e-2


@pytest.mark.parametrize("variant,fmap,short_conv", [
    ("gla", "relu", 0), ("based", "swish", 0), ("rebased", "swish", 0),
    ("lightning", "elu_plus_one", 0),
    pytest.param("gla", "swish", 4, marks=pytest.mark.slow),   # + the conv's gradients: ~12 s
    pytest.param("simple_gla", "identity", 4, marks=pytest.mark.slow)])
def test_linear_layer_grads_match_float64(variant, fmap, short_conv):
  cfg, layer = _linear_layer(variant, fmap, short_conv, 4)
  x = jax.random.normal(jax.random.key(13), (1, 16, cfg.d_model))
  errs = _grad_errors(cfg, layer, x)
  assert errs.pop("x") < TOL
  for name, err in errs.items():
    assert err < 2 * TOL, name


def _grad_errors(cfg, layer, x):
  """``{"x" or parameter name: rel_err}`` of the layer's gradients (of ``sum(y * ct)``, ``ct``
  random) against those of ``_linear_layer_ref`` in float64."""
  ctx = make_context(cfg)
  ct = jax.random.normal(jax.random.key(14), x.shape)
  graphdef, state = nnx.split(layer)

  def loss_layer(x, state):
    return jnp.sum(nnx.merge(graphdef, state)(x, ctx) * ct)

  gx, gs = jax.grad(loss_layer, argnums=(0, 1))(x, state)
  gs = _params_of_state(gs)
  p = _params(layer)
  names = sorted(p)
  want = refs.f64(
      jax.grad(lambda x, ct, *ps: jnp.sum(_linear_layer_ref(dict(zip(names, ps)), x, cfg, 1) * ct),
               argnums=(0,) + tuple(range(2, 2 + len(names)))), x, ct, *[p[k] for k in names])
  return {"x": rel_err(gx, want[0]),
          **{name: rel_err(gs[name], want_g) for name, want_g in zip(names, want[1:])}}


def _rebased_qk_ref(p, x_D, head, f):
  """ReBased's ``q~, k~`` of one token and head in float64 (no short conv), from the parameters."""
  def ln(y):
    mu = np.mean(y)
    return (y - mu) / np.sqrt(np.mean((y - mu) ** 2) + 1e-5) * p["fm_gamma"][head] + \
        p["fm_beta"][head]
  return ln(x_D @ p["w_q"][:, head] / np.sqrt(f)), ln(x_D @ p["w_k"][:, head])


def test_rebased_tiny_normaliser_grads_match_float64():
  """Token 1's normaliser ``(q~1.k~0)^2 + (q~1.k~1)^2`` at 3e-6 (x_1 solved for both scores at
  ``sqrt(1.5e-6)``, q~1 nearly orthogonal to both keys): the output is the two values weighted
  by the ratio of the scores. Scored as a float32 dot of the F^2 features (each score's error
  ~eps / cos^2) the gradients were off by 1.6e-2 (x), 2.5e-2 (fm_gamma); squaring ``q~ . k~``
  (``scores="square"``) gives 4.4e-5 and 6e-5, the float32 rounding of q~, k~ themselves. (A
  first token alone is harmless: its output is v_0 times a factor that the RMSNorm removes.)"""
  cfg, layer = _linear_layer("rebased", "swish", 0, 4)
  p = {name: np.asarray(v, np.float64) for name, v in _params(layer).items()}
  f = cfg.linear.feature_dim
  x = np.array(jax.random.normal(jax.random.key(13), (1, 16, cfg.d_model)), np.float64)
  k0 = _rebased_qk_ref(p, x[0, 0], 0, f)[1]
  score = np.sqrt(1.5e-6)

  def residual(x1):
    q1, k1 = _rebased_qk_ref(p, x1, 0, f)
    return np.array([q1 @ k0 - score, q1 @ k1 - score])

  x1 = x[0, 1]
  for _ in range(20):  # Gauss-Newton (least-norm steps) on the two scores, finite differences
    r = residual(x1)
    jac = np.stack([(residual(x1 + 1e-7 * e) - r) / 1e-7 for e in np.eye(x1.size)], axis=1)
    x1 = x1 - np.linalg.lstsq(jac, r, rcond=None)[0]
  x[0, 1] = x1
  x = jnp.asarray(x, jnp.float32)
  q1, k1 = _rebased_qk_ref(p, np.asarray(x[0, 1], np.float64), 0, f)
  k0 = _rebased_qk_ref(p, np.asarray(x[0, 0], np.float64), 0, f)[1]
  normaliser = (q1 @ k0) ** 2 + (q1 @ k1) ** 2
  assert 2e-6 < normaliser < 4e-6, normaliser   # after x's rounding to float32
  errs = _grad_errors(cfg, layer, x)
  assert max(errs.values()) < 1e-3, errs
