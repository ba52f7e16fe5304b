"""Linear-Llama3: Llama-3 with linear attention, and its hybrids (design §7).

    x = Embed(tokens)
    for each layer l (kind from ``cfg.layer_pattern``: linear or softmax attention):
      x = x + Attention_l(RMSNorm(x))
      x = x + SwiGLU(RMSNorm(x))
    logits = RMSNorm(x) W_out        (W_out = Embed^T when ``tie_embeddings``), float32

Sequence parallelism comes from the ``jax.set_mesh`` context: when its mesh has ``cfg.runtime.seq_axis``,
linear layers run LASP-2 and softmax layers LASP-2H over it, with tokens (and logits) in
``cfg.runtime.layout`` order; without it the one-device ops run. The model itself never calls a collective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from lasp_jax.models.config import ModelConfig
from lasp_jax.models.layers import RMSNorm, SwiGLU, document_positions, param, rope_positions
from lasp_jax.models.linear_attention import LinearAttention
from lasp_jax.models.mom import MoMAttention, masked_flops
from lasp_jax.models.sharding_rules import ShardingRules, make_context
from lasp_jax.models.softmax_attention import SoftmaxAttention


class DecoderLayer(nnx.Module):
  """Pre-norm residual layer: attention (linear or softmax) then SwiGLU."""

  def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
    self.kind = cfg.layer_kinds[layer_idx]
    dt = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm.eps, dtype=dt, rngs=rngs,
                             zero_centered=cfg.norm.zero_centered)
    # A linear layer is a Mixture-of-Memories one with linear.memories (models/mom.py).
    block = ((MoMAttention if cfg.linear.memories else LinearAttention)
             if self.kind == "linear" else SoftmaxAttention)
    self.attn = block(cfg, layer_idx, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm.eps, dtype=dt, rngs=rngs,
                             zero_centered=cfg.norm.zero_centered)
    self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim, std=cfg.init_std, dtype=dt, rngs=rngs)

  def __call__(self, x_BxNxD, ctx, positions, segment_ids_BxN=None, *, return_cache=False):
    """``x (B, N, D)`` -> same; with ``return_cache`` also the attention's cache material."""
    h = self.attn_norm(x_BxNxD, ctx)
    extra = dict(return_cache=True) if return_cache else {}
    if self.kind == "linear":
      out = self.attn(h, ctx, segment_ids_BxN, **extra)
    else:
      out = self.attn(h, ctx, positions, segment_ids_BxN, **extra)
    h, cache = out if return_cache else (out, None)
    x_BxNxD = x_BxNxD + h
    y = x_BxNxD + self.mlp(self.mlp_norm(x_BxNxD, ctx), ctx)
    return (y, cache) if return_cache else y

  def decode(self, x_Bx1xD, cache, ctx, position):
    """One token (``position``: int32 scalar): ``(y (B, 1, D), the layer's cache after it)``."""
    h = self.attn_norm(x_Bx1xD, ctx)
    if self.kind == "linear":
      h, cache = self.attn.decode(h, cache, ctx)
    else:
      h, cache = self.attn.decode(h, cache, ctx, position)
    x_Bx1xD = x_Bx1xD + h
    return x_Bx1xD + self.mlp(self.mlp_norm(x_Bx1xD, ctx), ctx), cache


class LinearLlama(nnx.Module):
  """The decoder. ``model(tokens_BxN, segment_ids=None) -> logits_BxNxV`` (float32), tokens in
  ``cfg.runtime.layout`` order.

  ``segment_ids (B, N)`` int, in the layout of the tokens, packs documents (design §13): a
  document starts wherever the id differs from the previous token's in natural order; every layer
  then sees only its own document and RoPE positions restart at 0 at each start, so a document's
  logits do not depend on what is packed before it.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, ModelConfig):
      raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    cfg = self.config = config
    dt = jnp.dtype(cfg.param_dtype)
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dt,
                       std=cfg.init_std)
    self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm.eps, dtype=dt, rngs=rngs,
                             zero_centered=cfg.norm.zero_centered)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dt,
                           std=cfg.init_std)

  def __call__(self, tokens_BxN, segment_ids=None):
    x, _ = self.hidden(tokens_BxN, segment_ids)
    return self.logits(x)

  def hidden(self, tokens_BxN, segment_ids=None, *, return_cache=False):
    """The final normed hidden states ``(B, N, D)`` and, with ``return_cache``, every layer's
    cache material (``LinearCache``, or ``(k, v)`` in the tokens' layout; else None): the body of
    ``__call__`` and of ``decoding.prefill``."""
    cfg = self.config
    if tokens_BxN.ndim != 2 or not jnp.issubdtype(tokens_BxN.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer (B, N) array, got {tokens_BxN.dtype} "
                       f"{tokens_BxN.shape}")
    if segment_ids is not None:
      if getattr(segment_ids, "shape", None) != tokens_BxN.shape:
        raise ValueError(f"segment_ids must have the tokens' shape (B, N) = {tokens_BxN.shape}, "
                         f"got {getattr(segment_ids, 'shape', type(segment_ids).__name__)}")
      if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be an integer array, got dtype {segment_ids.dtype}")
    ctx = make_context(cfg)
    n = tokens_BxN.shape[1]
    if cfg.runtime.layout == "zigzag" and ctx.seq_shards > 1 and n % (2 * ctx.seq_shards):
      raise ValueError(f"zigzag layout: sequence length {n} is not a multiple of "
                       f"2 * {ctx.seq_shards} sequence shards")
    tokens_BxN = ctx.constrain(tokens_BxN, ("act_batch", "act_seq"))
    x = self._embed(tokens_BxN, ctx)
    if segment_ids is None:
      positions = rope_positions(n, ctx, cfg.runtime.layout)  # (N,)
    else:
      segment_ids = ctx.constrain(jnp.asarray(segment_ids), ("act_batch", "act_seq"))
      positions = document_positions(segment_ids, ctx, cfg)  # (B, N)
    caches = []
    for layer in self.layers:
      if return_cache:  # a prefill: no gradient, so nothing to rematerialise
        x, cache = layer(x, ctx, positions, segment_ids, return_cache=True)
        caches.append(cache)
      elif cfg.runtime.remat:
        x = nnx.remat(lambda lyr, y, p, s: lyr(y, ctx, p, s))(layer, x, positions, segment_ids)
      else:
        x = layer(x, ctx, positions, segment_ids)
    return self.final_norm(x, ctx), (tuple(caches) if return_cache else None)

  def decode(self, token_B, caches, position):
    """One token per row at ``position`` (int32 scalar): ``(logits (B, V) float32, caches)``,
    ``caches`` a tuple with one cache per layer (``lasp_jax.models.cache``)."""
    ctx = make_context(self.config)
    x = self._embed(token_B[:, None], ctx)
    new = []
    for layer, cache in zip(self.layers, caches):
      x, cache = layer.decode(x, cache, ctx, position)
      new.append(cache)
    return self.logits(self.final_norm(x, ctx))[:, 0], tuple(new)

  def _embed(self, tokens_BxN, ctx):
    act = ("act_batch", "act_seq", "act_embed")
    with jax.named_scope("embed"):
      table = self.embed[...].astype(ctx.compute_dtype)
      if ctx.mesh is not None:  # a replicated table: the lookup is then local to every device
        table = ctx.constrain(table, (None, None))
      return ctx.take_rows(table, tokens_BxN, act)

  def logits(self, x_BxNxD):
    """The LM head on final hidden states: ``(B, N, V)`` float32."""
    cfg, ctx = self.config, make_context(self.config)
    with jax.named_scope("lm_head"):
      out = ("act_batch", "act_seq", "act_vocab")
      if cfg.tie_embeddings:
        logits = ctx.einsum("bnd,vd->bnv", x_BxNxD, ctx.weight(self.embed, ("vocab", "embed")),
                            out)
      else:
        logits = ctx.einsum("bnd,dv->bnv", x_BxNxD, ctx.weight(self.lm_head, ("embed", "vocab")),
                            out)
    return logits.astype(jnp.float32)


def _is_var(x):
  return isinstance(x, nnx.Variable)


def param_shardings(model: LinearLlama, mesh):
  """``NamedSharding`` of every parameter (a State shaped like ``nnx.state(model)``) on ``mesh``,
  from the parameters' ``logical_axes`` and the config's ``ShardingRules``."""
  rules = ShardingRules.from_config(model.config)

  def one(var):
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
      raise ValueError(f"parameter of shape {var.shape} has no logical_axes metadata")
    return NamedSharding(mesh, rules.spec(axes, mesh, var.shape))

  return jax.tree.map(one, nnx.state(model), is_leaf=_is_var)


def create_model(config: ModelConfig, *, mesh=None, seed: int = 0) -> LinearLlama:
  """Builds the model with parameters placed and sharded on ``mesh`` (or the ``jax.set_mesh``
  mesh; no mesh: default device) by the logical-axis rules (``ShardingRules``)."""
  if mesh is None:
    ctx_mesh = jax.sharding.get_abstract_mesh()
    if ctx_mesh is not None and ctx_mesh.axis_names:
      mesh = _concrete_mesh(ctx_mesh)
  build = lambda: LinearLlama(config, rngs=nnx.Rngs(params=seed))  # noqa: E731
  if mesh is None:
    return build()
  abstract = nnx.eval_shape(build)
  graphdef, abs_state = nnx.split(abstract)
  shardings = param_shardings(abstract, mesh)
  state = jax.jit(lambda: jax.tree.map(lambda v: v[...], nnx.state(build()), is_leaf=_is_var),
                  out_shardings=shardings)()
  # Put the sharded values back into the abstract variables (keeps their metadata).
  flat_vars = jax.tree.leaves(abs_state, is_leaf=_is_var)
  flat_vals = jax.tree.leaves(state)
  for var, val in zip(flat_vars, flat_vals):
    var.set_value(val) if hasattr(var, "set_value") else var.__setitem__(..., val)
  return nnx.merge(graphdef, abs_state)


def _concrete_mesh(abstract_mesh):
  """The concrete mesh behind the ``jax.set_mesh`` context (needed to place arrays)."""
  get = getattr(jax.sharding, "get_mesh", None)
  if get is not None:
    m = get()
    if m is not None and getattr(m, "axis_names", ()):
      return m
  raise ValueError("create_model needs mesh=... (no concrete mesh in the jax.set_mesh context)")


def count_params(config: ModelConfig) -> int:
  """Number of parameters (tied embeddings counted once), from the model's abstract shapes."""
  abstract = nnx.eval_shape(lambda: LinearLlama(config, rngs=nnx.Rngs(params=0)))
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward), for MFU.

  Forward per token: ``2 * P_matmul`` (every weight matrix once, the LM head included, the
  embedding lookup not), plus per layer the attention core:
  - linear, chunked form with chunk ``c``: per head ``4 Dk Dv`` (state update and ``q S``) +
    ``c (Dk + Dv)`` (the causal intra-chunk ``Q K^T`` and ``P V``, half of a ``c x c`` tile each);
    the short conv's ``K`` taps count as matmul weights on the channels of q, k and v;
  - delta rule (``DELTA_VARIANTS``), the chunked WY form: per head ``6 Dk Dv`` (the state pass:
    ``W S``, ``q S`` and the update ``K^T U'``) + ``c (3 Dk + 2 Dv)`` (the lower triangles of
    ``K K^T`` and ``Q K^T``, ``W = T (beta K)`` and ``U = T (beta V)``, ``P U'``) + ``c^2 / 3``
    (the ``c x c`` unit-triangular solve for ``T``, ``c^3 / 3`` per chunk); decays are
    elementwise and not counted;
  - softmax, causal: per head ``2 D N`` (``Q K^T`` and ``P V`` over ``N / 2`` keys on average).
  With grouped value heads the core runs on the value heads (q and k repeated to them).
  The gates' projections (GLA's and KDA's low rank, simple GLA's and Gated DeltaNet's per head,
  the delta rule's ``beta``) count as matmul weights. Mixture-of-Memories layers
  (``linear.memories``) count their masked form, the form that runs: all ``M' = M (+1 shared)``
  memories' key/value projections, gates, ``beta``, convs and recurrences for every token (not
  only the ``top_k + 1`` a token is routed to), plus the router and the mixing
  (``mom.masked_flops``).
  """
  if not isinstance(seq_len, int) or seq_len <= 0:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
  cfg = config
  d, f = cfg.d_model, cfg.ffn_dim
  mlp = 3 * d * f
  head = d * cfg.vocab_size
  total = 2.0 * head
  c = min(cfg.runtime.chunk_size, seq_len)
  for kind in cfg.layer_kinds:
    if kind == "softmax":
      h, hkv, dh = cfg.softmax_heads, cfg.kv_heads, cfg.softmax_head_dim
      mm = d * h * dh * (3 if cfg.softmax.output_gate else 2) + d * hkv * dh * 2
      core = h * 2.0 * dh * seq_len
    else:
      # q, k: hk heads of dqk; v, the output gate and projection, the core: h value heads.
      variant, hk, h = cfg.variant, cfg.num_heads, cfg.linear_value_heads
      dqk, dh = variant.qk_dim(cfg), cfg.linear_value_dim
      dk, dv = variant.state_dims(cfg)
      mm = d * hk * dqk * 2 + d * h * dh * 3 + variant.gate_weights(cfg)
      mm += cfg.linear.short_conv * (2 * hk * dqk + h * dh)  # the depthwise taps, one FMA each
      if variant.delta:
        core = h * (6.0 * dk * dv + c * (3.0 * dk + 2.0 * dv) + c * c / 3.0)
      else:
        core = h * (4.0 * dk * dv + c * (dk + dv))
      if cfg.linear.memories:  # Mixture-of-Memories: the masked form, every memory every token
        mm, core = masked_flops(cfg, mm, core)
    total += 2.0 * (mm + mlp) + core
  return 3.0 * total
