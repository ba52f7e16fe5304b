"""Baseline sequence-parallel methods, for comparison with LASP-2 (benchmarks/): not for training.

Same API style as ``lasp_jax.lasp2`` / ``lasp_jax.lasp2_attention``: a per-shard function taking
``axis_name`` (inside the caller's ``jax.shard_map``) and a global-array function taking
``mesh=None, seq_axis="sp", batch_axis=None``. All are exact (tested against the float64 references).

Linear attention (causal):
- ``lasp1`` / ``lasp1_attention``: LASP-1, the state passed around a ring, ``W - 1`` sequential
  ``ppermute`` steps each way. Decays: none, ``(H,)``, ``(B, N, H)``, ``(B, N, H, Dk)``.
- ``ring_linear`` / ``ring_linear_attention``: ring attention in the left-product form
  ``[(Q K^T) * M] V`` (the LASP-2 paper's "Ring Attention" baseline). Decays: none, ``(H,)``.
- ``ulysses_linear`` / ``ulysses_linear_attention``: all-to-all over heads, local chunked linear
  attention, all-to-all back (``H % W == 0``).

Softmax attention (causal or not, GQA):
- ``ring_softmax`` / ``ring_softmax_attention``: K/V blocks around the ring, online softmax.
- ``ulysses_softmax`` / ``ulysses_softmax_attention``: all-to-all over heads (``H % W == 0``).
- All-gather of K/V: that is LASP-2H, ``lasp_jax.lasp2h_attention``, not repeated here.
"""

from lasp_jax.baselines.lasp1 import lasp1, lasp1_attention
from lasp_jax.baselines.ring import (ring_linear, ring_linear_attention, ring_softmax,
                                     ring_softmax_attention)
from lasp_jax.baselines.ulysses import (ulysses_linear, ulysses_linear_attention, ulysses_softmax,
                                        ulysses_softmax_attention)

__all__ = ["lasp1", "lasp1_attention", "ring_linear", "ring_linear_attention", "ring_softmax",
           "ring_softmax_attention", "ulysses_linear", "ulysses_linear_attention",
           "ulysses_softmax", "ulysses_softmax_attention"]
