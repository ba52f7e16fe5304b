"""Generation (design §14): prefill, a decode step, and ``generate``.

    logits, cache = prefill(model, prompt_BxP, max_len=P + T)   # the chunked (LASP-2) forward
    logits, cache = decode_step(model, cache, token_B)           # one recurrence step per layer
    tokens = generate(model, prompt_BxP, T)                      # both, jitted once

Prefill is the model's chunked forward over the prompt, sequence parallel when called inside
``jax.set_mesh`` with a mesh that has ``cfg.runtime.seq_axis`` (LASP-2 for linear layers, LASP-2H for
softmax ones, in ``cfg.runtime.layout`` order): the linear layers' final states come out of the exchange,
replicated, and the softmax layers' K and V are put in natural order into caches of ``max_len``
slots. A prompt of any length works: it is padded on the left to the multiple of the chunk
(times the sequence shards) that the ops need, and the padding is a separate document
(``segment_ids``), so the states restart exactly at the prompt's first token and RoPE positions
start at 0 there. Decoding then needs only the O(1) linear states (and the growing K/V of the
softmax layers).
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lasp_jax.models.cache import AttentionCache, Cache, LinearCache
from lasp_jax.models.llama import LinearLlama
from lasp_jax.models.sharding_rules import make_context
from lasp_jax.sequence_parallel import layout as layout_lib


def _check_model(model):
  if not isinstance(model, LinearLlama):
    raise TypeError(f"model must be a LinearLlama, got {type(model).__name__}")


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  return int(value)


def check_prompt(prompt_BxP, vocab_size: int):
  """Raises unless ``prompt_BxP`` is an integer ``(B, P)`` array, P >= 1, of token ids in
  ``[0, vocab_size)`` (checked when concrete)."""
  if not hasattr(prompt_BxP, "shape") or not hasattr(prompt_BxP, "dtype"):
    raise TypeError(f"prompt must be an integer (B, P) array, got {type(prompt_BxP).__name__}")
  if not jnp.issubdtype(prompt_BxP.dtype, jnp.integer):
    raise TypeError(f"prompt must be an integer (B, P) array, got dtype {prompt_BxP.dtype}")
  if prompt_BxP.ndim != 2 or 0 in prompt_BxP.shape:
    raise ValueError(f"prompt must have shape (B, P) with B, P >= 1, got {prompt_BxP.shape}")
  if not isinstance(prompt_BxP, jax.core.Tracer):
    ids = np.asarray(prompt_BxP)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
      i = np.unravel_index(bad[0], ids.shape)
      raise ValueError(f"prompt has token id {int(ids[i])} at {tuple(int(j) for j in i)}, "
                       f"outside the vocabulary [0, {vocab_size})")


def prompt_padding(cfg, prompt_len: int, seq_shards: int = 1) -> int:
  """How many tokens ``prefill`` puts before a prompt of ``prompt_len``: up to the multiple of
  ``chunk_size`` (times ``seq_shards``, twice that zigzag) that the chunked ops need."""
  unit = cfg.runtime.chunk_size
  if seq_shards > 1:
    unit *= seq_shards * layout_lib.segments_per_shard(cfg.runtime.layout)
  return -prompt_len % unit


def prefill(model: LinearLlama, prompt_BxP, *, max_len: int):
  """Runs the prompt through the model and builds the decode cache.

  Args:
    model: the decoder; inside ``jax.set_mesh`` with ``cfg.runtime.seq_axis``, sequence parallel.
    prompt_BxP: int ``(B, P)``, natural order, ids in ``[0, vocab_size)``.
    max_len: the softmax layers' cache size: the prompt plus every token to be generated.

  Returns:
    ``(logits (B, V) float32 at the prompt's last token, Cache)``, the cache's ``length`` P.
  """
  _check_model(model)
  cfg = model.config
  check_prompt(prompt_BxP, cfg.vocab_size)
  bsz, p = prompt_BxP.shape
  max_len = _check_int("max_len", max_len, 1)
  if max_len < p:
    raise ValueError(f"max_len={max_len} is shorter than the prompt (P={p})")
  ctx = make_context(cfg)
  w = ctx.seq_shards if ctx.sequence_parallel else 1
  pad = prompt_padding(cfg, p, w)
  n = p + pad
  tokens = jnp.asarray(prompt_BxP, jnp.int32)
  segment_ids = None
  if pad:
    tokens = jnp.concatenate([jnp.zeros((bsz, pad), jnp.int32), tokens], axis=1)
    # The padding is document 0 and the prompt document 1: the states restart at the prompt.
    segment_ids = jnp.broadcast_to((jnp.arange(n) >= pad).astype(jnp.int32), (bsz, n))
  zig = cfg.runtime.layout == "zigzag" and w > 1
  if zig:
    tokens = layout_lib.zigzag(tokens, w)
    segment_ids = None if segment_ids is None else layout_lib.zigzag(segment_ids, w)
  x, parts = model.hidden(tokens, segment_ids, return_cache=True)
  last = layout_lib.natural_rows(x, n - 1, n, cfg.runtime.layout, w)
  logits = model.logits(last)[:, 0]
  layers = []
  for part in parts:
    if isinstance(part, LinearCache):
      layers.append(part)
      continue
    layers.append(AttentionCache(*(_kv_cache(x, ctx, cfg.runtime.layout, w, pad, max_len) for x in part)))
  return logits, Cache(tuple(layers), jnp.asarray(p, jnp.int32), max_len)


def _kv_cache(x_BxNxGxD, ctx, layout, w, pad, max_len):
  """A prefill's K or V (layout order) -> the cache: natural order, the padding dropped,
  ``max_len`` slots, whole on every sequence shard. Under sequence parallelism the layer hands
  it out already whole (LASP-2H's gather), so the constraint moves nothing."""
  x = ctx.constrain(x_BxNxGxD, ("act_batch", None, None, None))
  if layout == "zigzag" and w > 1:
    x = layout_lib.unzigzag(x, w)
  x = x[:, pad:]
  return jnp.pad(x, ((0, 0), (0, max_len - x.shape[1]), (0, 0), (0, 0)))


def decode_step(model: LinearLlama, cache: Cache, token_B):
  """Feeds one token per row: ``(logits (B, V) float32 for the next one, the cache after it)``.

  ``token_B``: int ``(B,)``. A full cache (``length == max_len``, checked when concrete) is a
  ValueError: its softmax layers have no slot left.
  """
  _check_model(model)
  if not isinstance(cache, Cache):
    raise TypeError(f"cache must be a Cache (from prefill), got {type(cache).__name__}")
  if getattr(token_B, "ndim", None) != 1 or not jnp.issubdtype(token_B.dtype, jnp.integer):
    raise ValueError(f"token must be an integer (B,) array, got "
                     f"{getattr(token_B, 'dtype', type(token_B).__name__)} "
                     f"{getattr(token_B, 'shape', '')}")
  if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) >= cache.max_len:
    raise ValueError(f"the cache is full: length {int(cache.length)} = max_len {cache.max_len}; "
                     f"prefill with a larger max_len")
  logits, layers = model.decode(token_B.astype(jnp.int32), cache.layers, cache.length)
  return logits, Cache(layers, cache.length + 1, cache.max_len)


def sample(logits_BxV, key, *, temperature: float = 0.0, top_k: int | None = None):
  """The next token ``(B,)`` int32: the argmax at temperature 0, else a draw from
  ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (a traced
  ``temperature`` always draws)."""
  if isinstance(temperature, numbers.Real) and temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "max_len", "greedy", "top_k",
                                             "keep_logits"))
def _generate(graphdef, state, prompt, key, temperature, *, steps, max_len, greedy, top_k,
              keep_logits):
  model = nnx.merge(graphdef, state)
  logits, cache = prefill(model, prompt, max_len=max_len)
  temp = 0.0 if greedy else temperature  # a Python 0.0 picks the argmax when tracing

  def pick(logits, i):
    return sample(logits, jax.random.fold_in(key, i), temperature=temp, top_k=top_k)

  first = pick(logits, 0)

  def body(carry, i):
    token, cache = carry
    step_logits, cache = decode_step(model, cache, token)
    nxt = pick(step_logits, i)
    return (nxt, cache), (nxt, step_logits if keep_logits else None)

  _, (rest, rest_logits) = jax.lax.scan(body, (first, cache),
                                        jnp.arange(1, steps, dtype=jnp.int32))
  tokens = jnp.concatenate([prompt, first[:, None], rest.T.astype(prompt.dtype)], axis=1)
  if not keep_logits:  # (B, T, V) floats: not worth holding unless asked for
    return tokens, None
  return tokens, jnp.concatenate([logits[:, None], jnp.moveaxis(rest_logits, 0, 1)], axis=1)


def generate(model: LinearLlama, prompt_BxP, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, max_len: int | None = None,
             return_logits: bool = False):
  """Continues ``prompt_BxP`` by ``max_new_tokens`` tokens: int32 ``(B, P + max_new_tokens)``,
  and with ``return_logits`` also the float32 logits ``(B, max_new_tokens, V)`` each new token
  was picked from (before temperature and top-k).

  Greedy at ``temperature=0``; otherwise sampled from ``softmax(logits / temperature)`` (over the
  ``top_k`` largest logits when given) with keys from ``seed``: the same seed gives the same
  tokens. The prefill and the whole decode loop (a ``lax.scan``) are one jitted program, traced
  once per (shapes, max_new_tokens, greedy, top_k). Inside ``jax.set_mesh`` with the sequence
  axis the prefill is sequence parallel. ``max_len`` (default ``P + max_new_tokens``) sizes the
  softmax layers' caches; a smaller one is a ValueError.
  """
  _check_model(model)
  cfg = model.config
  check_prompt(prompt_BxP, cfg.vocab_size)
  steps = _check_int("max_new_tokens", max_new_tokens, 0)
  p = prompt_BxP.shape[1]
  need = p + steps
  max_len = need if max_len is None else _check_int("max_len", max_len, 1)
  if max_len < need:
    raise ValueError(f"max_len={max_len} cannot hold the prompt ({p}) and max_new_tokens "
                     f"({steps}): it needs {need}")
  if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
      math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
  if top_k is not None:
    top_k = _check_int("top_k", top_k, 1)
    if top_k > cfg.vocab_size:
      raise ValueError(f"top_k={top_k} exceeds the vocabulary size {cfg.vocab_size}")
  seed = _check_int("seed", seed, 0)
  if not isinstance(return_logits, bool):
    raise TypeError(f"return_logits must be a bool, got {return_logits!r}")
  prompt = jnp.asarray(prompt_BxP, jnp.int32)
  if steps == 0:
    empty = jnp.zeros((prompt.shape[0], 0, cfg.vocab_size), jnp.float32)
    return (prompt, empty) if return_logits else prompt
  graphdef, state = nnx.split(model)
  tokens, logits = _generate(graphdef, state, prompt, jax.random.key(seed),
                             jnp.float32(temperature), steps=steps, max_len=max_len,
                             greedy=temperature == 0, top_k=top_k, keep_logits=return_logits)
  return (tokens, logits) if return_logits else tokens
