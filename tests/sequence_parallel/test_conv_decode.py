"""The short conv's decode side (design §12, 14): one-token steps from a prefill's
``conv_state`` continue the full convolution exactly, in both layouts and on a sequence-split
array; ``natural_rows`` reads natural-order rows of a layout-ordered, sharded array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lasp_jax
from lasp_jax.sequence_parallel import layout as layout_lib
from tests import references as refs
from tests.references import rel_err

B, N, C, K, W = 2, 32, 6, 4, 8


def _xw(seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (B, N, C)), jax.random.normal(kw, (K, C))


@pytest.mark.parametrize("prefix", [1, 2, 20])
def test_steps_after_conv_state_continue_the_convolution(prefix):
  x, w = _xw()
  ids = jnp.asarray(np.repeat([[0] * 7 + [1] * 11 + [2] * 14], B, 0))  # documents across the cut
  ref = refs.causal_conv1d(x, w, activation="silu", segment_ids=ids)
  # The state after the prefix is its last K-1 inputs in the last document, zeros before it; the
  # steps after it run inside that document (ids constant from `prefix` on only for prefix 20).
  state = lasp_jax.conv_state(x[:, :prefix], K, segment_ids=ids[:, :prefix])
  assert state.shape == (B, K - 1, C)
  last = min(N, 24) if prefix == 20 else prefix + 5
  if prefix < 18:
    ref = refs.causal_conv1d(x[:, :last], w, activation="silu",
                             segment_ids=jnp.where(jnp.arange(last) < prefix,
                                                   ids[:, :last], ids[:, prefix - 1:prefix]))
  outs = []
  for t in range(prefix, last):
    y, state = lasp_jax.causal_conv1d_step(x[:, t], state, w, activation="silu")
    outs.append(y)
  assert rel_err(jnp.stack(outs, 1), ref[:, prefix:last]) < 1e-6


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_conv_state_reads_the_natural_tail_of_a_split_sequence(layout):
  x, _ = _xw(1)
  ids = jnp.asarray(np.repeat([[0] * (N - 2) + [1] * 2], B, 0))
  stored = lasp_jax.zigzag(x, W) if layout == "zigzag" else x
  stored_ids = lasp_jax.zigzag(ids, W) if layout == "zigzag" else ids
  mesh = jax.make_mesh((W,), ("sp",))
  with jax.set_mesh(mesh):
    xs = jax.device_put(stored, jax.sharding.NamedSharding(mesh, jax.P(None, "sp")))
    ss = jax.device_put(stored_ids, jax.sharding.NamedSharding(mesh, jax.P(None, "sp")))
    got = jax.jit(lambda a, s: lasp_jax.conv_state(a, K, segment_ids=s, layout=layout,
                                                   num_shards=W))(xs, ss)
  # Only the last document's two tokens survive; the earlier one is zeroed.
  want = jnp.concatenate([jnp.zeros((B, 1, C)), x[:, -2:]], axis=1)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_conv_state_of_a_sequence_shorter_than_the_kernel_pads_zeros():
  x, _ = _xw(2)
  got = lasp_jax.conv_state(x[:, :1], K)
  np.testing.assert_array_equal(np.asarray(got[:, :K - 2]), 0.0)
  np.testing.assert_array_equal(np.asarray(got[:, -1]), np.asarray(x[:, 0]))


@pytest.mark.parametrize("start, stop", [(31, 32), (0, 2), (3, 17)])
def test_natural_rows_on_a_sharded_zigzag_array(start, stop):
  x = jnp.arange(B * N, dtype=jnp.float32).reshape(B, N)
  mesh = jax.make_mesh((W,), ("sp",))
  with jax.set_mesh(mesh):
    xs = jax.device_put(lasp_jax.zigzag(x, W), jax.sharding.NamedSharding(mesh, jax.P(None, "sp")))
    got = jax.jit(lambda a: layout_lib.natural_rows(a, start, stop, "zigzag", W))(xs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(x[:, start:stop]))


def test_step_and_state_errors():
  x, w = _xw()
  with pytest.raises(ValueError, match=r"state must have shape \(B, K - 1, C\) = \(2, 3, 6\)"):
    lasp_jax.causal_conv1d_step(x[:, 0], jnp.zeros((B, K, C)), w)
  with pytest.raises(ValueError, match=r"weight must have shape \(K, C\)"):
    lasp_jax.causal_conv1d_step(x[:, 0], jnp.zeros((B, K - 1, C)), w[:, :2])
  with pytest.raises(ValueError, match=r"rows \[5, 40\)"):
    layout_lib.natural_rows(x, 5, 40, "contiguous", 1)
