"""Zigzag layout helpers: round trips, the chunk order of SPEC section 5, positions, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

import lasp_jax
from lasp_jax.sequence_parallel import layout


@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_zigzag_round_trip_and_order(w):
  x = jnp.arange(3 * 2 * w * 5 * 2).reshape(3, 2 * w * 5, 2)  # (B, N, H), 5 tokens per chunk
  z = lasp_jax.zigzag(x, w)
  np.testing.assert_array_equal(lasp_jax.unzigzag(z, w), x)
  # Device r holds chunks (r, 2W-1-r) in that order.
  chunks = np.asarray(z[0, :, 0]).reshape(w, 2, 5) // 2 // 5
  np.testing.assert_array_equal(chunks[:, 0, 0], np.arange(w))
  np.testing.assert_array_equal(chunks[:, 1, 0], 2 * w - 1 - np.arange(w))
  # Other axes.
  np.testing.assert_array_equal(lasp_jax.unzigzag(lasp_jax.zigzag(x, w, axis=1), w, axis=1), x)
  y = jnp.swapaxes(x, 0, 1)
  np.testing.assert_array_equal(lasp_jax.zigzag(y, w, axis=0), jnp.swapaxes(z, 0, 1))


@pytest.mark.parametrize("name", ["contiguous", "zigzag"])
def test_local_positions_are_the_true_positions(name):
  w, n = 4, 32
  c = n // w
  natural = np.arange(n)
  stored = np.asarray(lasp_jax.zigzag(jnp.asarray(natural)[None], w)[0]) if name == "zigzag" \
      else natural
  for r in range(w):
    np.testing.assert_array_equal(layout.local_positions(name, r, w, c), stored[r * c:(r + 1) * c])


def test_errors():
  x = jnp.zeros((1, 24, 2))
  with pytest.raises(ValueError, match=r"length 24 .* not divisible by 2 \* num_shards = 16"):
    lasp_jax.zigzag(x, 8)
  with pytest.raises(ValueError, match="sequence length 24 .* not divisible"):
    lasp_jax.unzigzag(x, 8)
  with pytest.raises(ValueError, match="num_shards must be a positive int"):
    lasp_jax.zigzag(x, 0)
  with pytest.raises(ValueError, match="layout must be one of .* got 'ring'"):
    layout.local_positions("ring", 0, 4, 8)
