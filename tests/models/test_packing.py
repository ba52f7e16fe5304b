"""LinearLlama with packed documents (design §13): a document's logits do not depend on what
is packed before it, on one device and on 8 simulated devices in the zigzag layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lasp_jax
from lasp_jax import models
from tests.models.test_model import N, TOL, W, _config, _fast_compiles  # noqa: F401 (fixture)
from tests.references import rel_err

# A hybrid with the short conv (halo across devices), a per-channel data-dependent decay and a
# softmax layer (LASP-2H, RoPE, GQA).
VARIANT, PATTERN = "gla", "LN"
A_LEN = 37  # what precedes doc D: ends mid-chunk and mid-shard, so every reset is exercised


def _packed():
  """Tokens and ids (3, N): rows ``[A | D]``, ``[C1 | C2 | D]`` (D at the same positions) and
  ``[D | E]`` (D alone at the start). Ids are arbitrary values: only changes mark starts."""
  draw = lambda i, n: jax.random.randint(jax.random.key(10 + i), (n,), 0, 256)  # noqa: E731
  d_len = N - A_LEN
  d = draw(0, d_len)
  tokens = jnp.stack([jnp.concatenate([draw(1, A_LEN), d]),
                      jnp.concatenate([draw(2, A_LEN), d]),
                      jnp.concatenate([d, draw(3, A_LEN)])]).astype(jnp.int32)
  ids = np.stack([np.r_[np.full(A_LEN, 0), np.full(d_len, 1)],
                  np.r_[np.full(20, 7), np.full(A_LEN - 20, 3), np.full(d_len, 9)],
                  np.r_[np.full(d_len, 4), np.full(A_LEN, 5)]]).astype(np.int32)
  return tokens, jnp.asarray(ids)


def _loss(state, tokens, ids, weights, graphdef):
  logits = nnx.merge(graphdef, state)(tokens, segment_ids=ids)
  return jnp.sum(logits * weights), logits


# Logits and the gradient of <logits, weights> w.r.t. every parameter, in one program.
_forward_jit = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=4)


def _weights():
  return jax.random.normal(jax.random.key(3), (3, N, 256))


@functools.lru_cache(maxsize=None)
def _one_device():
  graphdef, state = nnx.split(models.create_model(_config(VARIANT, PATTERN)))
  tokens, ids = _packed()
  (_, logits), grads = _forward_jit(state, tokens, ids, _weights(), graphdef)
  return graphdef, state, logits, grads


def _check_invariant(logits):
  logits, d_len = np.asarray(logits), N - A_LEN
  doc0, doc1, alone = logits[0, A_LEN:], logits[1, A_LEN:], logits[2, :d_len]
  assert rel_err(doc1, doc0) < TOL
  assert rel_err(alone, doc0) < TOL


def test_document_logits_do_not_depend_on_what_precedes_it():
  _, _, logits, _ = _one_device()
  _check_invariant(logits)


def test_zigzag_on_8_devices_matches_one_device():
  """Logits and parameter gradients with packed documents: 8 devices (zigzag) == one device."""
  _, state, ref, ref_grads = _one_device()
  tokens, ids = _packed()
  cfg = _config(VARIANT, PATTERN).replace(layout="zigzag")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.LinearLlama(cfg, rngs=nnx.Rngs(0))))
  zz = lambda x: lasp_jax.zigzag(x, W)  # noqa: E731
  with jax.set_mesh(jax.make_mesh((W,), ("sp",))):
    (_, logits), grads = _forward_jit(state, zz(tokens), zz(ids), zz(_weights()), graphdef)
  assert logits.sharding.spec[1] == "sp"
  logits = lasp_jax.unzigzag(logits, W)
  assert rel_err(logits, ref) < TOL
  _check_invariant(logits)
  errs = jax.tree.map(rel_err, grads, ref_grads)
  assert max(jax.tree.leaves(errs)) < TOL, errs


def test_document_positions_restart_at_each_start():
  from lasp_jax.models.layers import document_positions
  from lasp_jax.models.sharding_rules import make_context
  _, ids = _packed()
  cfg = _config(VARIANT, PATTERN)
  pos = np.asarray(document_positions(ids, make_context(cfg), cfg))
  d_len = N - A_LEN
  np.testing.assert_array_equal(pos[0], np.r_[np.arange(A_LEN), np.arange(d_len)])
  np.testing.assert_array_equal(pos[1], np.r_[np.arange(20), np.arange(A_LEN - 20),
                                              np.arange(d_len)])
  np.testing.assert_array_equal(pos[2], np.r_[np.arange(d_len), np.arange(A_LEN)])


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_document_positions_on_8_devices_equal_one_device(layout):
  """The per-shard positions (edges of each segment gathered, not the ids) equal the one-device
  ones, with starts inside segments, at their first token and none for a whole segment."""
  from lasp_jax.models.layers import document_positions
  from lasp_jax.models.sharding_rules import make_context
  _, ids = _packed()
  ids = jnp.concatenate([ids, jnp.asarray(np.repeat([0, 1, 2, 3], N // 4)[None], jnp.int32)])
  cfg = _config(VARIANT, PATTERN).replace(layout=layout)
  want = np.asarray(document_positions(ids, make_context(cfg), cfg))
  zz = (lambda x: lasp_jax.zigzag(x, W)) if layout == "zigzag" else (lambda x: x)
  mesh = jax.make_mesh((W,), ("sp",))
  with jax.set_mesh(mesh):
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sp"))
    x = jax.reshard(zz(ids), spec)
    got = jax.jit(lambda x: document_positions(x, make_context(cfg), cfg))(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(zz(want)))


def test_bad_segment_ids():
  graphdef, state, _, _ = _one_device()
  model = nnx.merge(graphdef, state)
  tokens, ids = _packed()
  with pytest.raises(ValueError, match="segment_ids"):
    model(tokens, segment_ids=ids[:, :64])
  with pytest.raises(ValueError, match="segment_ids"):
    model(tokens, segment_ids=ids[0])
  with pytest.raises(TypeError, match="segment_ids"):
    model(tokens, segment_ids=ids.astype(jnp.float32))


def test_document_positions_gather_only_segment_edges():
  """One all-gather of 3 ints per segment and row, whatever N (compiled HLO)."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lasp_jax import comm
  from lasp_jax.models.layers import document_positions
  from lasp_jax.models.sharding_rules import make_context
  mesh = jax.make_mesh((W,), ("sp",))
  for layout, nseg in (("contiguous", 1), ("zigzag", 2)):
    cfg = _config(VARIANT, PATTERN).replace(layout=layout)
    stats = [comm.summarize(comm.collective_stats(
        lambda i: document_positions(i, make_context(cfg), cfg),
        jax.ShapeDtypeStruct((2, n), jnp.int32, sharding=NamedSharding(mesh, P(None, "sp"))),
        mesh=mesh)) for n in (1024, 8192)]
    assert stats[0] == stats[1] == {"all-gather": {"count": 1, "bytes": W * nseg * 2 * 3 * 4}}
