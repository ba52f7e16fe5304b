"""Segment summaries: the affine maps ``S_out = M S_in + E`` that the exchange moves and folds
(design §10), one type per family, and the :class:`Summary` protocol they meet."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from lasp_jax.kernels.linear_attention import reference as ref

class Summary(Protocol):
  """What the exchange needs of a family's summary (a pytree whose leaves lead with the segment
  and batch axes): its ``state`` (an array, or a pytree of them: the part sent in the scan's last
  round, and what the exchange returns), the same summary with another state, composition, a reset
  where a document starts, and the transpose for the scan's backward."""
  state: jax.Array

  def with_state(self, state) -> "Summary": ...

  def compose(self, earlier: "Summary") -> "Summary": ...

  def reset(self, starts_B) -> "Summary": ...

  def transpose(self) -> "Summary": ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalSummary:
  """``S_out = diag(exp(gamma)) S_in + state`` for a batch of segments.

  ``gamma (B, H, Dg)``: the direct sum of the segment's log-decays, clamped (``Dg`` 1 or Dk; a
  reset is ``ref.LOG_DECAY_FLOOR``, whose exp is exactly 0); ``state (B, H, Dk, Dv)`` float32: the
  segment's state from zero.
  """
  gamma: jax.Array
  state: jax.Array

  def with_state(self, state) -> "DiagonalSummary":
    return dataclasses.replace(self, state=state)

  def compose(self, earlier: "DiagonalSummary") -> "DiagonalSummary":
    """``self o earlier``: first ``earlier``, then ``self``."""
    return DiagonalSummary(jnp.maximum(self.gamma + earlier.gamma, ref.LOG_DECAY_FLOOR),
                           jnp.exp(self.gamma)[..., None] * earlier.state + self.state)

  def reset(self, starts_B) -> "DiagonalSummary":
    """The summary with its incoming state dropped (``M = 0``) where ``starts_B`` (B,) is True."""
    return DiagonalSummary(jnp.where(starts_B[:, None, None], ref.LOG_DECAY_FLOOR, self.gamma),
                           self.state)

  def transpose(self) -> "DiagonalSummary":
    """The summary with ``M^T`` (a diagonal is its own transpose): the scan's backward runs the
    transposed recurrence ``lambda_p = M_p^T lambda_{p+1} + g_p`` through the same scan."""
    return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaSummary:
  """``S_out = m S_in + state`` for a batch of segments of the delta rule (design §11).

  ``m (B, H, Dk, Dk)`` float32: the segment's transition, the product of its tokens'
  ``(I - beta_i k_i^T k_i) diag(exp g_i)`` (a reset is ``m = 0``); ``state (B, H, Dk, Dv)``
  float32: the segment's state from zero.
  """
  m: jax.Array
  state: jax.Array

  def with_state(self, state) -> "DeltaSummary":
    return dataclasses.replace(self, state=state)

  def compose(self, earlier: "DeltaSummary") -> "DeltaSummary":
    """``self o earlier``: first ``earlier``, then ``self``."""
    mm = lambda a, b: jnp.einsum("...ij,...jk->...ik", a, b,  # noqa: E731
                                 precision=jax.lax.Precision.HIGHEST)
    return DeltaSummary(mm(self.m, earlier.m), mm(self.m, earlier.state) + self.state)

  def reset(self, starts_B) -> "DeltaSummary":
    """The summary with its incoming state dropped (``m = 0``) where ``starts_B`` (B,) is True."""
    return DeltaSummary(jnp.where(starts_B[:, None, None, None], 0.0, self.m), self.state)

  def transpose(self) -> "DeltaSummary":
    """The summary with ``m^T``, for the scan's backward (see ``DiagonalSummary.transpose``)."""
    return DeltaSummary(jnp.swapaxes(self.m, -1, -2), self.state)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Marked:
  """A family's summary with where non-finite inputs reach (design §13b), carried in the same
  exchange so that a NaN crosses devices exactly as far as the recurrence carries it.

  ``inner``: the summary of the finite computation; ``keep (B, H, 1)``: 1.0 where the segment has
  no reset (marks before it reach past it), else 0.0; ``bad (B, H, Dv)``: 1.0 where column ``d``
  of the state after the segment is non-finite from inputs after its last reset. The marks fold
  by products and maxima of zeros and ones: exact, and never NaN. ``state`` is the pair
  ``(inner.state, bad)``.
  """
  inner: DiagonalSummary | DeltaSummary
  keep: jax.Array
  bad: jax.Array

  @property
  def state(self):
    return self.inner.state, self.bad

  def with_state(self, state) -> "Marked":
    return Marked(self.inner.with_state(state[0]), self.keep, state[1])

  def compose(self, earlier: "Marked") -> "Marked":
    """``self o earlier``: first ``earlier``, then ``self``."""
    return Marked(self.inner.compose(earlier.inner), self.keep * earlier.keep,
                  jnp.maximum(self.bad, self.keep * earlier.bad))

  def reset(self, starts_B) -> "Marked":
    return Marked(self.inner.reset(starts_B),
                  jnp.where(starts_B[:, None, None], 0.0, self.keep), self.bad)

  def transpose(self) -> "Marked":
    return Marked(self.inner.transpose(), self.keep, self.bad)


def _bits(ids):
  """Integer ids ``(S, B)`` -> float32 ``(S, B, k)`` holding the same bits (``k = 2`` for 64-bit
  ids), so that they travel exactly in the float buffer and keep their whole width."""
  if ids.dtype.itemsize < 4:
    ids = ids.astype(jnp.int32)
  return jax.lax.bitcast_convert_type(ids, jnp.float32).reshape(*ids.shape, -1)
