"""Mixture-of-Memories layers (``lasp_jax.models.mom``; Du et al. 2025).

- The layer against a float64 routed reference written here as the paper states it: a router
  (softmax, top-k, renormalised weights), then token by token every memory that the token is
  routed to (and the shared memory) takes one step of its recurrence and the others keep their
  state, and the output mixes the routed memories' reads. It shares nothing with the layer's
  masked form (one op call on M' times the heads, skipped tokens as identity transitions): forward
  and gradients (routing indices fixed, as by the layer's stop-gradient), a per-channel diagonal
  decay (GLA), a constant one (Lightning) and the delta rule (Gated DeltaNet). With grouped value
  heads too (forward; GLA, Gated DeltaNet): each memory's q/k-head and value-head parameters
  sliced by their own counts, q and k repeated onto the value heads as Qwen3.5 / fla do, Dk != Dv.
- On 8 simulated devices == one device (logits and gradients, both layouts; packed documents).
- Stepped decoding == the forward pass; the cache holds M' states per layer.
- Config errors, count_params / flops_per_token, the load-balancing loss in the training loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lasp_jax
from lasp_jax import models
from lasp_jax.models import mom
from lasp_jax.models.sharding_rules import make_context
from lasp_jax.train import loop
from tests import references as refs
from tests.models import test_decoding as dec
from tests.models import test_packing as packing
from tests.models.test_layer_references import _log_decay_ref, _phi_ref
from tests.models.test_model import (TOL, W, _config, _data, _fast_compiles,  # noqa: F401
                                     _grad, check_layouts_match_one_device)
from tests.references import rel_err

MOM = {"memories": 4, "memory_top_k": 2, "shared_memory": True}
# Grouped value heads (as Qwen3.5 / fla): tiny's 4 q/k heads of key_dim 6 shared by groups of 2
# of the 8 value heads of value_dim 4.
GROUPED = {"num_value_heads": 8, "key_dim": 6, "value_dim": 4}
# The axis of each per-memory parameter that holds memory m's heads ``m H .. (m + 1) H - 1``,
# with ``H`` the q/k heads (``num_heads``) for those in KEY_HEADS, else the value heads.
HEAD_AXIS = {"w_k": 1, "w_v": 1, "conv_k": 1, "conv_v": 1, "w_g": 1, "w_g2": 1, "b_g": 0,
             "a_log": 0, "w_b": 1}
KEY_HEADS = ("w_k", "conv_k")


# ----------------------------------------------------------------------------------------------
# The float64 routed reference.

def _routing_ref(x, w_router, k):
  """``(probs (B, N, M), top-k indices (B, N, k))`` in float64 numpy (argsort, not lax.top_k)."""
  logits = np.einsum("bnd,dm->bnm", np.asarray(x, np.float64), np.asarray(w_router, np.float64))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p, np.argsort(-p, axis=-1, kind="stable")[..., :k]


def _memory_params(p, m, hk, hv=None):
  """Memory ``m``'s parameters as a plain layer's (its heads of the per-memory ones): its ``hk``
  q/k heads of ``w_k, conv_k``, its ``hv`` value heads (default ``hk``) of the others."""
  hv = hk if hv is None else hv
  out = dict(p)
  for name, ax in HEAD_AXIS.items():
    if name in p:
      h = hk if name in KEY_HEADS else hv
      out[name] = jnp.take(p[name], jnp.arange(m * h, (m + 1) * h), axis=ax)
  return out


def _mom_ref(p, x, cfg, idx, layer_idx=1):
  """The MoM layer in float64 from its parameters ``p``, the top-k memories ``idx (B, N, k)``
  fixed (numpy). jnp so that gradients come from float64 autodiff.

  Heads as Qwen3.5 / fla: q and k have ``hk = num_heads`` heads of ``Dk``, v, the gates, beta,
  every memory's state and the output ``hv = linear_value_heads`` heads of ``Dv``; value head
  ``j`` reads q/k head ``j // (hv // hk)`` (``repeat_interleave``)."""
  lin = cfg.linear
  bsz, n, _ = x.shape
  hk, hv, m_routed = cfg.num_heads, cfg.linear_value_heads, lin.memories
  dv = cfg.linear_value_dim
  qk_head = np.arange(hv) // (hv // hk)          # the q/k head that value head j reads
  mp = m_routed + int(lin.shared_memory)
  delta = cfg.variant.delta
  # Router: softmax, the fixed top-k, renormalised.
  logits = jnp.einsum("bnd,dm->bnm", x, p["w_router"])
  probs = jax.nn.softmax(logits, -1)
  top = jnp.take_along_axis(probs, jnp.asarray(idx), -1)
  top = top / jnp.sum(top, -1, keepdims=True)

  def conv(y, w):
    out = refs.causal_conv1d(y.reshape(bsz, n, -1), w.reshape(w.shape[0], -1), activation="silu")
    return out.reshape(y.shape)

  def proj(w, cw):
    return conv(jnp.einsum("bnd,dhk->bnhk", x, w), cw)

  def l2(y):
    return y / jnp.sqrt(jnp.sum(y * y, -1, keepdims=True) + 1e-6)

  def on_value_heads(y):                          # (B, N, hk, Dk) -> (B, N, hv, Dk)
    return y[:, :, qk_head]

  q = proj(p["w_q"], p["conv_q"])
  q = on_value_heads(l2(q) if delta else _phi_ref(q, lin.feature_map))
  # The per-head constant decays (Lightning, RetNet) are per value head.
  gcfg = cfg if hv == hk else cfg.replace(num_heads=hv)
  mems = []   # per memory: k, g (B, N, hv, Dk), v (B, N, hv, Dv), beta (B, N, hv) or None
  for m in range(mp):
    pm = _memory_params(p, m, hk, hv)
    k, v = proj(pm["w_k"], pm["conv_k"]), proj(pm["w_v"], pm["conv_v"])
    if delta:
      k = on_value_heads(l2(k))
      beta = jax.nn.sigmoid(jnp.einsum("bnd,dh->bnh", x, pm["w_b"]))
      logit = jnp.einsum("bnd,dh->bnh", x, pm["w_g"]) + pm["b_g"]
      g = (-jnp.exp(pm["a_log"]) * jax.nn.softplus(logit))[..., None] * jnp.ones_like(k)
    else:
      k, beta = on_value_heads(_phi_ref(k, lin.feature_map)), None
      g = _log_decay_ref(pm, x, gcfg, layer_idx)
      g = jnp.broadcast_to(g if g.ndim == 4 else (g[:, None] if g.ndim == 1 else g[..., None]),
                           k.shape)
    mems.append((k, v, g, beta))
  routed = np.zeros((bsz, n, mp), bool)
  for j in range(idx.shape[-1]):
    routed[np.arange(bsz)[:, None], np.arange(n)[None], idx[..., j]] = True
  if lin.shared_memory:
    routed[..., -1] = True
  # Mixing weight of memory m at token t: its renormalised router weight, 1 for the shared one.
  weight = [jnp.sum(jnp.where(jnp.asarray(idx) == m, top, 0.0), -1) for m in range(m_routed)]
  weight += [jnp.ones((bsz, n))] * int(lin.shared_memory)
  scale = q.shape[-1] ** -0.5
  routed_j = jnp.asarray(routed)

  def step(states, t):
    out, new = 0.0, []
    for m, (s, (k, v, g, beta)) in enumerate(zip(states, mems)):
      k_t, v_t = k[:, t], v[:, t]                                     # (B, hv, Dk / Dv)
      upd = jnp.exp(g[:, t])[..., None] * s                            # decay
      if delta:
        v_t = beta[:, t][..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", upd, k_t))
      upd = upd + k_t[..., :, None] * v_t[..., None, :]                # write
      s = jnp.where(routed_j[:, t, m][:, None, None, None], upd, s)   # skip if not routed
      new.append(s)
      out = out + weight[m][:, t, None, None] * scale * jnp.einsum("bhk,bhkv->bhv", q[:, t], s)
    return new, out

  s0 = [jnp.zeros((bsz, hv, q.shape[-1], dv), x.dtype)] * mp
  _, o = jax.lax.scan(step, s0, jnp.arange(n))
  o = jnp.moveaxis(o, 0, 1)                                            # (B, N, hv, Dv)
  o = o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + cfg.norm.eps) * p["o_norm"]
  gate = jnp.einsum("bnd,dhk->bnhk", x, p["w_og"])
  o = o * gate * jax.nn.sigmoid(gate)
  return jnp.einsum("bnhk,hkd->bnd", o, p["w_o"])


def _layer(variant, **mom_kw):
  # chunk 8 over 32 tokens: 4 chunks, so skipped tokens meet chunk boundaries; 3 layers for
  # Lightning's depth factor. A wide init so that gates, beta and routing spread.
  cfg = models.get_config("tiny", linear_variant=variant, num_layers=3, init_std=0.3,
                          gate_normalizer=4.0, chunk_size=8, linear={**MOM, **mom_kw})
  layer = mom.MoMAttention(cfg, 1, rngs=nnx.Rngs(params=5))
  for i, (name, loc, scale) in enumerate((("o_norm", 1.0, 0.5), ("b_g", 0.0, 0.5),
                                          ("w_router", 0.0, 0.3))):
    if hasattr(layer, name):
      par = getattr(layer, name)
      par[...] = loc + scale * jax.random.normal(jax.random.key(30 + i), par.shape)
  return cfg, layer


def _params(module):
  return {path[-1]: v[...] for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _routed_input(cfg, layer, seed, shape):
  """``x`` and its float64 top-k, checked to be far from ties (the float32 layer routes alike)
  and to leave every memory some tokens and skip it at others."""
  x = jax.random.normal(jax.random.key(seed), shape)
  probs, idx = _routing_ref(x, layer.w_router[...], cfg.linear.memory_top_k)
  srt = -np.sort(-np.log(probs), -1)        # the logits' gap between the k-th and the next
  k = cfg.linear.memory_top_k
  assert np.min(srt[..., k - 1] - srt[..., k]) > 1e-3
  share = np.mean(np.any(idx[..., None] == np.arange(cfg.linear.memories), axis=-2), axis=(0, 1))
  assert np.all((share > 0.1) & (share < 0.9)), share
  return x, idx


@pytest.mark.parametrize("variant,shared,heads", [
    ("gla", True, "plain"), ("gated_deltanet", True, "plain"), ("lightning", False, "plain"),
    ("gla", True, "grouped"), ("gated_deltanet", True, "grouped")])
def test_layer_matches_the_float64_routed_reference(variant, shared, heads):
  """``grouped``: GROUPED value heads, each pair sharing a q/k head, ``Dk != Dv``."""
  grouped = heads == "grouped"
  cfg, layer = _layer(variant, shared_memory=shared, **(GROUPED if grouped else {}))
  if grouped:
    assert (cfg.num_heads, cfg.linear_value_heads, cfg.linear_key_dim,
            cfg.linear_value_dim) == (4, 8, 6, 4)
    assert layer.w_k.shape[1:] == (5 * 4, 6) and layer.w_v.shape[1:] == (5 * 8, 4)
  x, idx = _routed_input(cfg, layer, 12, (2, 32, cfg.d_model))
  ctx = make_context(cfg)
  got, (weights, written, _) = jax.jit(lambda m, x: (m(x, ctx), m.route(x, ctx)))(layer, x)
  p = _params(layer)
  want = refs.f64(lambda x, **p: _mom_ref(p, x, cfg, idx), x, **p)
  assert rel_err(got, want) < 1e-4
  # The layer's routing: the reference's memories and renormalised weights (1: the shared one).
  mp = cfg.linear.memories + shared
  assert weights.shape == written.shape == (2, 32, mp)
  assert np.array_equal(np.asarray(written[..., :4]),
                        np.any(idx[..., None] == np.arange(4), axis=-2))
  np.testing.assert_allclose(np.asarray(jnp.sum(weights, -1)), 1.0 + shared, rtol=1e-6)


@pytest.mark.parametrize("variant", ["gla", "gated_deltanet"])
def test_layer_grads_match_the_float64_routed_reference(variant):
  cfg, layer = _layer(variant)
  x, idx = _routed_input(cfg, layer, 13, (1, 16, cfg.d_model))   # 2 chunks of 8
  ctx = make_context(cfg)
  ct = jax.random.normal(jax.random.key(14), x.shape)
  graphdef, state = nnx.split(layer)
  gx, gs = jax.jit(jax.grad(lambda x, s: jnp.sum(nnx.merge(graphdef, s)(x, ctx) * ct),
                            argnums=(0, 1)))(x, state)
  gs = {path[-1]: v[...] for path, v in nnx.to_flat_state(gs)}
  p = _params(layer)
  names = sorted(p)
  want = refs.f64(jax.grad(lambda x, ct, *ps: jnp.sum(_mom_ref(dict(zip(names, ps)), x, cfg, idx)
                                                      * ct),
                           argnums=(0,) + tuple(range(2, 2 + len(names)))),
                  x, ct, *[p[k] for k in names])
  assert rel_err(gx, want[0]) < 2e-4
  for name, want_g in zip(names, want[1:]):
    assert rel_err(gs[name], want_g) < 2e-4, name
  # Each memory's own parameters and the router get a gradient (the router through the weights).
  assert float(jnp.max(jnp.abs(gs["w_router"]))) > 0
  for m in range(mom.memory_count(cfg)):
    assert float(jnp.max(jnp.abs(_memory_params(gs, m, cfg.num_heads)["w_k"]))) > 0


def test_parameters_and_initial_draws_per_memory():
  cfg, layer = _layer("gated_deltanet")
  p = _params(layer)
  plain = _params(lasp_jax.models.LinearAttention(cfg.replace(linear={"memories": 0}), 1,
                                                  rngs=nnx.Rngs(params=5)))
  mp, h = 5, cfg.num_heads
  for name, ax in HEAD_AXIS.items():
    if name in plain:
      want = list(plain[name].shape)
      want[ax] *= mp
      assert p[name].shape == tuple(want), name
  for name in ("w_q", "conv_q", "w_og", "w_o", "o_norm"):
    assert p[name].shape == plain[name].shape, name
  assert p["w_router"].shape == (cfg.d_model, cfg.linear.memories)
  # Independent draws: memories' key projections differ; Mamba's A in [1, 16] for every memory.
  ks = [_memory_params(p, m, h)["w_k"] for m in range(mp)]
  assert all(float(jnp.max(jnp.abs(ks[0] - km))) > 0 for km in ks[1:])
  a = np.exp(np.asarray(p["a_log"]))
  assert a.shape == (mp * h,) and np.all((a >= 1) & (a <= 16))


# ----------------------------------------------------------------------------------------------
# The model: 8 devices == one device; packed documents; decoding.

def _mom_config(variant, pattern, **kw):
  return _config(variant, pattern).replace(linear={**MOM, **kw})


@functools.lru_cache(maxsize=None)
def _one_device(variant, pattern):
  graphdef, state = nnx.split(models.create_model(_mom_config(variant, pattern)))
  tokens, weights = _data()
  (_, logits), grads = _grad(state, tokens, weights, graphdef)
  return graphdef, state, logits, grads


@pytest.mark.parametrize("variant, pattern", [
    ("gated_deltanet", "L"), pytest.param("gla", "LN", marks=pytest.mark.slow),
    pytest.param("simple_gla", "L", marks=pytest.mark.slow)])
def test_sequence_parallel_matches_one_device(variant, pattern):
  """Logits and every parameter's gradient (each memory's, the router's), contiguous and zigzag."""
  _, state, ref_logits, ref_grads = _one_device(variant, pattern)
  check_layouts_match_one_device(_mom_config(variant, pattern), state, ref_logits, ref_grads)


@pytest.mark.slow
def test_scan_exchange_matches_one_device():
  """The log-depth ppermute exchange of the M' H heads' summaries too."""
  _, state, ref_logits, ref_grads = _one_device("gated_deltanet", "L")
  tokens, weights = _data()
  cfg = _mom_config("gated_deltanet", "L").replace(exchange="scan")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.LinearLlama(cfg, rngs=nnx.Rngs(0))))
  with jax.set_mesh(jax.make_mesh((W,), ("sp",))):
    (_, logits), grads = _grad(state, tokens, weights, graphdef)
  assert rel_err(logits, ref_logits) < TOL
  assert max(jax.tree.leaves(jax.tree.map(rel_err, grads, ref_grads))) < TOL



def test_packed_documents_on_8_devices_match_one_device():
  """Packed documents (zigzag, 8 devices) == one device, and a document's logits do not depend
  on what precedes it (the memories restart at its first token, whatever the routing)."""
  cfg = _mom_config(packing.VARIANT, packing.PATTERN)
  graphdef, state = nnx.split(models.create_model(cfg))
  tokens, ids = packing._packed()
  wts = packing._weights()
  (_, ref), ref_grads = packing._forward_jit(state, tokens, ids, wts, graphdef)
  packing._check_invariant(ref)
  zcfg = cfg.replace(layout="zigzag")
  zgraph = nnx.graphdef(nnx.eval_shape(lambda: models.LinearLlama(zcfg, rngs=nnx.Rngs(0))))
  zz = lambda a: lasp_jax.zigzag(a, W)  # noqa: E731
  with jax.set_mesh(jax.make_mesh((W,), ("sp",))):
    (_, logits), grads = packing._forward_jit(state, zz(tokens), zz(ids), zz(wts), zgraph)
  logits = lasp_jax.unzigzag(logits, W)
  assert rel_err(logits, ref) < TOL
  assert max(jax.tree.leaves(jax.tree.map(rel_err, grads, ref_grads))) < TOL


@pytest.mark.parametrize("variant", ["gla", pytest.param("gated_deltanet",
                                                         marks=pytest.mark.slow)])
def test_stepped_decoding_matches_the_forward_pass(variant):
  cfg = dec._config(variant, "LN", linear=MOM)
  model = models.LinearLlama(cfg, rngs=nnx.Rngs(0))
  dec._check_greedy(model, dec._prompt())
  # The decode cache holds M' = 5 states per linear layer (M' H heads), the conv tails of M' H
  # key and value channels.
  _, cache = decoding_prefill(model, dec._prompt(), 40)
  lin = cache.layers[0]
  h, dk = cfg.num_heads, cfg.dim_per_head
  assert lin.state.shape == (dec.B, 5 * h, dk, dk)
  assert [c.shape[-1] for c in lin.conv] == [h * dk, 5 * h * dk, 5 * h * dk]


def decoding_prefill(model, prompt, max_len):
  return jax.jit(lambda m, t: models.prefill(m, t, max_len=max_len))(model, prompt)


@pytest.mark.slow
def test_sequence_parallel_prefill_matches_one_device():
  cfg = models.get_config("tiny_mom_hybrid", linear_variant="gla", init_std=0.2,
                          layout="zigzag")
  model = models.LinearLlama(cfg, rngs=nnx.Rngs(0))
  prompt = dec._prompt(300)
  ref_logits, ref_cache = decoding_prefill(model, prompt, 300 + dec.T)
  with jax.set_mesh(jax.make_mesh((W,), ("sp",))):
    logits, cache = decoding_prefill(model, prompt, 300 + dec.T)
  assert rel_err(logits, ref_logits) < 1e-5
  assert max(jax.tree.leaves(jax.tree.map(rel_err, cache, ref_cache))) < 1e-5


def _sharded_mesh():
  return jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "sp"))  # Explicit axes: shardings must agree


def test_parameters_shard_by_the_rules():
  """Per-memory parameters split their memory-major heads over ``tensor`` like any head; the
  router is whole (``memories`` is never split) but for ``fsdp`` on ``embed``."""
  cfg = _mom_config("gated_deltanet", "L")
  abstract = nnx.eval_shape(lambda: models.LinearLlama(cfg, rngs=nnx.Rngs(0)))
  shardings = models.param_shardings(abstract, _sharded_mesh())
  got = {path[-1]: tuple(s.spec) for path, s in nnx.to_flat_state(shardings)
         if path[:3] == ("layers", 0, "attn")}
  assert got["w_router"] == ("fsdp", None)              # (embed, memories)
  assert got["w_k"] == got["w_v"] == ("fsdp", "tensor", None)
  assert got["conv_k"] == (None, "tensor", None)
  assert got["w_b"] == got["w_g"] == ("fsdp", "tensor")
  assert got["a_log"] == got["b_g"] == ("tensor",)


@pytest.mark.slow
def test_runs_on_a_mesh_with_sharded_weights():
  cfg = _mom_config("gated_deltanet", "L").replace(layout="zigzag")
  model = models.create_model(cfg, mesh=_sharded_mesh())
  tokens, _ = _data()
  ref = models.create_model(cfg)(tokens)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(_sharded_mesh()):
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, lasp_jax.zigzag(tokens, 2))
  assert rel_err(lasp_jax.unzigzag(logits, 2), ref) < TOL


# ----------------------------------------------------------------------------------------------
# Config, sizes, FLOPs.

@pytest.mark.parametrize("kw, match", [
    (dict(memories=1), "linear.memories must be 0"),
    (dict(memories=-2), "linear.memories must be 0"),
    (dict(memories=2.0), "linear.memories must be 0"),
    (dict(memories=4, memory_top_k=5), "linear.memory_top_k=5 must be <= linear.memories=4"),
    (dict(memories=4, memory_top_k=0), "linear.memory_top_k must be a positive int"),
    (dict(memories=4, shared_memory="yes"), "linear.shared_memory must be a bool"),
    (dict(router_aux_coef=-0.1), "linear.router_aux_coef must be a number >= 0"),
    (dict(memories=4, variant="based"), "linear.memories=4 needs an unnormalised"),
])
def test_config_errors_name_the_key(kw, match):
  with pytest.raises(ValueError, match=match):
    models.get_config("tiny", linear=kw)


def test_presets_and_keys():
  for name, variant in (("tiny_mom_hybrid", "basic"), ("mom_1b_hybrid", "gated_deltanet")):
    cfg = models.get_config(name)
    assert (cfg.linear.memories, cfg.linear.memory_top_k, cfg.linear.shared_memory,
            cfg.linear.variant, cfg.layer_pattern) == (4, 2, True, variant, "LLLN")
  flat = models.get_config("tiny_mom_hybrid").flat_dict()
  assert flat["linear.memories"] == 4 and flat["linear.router_aux_coef"] == 0.01
  assert models.ModelConfig.from_dict(flat) == models.get_config("tiny_mom_hybrid")
  assert models.get_config("tiny").linear.memories == 0       # off by default


@pytest.mark.parametrize("variant, shared", [("gla", True), ("gated_deltanet", False)])
def test_count_params_and_flops(variant, shared):
  """count_params goes through the parameters: M' - 1 more copies of a plain layer's per-memory
  parameters and the router per linear layer. flops_per_token counts the masked form: those
  copies' matmul weights, M' times the plain core, the router and the mixing ``M' H Dv``."""
  plain = models.get_config("tiny_hybrid", linear_variant=variant)
  cfg = plain.replace(linear={**MOM, "shared_memory": shared})
  mp, (d, h, dh), c = 4 + shared, (plain.d_model, plain.num_heads, plain.dim_per_head), 16
  layer = models.LinearAttention(plain, 0, rngs=nnx.Rngs(0))
  per = {k: v.size for k, v in _params(layer).items() if k in mom.PER_MEMORY}
  n_lin = plain.layer_kinds.count("linear")
  assert models.count_params(cfg) - models.count_params(plain) == n_lin * (
      (mp - 1) * sum(per.values()) + d * 4)
  elementwise = sum(v for k, v in per.items() if k in ("b_g", "a_log"))   # not matmul weights
  matmul = sum(per.values()) - elementwise
  if variant == "gla":
    core = h * (4 * dh * dh + c * 2 * dh)
  else:
    core = h * (6 * dh * dh + c * 5 * dh + c * c / 3)
  want = 3 * n_lin * (2 * ((mp - 1) * matmul + d * 4) + (mp - 1) * core + 2 * mp * h * dh)
  got = models.flops_per_token(cfg, 256) - models.flops_per_token(plain, 256)
  assert got == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# The load-balancing loss in the training loss.

def _aux_setup(coef, num_layers=3):
  cfg = models.get_config("tiny_mom_hybrid", linear_variant="gla", linear__router_aux_coef=coef,
                          init_std=0.2, layer_pattern="LN", num_layers=num_layers)  # MoM, softmax..
  model = models.LinearLlama(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
  targets = jax.random.randint(jax.random.key(2), (2, 32), 0, 256)
  mask = jnp.ones((2, 32), jnp.float32).at[:, :5].set(0.0)
  return model, graphdef, params, rest, (tokens, targets, mask)


def _mom_inputs(model, tokens):
  """Each MoM layer's input (after its norm) and router weights."""
  ctx = make_context(model.config)
  x, out = model._embed(tokens, ctx), []
  for layer in model.layers:
    if isinstance(layer.attn, mom.MoMAttention):
      out.append((layer.attn_norm(x, ctx), layer.attn.w_router[...]))
    x = layer(x, ctx, jnp.arange(tokens.shape[1]))
  return out


def _aux_ref(cfg, inputs):
  """The mean over MoM layers of ``M sum_m f_m P_m`` from their inputs, in float64 numpy."""
  losses, m = [], cfg.linear.memories
  for h, w_router in inputs:
    probs, idx = _routing_ref(h, w_router, cfg.linear.memory_top_k)
    f = np.stack([np.mean(np.any(idx == j, -1)) for j in range(m)]) / idx.shape[-1]
    losses.append(m * np.sum(f * probs.mean((0, 1))))
  return np.mean(losses)


def _aux_outputs(coef, grads=True, num_layers=3):
  """One program: ``_sums`` with and without the aux term (values, and gradients with
  ``grads``), the captured forward, the plain forward and the MoM layers' inputs."""
  model, graphdef, params, rest, batch = _aux_setup(coef, num_layers)

  @jax.jit
  def run(params):
    def vg(on):
      sums = lambda p: loop._sums(graphdef, rest, p, *batch, router_aux=on)  # noqa: E731
      return jax.value_and_grad(sums, has_aux=True)(params) if grads else (sums(params), None)
    m = nnx.merge(graphdef, params, rest)
    return (vg(True), vg(False), models.forward_with_router_aux_loss(m, batch[0]), m(batch[0]),
            _mom_inputs(m, batch[0]))

  return model, run(params)


def test_router_aux_loss_reaches_the_training_loss():
  model, (with_aux, without, (logits, aux), plain, inputs) = _aux_outputs(0.5)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=1e-6)
  assert float(aux) == pytest.approx(_aux_ref(model.config, inputs), rel=1e-5)
  assert 1.0 < float(aux) < 4.0                       # 1 when even; at most M (one memory)
  (obj, (count, _, nll, aux_sum)), g_with = with_aux
  (plain_nll, (count0, _)), g_without = without
  assert float(count) == float(count0) == 54.0
  assert float(nll) == pytest.approx(float(plain_nll), rel=1e-6)
  assert float(aux_sum) == pytest.approx(float(aux) * 54.0, rel=1e-5)
  assert float(obj) == pytest.approx(float(plain_nll) + 0.5 * float(aux) * 54.0, rel=1e-6)
  # The router learns from the aux loss: its gradient changes.
  r_with, r_without = (g["layers"][0]["attn"]["w_router"][...] for g in (g_with, g_without))
  assert rel_err(r_with, r_without) > 1e-3


def test_zero_coefficient_leaves_the_loss_unchanged():
  model, (with_aux, without, (logits, aux), plain, _) = _aux_outputs(0.0, grads=False, num_layers=1)
  assert aux is None
  (obj, counts), _ = with_aux
  (ref, _), _ = without
  assert len(counts) == 2 and float(obj) == float(ref)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
  # Nothing sown in a plain call either (no intermediates left on the module).
  model(jnp.zeros((1, 16), jnp.int32))
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))


@pytest.mark.parametrize("accum", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_train_step_reports_nll_and_aux(accum):
  import optax
  metrics = {}
  for coef in (0.0, 0.5):
    _, graphdef, params, rest, (tokens, targets, mask) = _aux_setup(coef)
    batch = {k: jnp.stack(jnp.split(jnp.tile(a, (accum, 1)), accum)) for k, a in
             (("inputs", tokens), ("targets", targets), ("mask", mask))}
    step = loop.make_train_step(graphdef, optax.sgd(0.1), lambda s: 0.1)
    _, _, metrics[coef] = step(params, rest, optax.sgd(0.1).init(params), batch, 0)
  assert "router_aux_loss" not in metrics[0.0]
  assert float(metrics[0.5]["loss"]) == pytest.approx(float(metrics[0.0]["loss"]), rel=1e-6)
  assert 1.0 < float(metrics[0.5]["router_aux_loss"]) < 4.0
  assert float(metrics[0.5]["grad_norm"]) != float(metrics[0.0]["grad_norm"])


def test_resume_may_change_the_aux_coefficient_only():
  """``linear.router_aux_coef`` weighs the objective (a run may resume with another); the MoM
  shape keys change the parameters and may not."""
  from lasp_jax.train.checkpoint import resume_conflicts
  base = models.get_config("tiny_mom_hybrid")

  def saved(cfg):
    return {"optim": {"clip_norm": 1.0}, "resolved_model": cfg.to_dict()}

  assert resume_conflicts(saved(base), saved(base.replace(linear={"router_aux_coef": 0.1}))) == []
  assert resume_conflicts(saved(base), saved(base.replace(linear={"memories": 8}))) == [
      "model.linear.memories: 4 -> 8"]
  assert resume_conflicts(saved(base), saved(base.replace(linear={"shared_memory": False}))) == [
      "model.linear.shared_memory: True -> False"]
