"""The delta-rule variants (design §11): DeltaNet, Gated DeltaNet and KDA layers against a
float64 token-by-token reference, their gates' init, forward and gradients, and on 8 simulated devices ==
one device (logits and gradients, both layouts, packed documents)."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lasp_jax
from lasp_jax import models
from lasp_jax.models import linear_attention as la
from lasp_jax.models.sharding_rules import make_context
from tests import references as refs
from tests.models import test_packing as packing
from tests.models.test_model import (N, TOL, W, _config, _data, _fast_compiles,  # noqa: F401
                                     _grad, check_layouts_match_one_device)
from tests.references import rel_err

VARIANTS = models.DELTA_VARIANTS


# ----------------------------------------------------------------------------------------------
# One layer against the float64 recurrence: the block's wiring (conv, L2 norm, beta, gates, scale).

def _reference_layer(p, x, cfg):
  """The delta-rule block of ``LinearAttention`` written out in float64 from its parameters ``p``
  (a dict of arrays), for ``x (B, N, d)``."""
  bsz, n, _ = x.shape
  h, dh = cfg.num_heads, cfg.dim_per_head

  def proj(w):
    return jnp.einsum("bnd,dhk->bnhk", x, w)

  def conv(y, w):
    out = refs.causal_conv1d(y.reshape(bsz, n, -1), w.reshape(w.shape[0], -1), activation="silu")
    return out.reshape(bsz, n, h, -1)

  q, k, v = (conv(proj(p[f"w_{c}"]), p[f"conv_{c}"]) for c in "qkv")
  q = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6)
  k = k / jnp.sqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)
  beta = jax.nn.sigmoid(jnp.einsum("bnd,dh->bnh", x, p["w_b"]))
  beta = 2 * beta if cfg.linear.allow_neg_eigval else beta
  g = None
  if cfg.linear.variant == "gated_deltanet":
    logit = jnp.einsum("bnd,dh->bnh", x, p["w_g"]) + p["b_g"]
    g = -jnp.exp(p["a_log"]) * jax.nn.softplus(logit)
  elif cfg.linear.variant == "kda":
    logit = jnp.einsum("bnd,dr,rhk->bnhk", x, p["w_g1"], p["w_g2"]) + p["b_g"]
    g = -jnp.exp(p["a_log"])[:, None] * jax.nn.softplus(logit)
  o, _ = refs.delta_recurrence(q, k, v, beta, g, scale=dh ** -0.5)
  o = o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + cfg.norm.eps) * p["o_norm"]
  o = o * jax.nn.silu(jnp.einsum("bnd,dhk->bnhk", x, p["w_og"]))
  return jnp.einsum("bnhk,hkd->bnd", o, p["w_o"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("neg", [False, True])
def test_layer_matches_the_float64_recurrence(variant, neg):
  # A wide init (0.5, not 0.02): beta spreads over its range and the decays reach exp(-10) and
  # below, so that a wrong gate or a missing factor 2 shows.
  cfg = _config(variant, "L").replace(allow_neg_eigval=neg, init_std=0.5)
  layer = la.LinearAttention(cfg, 0, rngs=nnx.Rngs(params=3))
  x = jax.random.normal(jax.random.key(4), (2, 64, cfg.d_model))
  got = layer(x, make_context(cfg))
  p = {path[-1]: v[...] for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  want = refs.f64(lambda x, **p: _reference_layer(p, x, cfg), x, **p)
  assert rel_err(got, want) < 1e-4
  beta = layer._beta(x, make_context(cfg))
  assert float(jnp.max(beta)) > (1.2 if neg else 0.8) and float(jnp.min(beta)) < 0.2


@pytest.mark.parametrize("variant", ["gated_deltanet", "kda"])
def test_mamba_gate_init(variant):
  cfg = models.get_config("tiny", linear_variant=variant, num_heads=4, d_model=512)
  layer = la.LinearAttention(cfg, 0, rngs=nnx.Rngs(params=0))
  a = np.exp(np.asarray(layer.a_log[...]))
  assert layer.a_log.shape == (4,) and np.all((a >= 1) & (a <= 16))
  dt = np.asarray(jax.nn.softplus(layer.b_g[...]))
  assert layer.b_g.shape == ((4,) if variant == "gated_deltanet" else (4, 128))
  assert np.all(dt >= 1e-3 * (1 - 1e-5)) and np.all(dt <= 1e-1 * (1 + 1e-5))
  if variant == "kda":  # log-uniform: about half of the draws below the geometric middle 1e-2
    assert 0.35 < np.mean(dt < 1e-2) < 0.65
  g = layer._log_decay(jax.random.normal(jax.random.key(0), (2, 8, 512)), make_context(cfg))
  assert g.shape == ((2, 8, 4) if variant == "gated_deltanet" else (2, 8, 4, 128))
  assert bool(jnp.all(g <= 0)) and bool(jnp.all(g > -16 * 0.2))  # -A softplus(~dt): small at init


def test_l2_normalize_is_unit_norm_in_float32():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8), jnp.bfloat16) * 100
  y = la.l2_normalize(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y, np.float32), axis=-1), 1.0, rtol=1e-2)
  assert float(jnp.max(jnp.abs(la.l2_normalize(jnp.zeros((3, 8)))))) == 0.0  # eps: no NaN at 0


# ----------------------------------------------------------------------------------------------
# The model: forward and gradients, 8 devices == one device.

def _delta_config(variant, neg, pattern="L"):
  return _config(variant, pattern).replace(allow_neg_eigval=neg)


@functools.lru_cache(maxsize=None)
def _one_device(variant, neg, pattern="L"):
  graphdef, state = nnx.split(models.create_model(_delta_config(variant, neg, pattern)))
  tokens, weights = _data()
  (_, logits), grads = _grad(state, tokens, weights, graphdef)
  return graphdef, state, logits, grads


# Each variant once in each beta range between them; the Gated DeltaNet hybrid (a softmax layer).
SP_CASES = [("deltanet", False, "L"), ("gated_deltanet", True, "L"), ("kda", True, "L"),
            ("gated_deltanet", False, "LN")]


@pytest.mark.parametrize("variant, neg, pattern", SP_CASES)
def test_forward_and_grads_finite(variant, neg, pattern):
  _, _, logits, grads = _one_device(variant, neg, pattern)
  assert logits.shape == (2, N, 256) and bool(jnp.all(jnp.isfinite(logits)))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert bool(jnp.all(jnp.isfinite(g))), path
    assert float(jnp.max(jnp.abs(g))) > 0, path  # every parameter is connected


@pytest.mark.parametrize("variant, neg, pattern", [
    c if c == ("gated_deltanet", False, "LN") else pytest.param(*c, marks=pytest.mark.slow)
    for c in SP_CASES])
def test_sequence_parallel_matches_one_device(variant, neg, pattern):
  _, state, ref_logits, ref_grads = _one_device(variant, neg, pattern)
  check_layouts_match_one_device(_delta_config(variant, neg, pattern), state, ref_logits,
                                 ref_grads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
  graphdef, state, ref_logits, _ = _one_device(variant, variant != "deltanet")
  tokens, weights = _data()
  t = 77
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
  (_, logits), _ = _grad(state, changed, weights, graphdef)
  np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(ref_logits[:, :t]))
  assert float(jnp.max(jnp.abs(logits[:, t + 1:] - ref_logits[:, t + 1:]))) > 0


def test_packed_documents_on_8_devices_match_one_device():
  """Gated DeltaNet with packed documents: a document's logits do not depend on what precedes it,
  and 8 devices (zigzag) == one device, logits and gradients."""
  cfg = _delta_config("gated_deltanet", True)
  graphdef, state = nnx.split(models.create_model(cfg))
  tokens, ids = packing._packed()
  (_, ref), ref_grads = packing._forward_jit(state, tokens, ids, packing._weights(), graphdef)
  packing._check_invariant(ref)
  zcfg = cfg.replace(layout="zigzag")
  zdef = nnx.graphdef(nnx.eval_shape(lambda: models.LinearLlama(zcfg, rngs=nnx.Rngs(0))))
  zz = lambda x: lasp_jax.zigzag(x, W)  # noqa: E731
  with jax.set_mesh(jax.make_mesh((W,), ("sp",))):
    (_, logits), grads = packing._forward_jit(state, zz(tokens), zz(ids), zz(packing._weights()),
                                              zdef)
  logits = lasp_jax.unzigzag(logits, W)
  assert rel_err(logits, ref) < TOL
  errs = jax.tree.map(rel_err, grads, ref_grads)
  assert max(jax.tree.leaves(errs)) < TOL, errs


def test_new_parameters_shard_by_the_rules():
  cfg = _config("kda", "L")
  mesh = jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "sp"))  # Explicit axes: shardings must agree
  abstract = nnx.eval_shape(lambda: models.LinearLlama(cfg, rngs=nnx.Rngs(0)))
  shardings = models.param_shardings(abstract, mesh)
  got = {path[-1]: tuple(s.spec) for path, s in nnx.to_flat_state(shardings)
         if path[:3] == ("layers", 0, "attn")}
  assert got["w_b"] == ("fsdp", "tensor")        # (embed, q_heads)
  assert got["w_g1"] == ("fsdp", None)           # (embed, rank)
  assert got["w_g2"] == (None, "tensor", None)   # (rank, q_heads, head_dim)
  assert got["b_g"] == ("tensor", None)          # (q_heads, head_dim)
  assert got["a_log"] == ("tensor",)             # (q_heads,)
  # ... and the model runs on that mesh (weights gathered, per-head vectors whole at use), with
  # LASP-2 over "sp".
  model = models.create_model(cfg, mesh=mesh)
  tokens, _ = _data()
  ref = models.create_model(cfg)(tokens)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  assert rel_err(logits, ref) < TOL


# ----------------------------------------------------------------------------------------------
# Config, presets, parameter counts and FLOPs.

@pytest.mark.parametrize("changes, needle", [
    (dict(allow_neg_eigval=True), "allow_neg_eigval=True widens the delta rule's beta to [0, 2]: "
                                  "it needs a linear.variant in"),
    (dict(allow_neg_eigval=True, linear_variant="gla"), "got 'gla'"),
    (dict(allow_neg_eigval=1, linear_variant="deltanet"), "allow_neg_eigval must be a bool, got 1"),
    (dict(linear_variant="delta_net"), "'delta_net'"),
])
def test_bad_config_names_the_value(changes, needle):
  with pytest.raises(ValueError, match=re.escape(needle)):
    models.ModelConfig.from_dict(changes)


def test_presets():
  tiny = models.get_config("tiny_gdn_hybrid")
  assert tiny == models.get_config("tiny_hybrid", linear_variant="gated_deltanet")
  assert tiny.linear.short_conv == 4 and tiny.layer_kinds.count("softmax") == 1
  big = models.get_config("gated_deltanet_1b_hybrid")
  assert big == models.get_config("linear_llama3_1b_hybrid", linear_variant="gated_deltanet",
                                  short_conv=4)
  assert (big.num_layers, big.d_model, big.num_heads, big.dim_per_head, big.ffn_dim) == (
      16, 2048, 16, 128, 8192)
  assert big.layer_kinds == ("linear",) * 3 + ("softmax",) + ("linear",) * 3 + ("softmax",) + (
      "linear",) * 3 + ("softmax",) + ("linear",) * 3 + ("softmax",)


def test_flops_per_token_of_the_delta_rule():
  cfg = models.get_config("gated_deltanet_1b_hybrid")
  d, h, dh, c, s = 2048, 16, 128, cfg.runtime.chunk_size, 8192
  base = cfg.replace(linear_variant="basic")
  # Per linear layer: the gate's and beta's projections (d H each), and the core's
  # 6 Dk Dv + c (3 Dk + 2 Dv) + c^2 / 3 per head instead of 4 Dk Dv + c (Dk + Dv).
  core = h * (6 * dh * dh + c * 5 * dh + c * c / 3) - h * (4 * dh * dh + c * 2 * dh)
  want = 3 * 12 * (2 * 2 * d * h + core)
  got = models.flops_per_token(cfg, s) - models.flops_per_token(base, s)
  assert got == pytest.approx(want)
  dn = models.flops_per_token(cfg.replace(linear_variant="deltanet"), s)
  assert models.flops_per_token(cfg, s) - dn == pytest.approx(3 * 12 * 2 * d * h)  # the gate
  kda = models.flops_per_token(cfg.replace(linear_variant="kda"), s)
  assert kda - dn == pytest.approx(3 * 12 * 2 * (d * cfg.linear.gate_rank + cfg.linear.gate_rank * h * dh))
  assert math.isfinite(kda)


@pytest.mark.slow   # the exchanges are compared directly in test_exchange.py
def test_scan_exchange_model_equals_allgather_model():
  """``ModelConfig.runtime.exchange="scan"`` changes how LASP-2 combines summaries, not the logits."""
  cfg = models.get_config("tiny_gdn_hybrid").replace(layout="zigzag")
  mesh = jax.make_mesh((8,), ("sp",))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 256), 0, cfg.vocab_size)
  out = {}
  for exchange in ("allgather", "scan"):
    with jax.set_mesh(mesh):
      model = models.create_model(cfg.replace(exchange=exchange), mesh=mesh)
      out[exchange] = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
  np.testing.assert_allclose(out["scan"], out["allgather"], rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="exchange must be one of"):
    cfg.replace(exchange="ring")
