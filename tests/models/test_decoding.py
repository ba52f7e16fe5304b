"""Generation (design §14): prefill + decode steps give the full forward pass's logits at
every position, so greedy tokens are its argmax; for every linear variant (short conv on), a
hybrid, GQA, prompts that are not a multiple of the chunk; the sequence-parallel prefill on 8
devices gives one device's cache and tokens; sampling is seeded; errors name their value."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lasp_jax import comm, models
from lasp_jax.models import decoding
from tests.references import rel_err

B, P, T = 2, 21, 11  # P + T = 32, a multiple of the chunk (16), for the full forward pass
W = 8


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  """Both sides of each comparison compile alike; XLA's optimisations change nothing checked."""
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _config(variant, pattern="LN", **kw):
  # One linear and one softmax layer (GQA: 2 kv heads for 4 heads), the kernel-4 short conv; a
  # larger init than training's 0.02 so that logits spread and argmaxes are far from ties.
  return models.get_config("tiny_hybrid", linear_variant=variant, layer_pattern=pattern,
                           num_layers=len(pattern), init_std=0.2, **kw)


@functools.lru_cache(maxsize=None)
def _model(variant, pattern="LN"):
  return models.LinearLlama(_config(variant, pattern), rngs=nnx.Rngs(0))


def _prompt(p=P, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, p), 0, 256)


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def _check_greedy(model, prompt):
  """generate's tokens and the logits it picked them from against one full forward pass."""
  p = prompt.shape[1]
  steps = 32 - p  # the forward pass needs a multiple of the chunk (16)
  out, stepped = decoding.generate(model, prompt, steps, return_logits=True)
  assert out.shape == (B, 32) and out.dtype == jnp.int32 and stepped.shape == (B, steps, 256)
  np.testing.assert_array_equal(np.asarray(out[:, :p]), np.asarray(prompt))
  full = _forward(*nnx.split(model), out)[:, p - 1:-1]
  assert rel_err(stepped, full) < 1e-5
  # Greedy = the forward pass's argmax at every generated position, with margins far above the
  # logits' error (so the check is not decided by rounding).
  np.testing.assert_array_equal(np.asarray(out[:, p:]), np.asarray(jnp.argmax(full, -1)))
  top2 = jax.lax.top_k(full, 2)[0]
  assert float(jnp.min(top2[..., 0] - top2[..., 1])) > 1e-4


@pytest.mark.parametrize("variant", models.LINEAR_VARIANTS)
def test_greedy_is_the_argmax_of_the_forward_pass(variant):
  _check_greedy(_model(variant), _prompt())


@pytest.mark.parametrize("p", [16, 3, pytest.param(1, marks=pytest.mark.slow)])
def test_any_prompt_length(p):
  # 16: a whole chunk, no padding; 3 and 1: no longer than the conv's K - 1 = 3 taps.
  _check_greedy(_model("gated_deltanet"), _prompt(p))


def test_all_softmax_and_no_conv():
  cfg = _config("basic", "N", short_conv=0)
  _check_greedy(models.LinearLlama(cfg, rngs=nnx.Rngs(0)), _prompt())


def test_cache_memory_linear_flat_softmax_growing():
  def nbytes(pattern, p):
    model = _model("gla", pattern)
    cache = jax.eval_shape(lambda m, t: decoding.prefill(m, t, max_len=p + 8)[1], model,
                           jax.ShapeDtypeStruct((B, p), jnp.int32))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))

  lin = [nbytes("L", p) for p in (64, 4096)]
  assert lin[0] == lin[1]
  # The linear layer: state B H Dk Dv + conv tails 3 B (K-1) H D, float32; plus the length.
  assert lin[0] == 4 * (B * 4 * 8 * 8 + 3 * B * 3 * 32) + 4
  soft = [nbytes("N", p) for p in (64, 4096)]
  assert soft[1] - soft[0] == 2 * B * (4096 - 64) * 2 * 8 * 4   # K and V, 2 kv heads of 8


@pytest.mark.parametrize("layout", ["zigzag", pytest.param("contiguous", marks=pytest.mark.slow)])
def test_sequence_parallel_prefill_matches_one_device(layout):
  cfg = models.get_config("tiny_gdn_hybrid", init_std=0.2, layout=layout)  # LLLN, conv, GQA
  model = models.LinearLlama(cfg, rngs=nnx.Rngs(0))
  prompt = _prompt(300)  # padded to 512 = 2 W chunks of 16 per device (zigzag)
  prefill = jax.jit(lambda m, t: decoding.prefill(m, t, max_len=300 + T))
  ref_logits, ref_cache = prefill(model, prompt)
  ref = decoding.generate(model, prompt, T)
  with jax.set_mesh(jax.make_mesh((W,), ("sp",))):
    logits, cache = prefill(model, prompt)
    out = decoding.generate(model, prompt, T)
  assert rel_err(logits, ref_logits) < 1e-5
  errs = jax.tree.map(rel_err, cache, ref_cache)
  assert max(jax.tree.leaves(errs)) < 1e-5, errs
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_sequence_parallel_prefill_gathers_once_per_layer():
  """Compile only: the 8-device prefill of the LLLN hybrid all-gathers one summary per linear
  layer and K/V once for the softmax layer, whose gathered K/V is also the decode cache (no
  second gather of it into the cache)."""
  cfg = models.get_config("tiny_gdn_hybrid", layout="zigzag")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.create_model(cfg)))
  p, hkv, dh = 512, cfg.kv_heads, cfg.dim_per_head
  with jax.set_mesh(jax.make_mesh((W,), ("sp",))):
    hlo = jax.jit(lambda s, t: decoding.prefill(nnx.merge(graphdef, s), t, max_len=p)).lower(
        state, jax.ShapeDtypeStruct((B, p), jnp.int32)).compile().as_text()
  gathers = [c for c in comm.parse_collectives(hlo) if c.kind == "all-gather"]
  assert sum(c.count for c in gathers) == len(cfg.layer_pattern), gathers
  kv_bytes = 2 * B * p * hkv * dh * 4   # K and V stacked, float32
  assert sum(c.result_bytes == kv_bytes for c in gathers) == cfg.layer_pattern.count("N"), gathers


def test_sampling_is_seeded_and_inside_the_top_k():
  model = _model("kda")
  prompt = _prompt()
  draw = functools.partial(decoding.generate, model, prompt, T, temperature=1.5, top_k=5)
  a, b, c = draw(seed=3), draw(seed=3), draw(seed=4)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  full = _forward(*nnx.split(model), a)[:, P - 1:-1]
  top5 = jax.lax.top_k(full, 5)[1]
  assert bool(jnp.all(jnp.any(top5 == a[:, P:, None], axis=-1)))
  # Not greedy: at temperature 1.5 some draw is not the argmax.
  assert not np.array_equal(np.asarray(a[:, P:]), np.asarray(jnp.argmax(full, -1)))


def test_errors_name_the_value():
  model = _model("basic")
  prompt = _prompt()
  with pytest.raises(TypeError, match="prompt must be an integer"):
    decoding.generate(model, prompt.astype(jnp.float32), 2)
  with pytest.raises(ValueError, match=r"prompt must have shape \(B, P\)"):
    decoding.generate(model, prompt[0], 2)
  with pytest.raises(ValueError, match=r"token id 256 at \(1, 4\).*\[0, 256\)"):
    decoding.generate(model, prompt.at[1, 4].set(256), 2)
  with pytest.raises(ValueError, match=r"max_len=25 cannot hold the prompt \(21\) and "
                                       r"max_new_tokens \(5\)"):
    decoding.generate(model, prompt, 5, max_len=25)
  with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got -1"):
    decoding.generate(model, prompt, 2, temperature=-1.0)
  with pytest.raises(ValueError, match="top_k=300 exceeds the vocabulary size 256"):
    decoding.generate(model, prompt, 2, temperature=1.0, top_k=300)
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got 2.5"):
    decoding.generate(model, prompt, 2.5)
  with pytest.raises(TypeError, match="model must be a LinearLlama"):
    decoding.generate(object(), prompt, 2)
  _, cache = decoding.prefill(model, prompt[:, :16], max_len=16)
  with pytest.raises(ValueError, match="the cache is full: length 16 = max_len 16"):
    decoding.decode_step(model, cache, prompt[:, 16])
  with pytest.raises(ValueError, match="max_len=3 is shorter than the prompt"):
    decoding.prefill(model, prompt, max_len=3)
  np.testing.assert_array_equal(np.asarray(decoding.generate(model, prompt, 0)),
                                np.asarray(prompt))
  with pytest.raises(TypeError, match="return_logits must be a bool, got 1"):
    decoding.generate(model, prompt, 2, return_logits=1)
