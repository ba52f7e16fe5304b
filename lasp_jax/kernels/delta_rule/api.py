"""Public entry point of the delta-rule kernels: validates inputs, picks a backend per stage.

The delta rule runs in three stages (``reference`` module docstring): the WY solve per chunk
(XLA: batched ``c x c`` triangular solves and matmuls; or the chunk-parallel Triton kernels of
``pallas_gpu`` on a GPU), the
sequential state pass over chunks (XLA ``lax.scan`` or the Pallas kernels of ``pallas_tpu`` /
``pallas_gpu``, forward and backward) and the output, which is diagonal-decay linear attention with
the corrected values ``U`` (``lasp_jax.kernels.linear_attention``: XLA or its Pallas kernels).

Sequence-parallel callers use the phases separately: :func:`prepare` (stage 1), then
``reference.segment_summary`` for the exchange, then :func:`apply` (stages 2-3) from the incoming
state. :func:`chunk_delta_rule` is all of it on one device.

Input contract: that of the linear-attention ops (``lasp_jax.kernels.linear_attention.api``) plus
``beta (B, N, H)`` in ``[0, 2]`` (above 1 the transition has a negative eigenvalue: Grazzi et al.,
2024); a concrete beta outside it is a ValueError naming the value and its index. The op does not
normalise k: with ``||k_i|| = 1`` and ``beta <= 2`` every transition has norm <= 1, so the
recurrence cannot grow; the models L2-normalise q and k.

Non-finite inputs (:func:`chunk_delta_rule`): as the linear-attention ops (``linear_attention
.reference`` module docstring), the stages run on the finite part of the inputs and the outputs a
non-finite entry reaches are marked NaN: from token ``j`` to the end of its document for a
non-finite ``k_j``, ``beta_j`` or ``g_j`` (every channel: the transition mixes the state's rows),
channel ``d`` for ``v_j[d]``; a NaN never crosses a reset, and the gradients are finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lasp_jax.kernels import dispatch
from lasp_jax.kernels._checks import check_float_array
from lasp_jax.kernels.delta_rule import reference
from lasp_jax.kernels.linear_attention import api as la_api
from lasp_jax.kernels.linear_attention import reference as la_ref

BACKENDS = dispatch.BACKENDS
BETA_MAX = 2.0


def check_beta(beta, shape):
  """Raises unless ``beta`` is a float array of ``shape`` (B, N, H) with (if concrete) every
  entry in ``[0, 2]``; NaN is not checked (it propagates forward only)."""
  check_float_array("beta", beta, "(B, N, H)")
  if tuple(beta.shape) != tuple(shape):
    raise ValueError(f"beta must have shape (B, N, H)={tuple(shape)}, got {tuple(beta.shape)}")
  la_api._check_not_float64("beta", beta)
  if isinstance(beta, jax.core.Tracer):
    return
  b = np.asarray(jax.device_get(beta), np.float64)
  bad = ~np.isnan(b) & ((b < 0) | (b > BETA_MAX))
  if bad.any():
    flat = int(np.flatnonzero(bad)[0])
    raise ValueError(f"beta must lie in [0, {BETA_MAX:g}] (above 1: negative eigenvalues), got "
                     f"{float(b.flat[flat]):.6g} at index {la_api._index_str(flat, b.shape)}")


def validate_inputs(q, k, v, beta, log_decay=None, initial_state=None, chunk_size=None, scale=1.0,
                    segment_ids=None):
  """The linear-attention contract plus ``beta``; raises ValueError/TypeError naming the value."""
  la_api.validate_inputs(q, k, v, log_decay, initial_state, chunk_size, scale, segment_ids)
  check_beta(beta, q.shape[:3])


def _state_pass(backend):
  if backend == "xla":
    return reference.delta_state_pass_xla
  if backend == "tpu":
    from lasp_jax.kernels.delta_rule import pallas_tpu
    return pallas_tpu.delta_state_pass_tpu
  from lasp_jax.kernels.delta_rule import pallas_gpu
  return pallas_gpu.delta_state_pass_gpu


def prepare(k, v, beta, log_decay=None, *, chunk_size=64, backend="xla",
            interpret=None) -> reference.DeltaChunks:
  """Stage 1 on validated inputs: ``reference.prepare_chunks`` with the decay in per-token form.

  ``log_decay`` already holds any document resets (``la_api.reset_log_decay``). ``backend``:
  ``"gpu"`` runs the Triton kernels (``pallas_gpu.prepare_chunks_gpu``) where they tile the
  inputs (a scalar decay per token, power-of-two sizes), ``"auto"`` as the dispatch table says;
  everything else (and ``"tpu"``, which has no prepare kernel) runs on XLA.
  """
  bsz, n, h, _ = k.shape
  g = la_ref.per_token_log_decay(log_decay, bsz, n, h)
  chunk = reference.chunk_len(chunk_size, g)
  if backend in (None, "auto"):
    backend = dispatch.auto_backend("delta_prepare", k.dtype)
  if backend == "gpu":
    from lasp_jax.kernels.delta_rule import pallas_gpu
    try:
      pallas_gpu.check_prepare_shapes(k, v, g, chunk)
    except (ValueError, TypeError):
      backend = "xla"
  if backend != "gpu":
    return reference.prepare_chunks(k, v, beta, g, chunk)
  if interpret is None:
    interpret = la_api.default_backend() != "gpu"
  return pallas_gpu.prepare_chunks_gpu(k, v, beta, g, chunk, interpret=interpret)


def apply(q, k, chunks, log_decay=None, *, scale=1.0, initial_state=None, chunk_size=64,
          backend="xla", interpret=None):
  """Stages 2-3 from ``initial_state``: returns ``(o (B, N, H, Dv) in q's dtype, final_state)``.

  ``chunks`` from :func:`prepare` of the same tokens; ``log_decay`` as given to it; ``backend``
  ``"xla"``, ``"tpu"``, ``"gpu"`` or ``"auto"`` (each stage as ``lasp_jax.kernels.dispatch`` says for the
  default device). On the GPU the state pass's dots take q's dtype (bf16: tensor cores).
  """
  if backend in (None, "auto"):
    pass_backend = dispatch.auto_backend("delta_state_pass", q.dtype)
    la_backend = "auto"
  else:
    pass_backend = la_backend = backend
  bsz, _, h, dk = q.shape
  dv = chunks.u0.shape[-1]
  s0 = (jnp.zeros((bsz, h, dk, dv), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  if not _pallas_tiles(pass_backend, chunks):
    pass_backend = "xla"
  if pass_backend == "xla":
    u, s_final = reference.delta_state_pass_xla(chunks.w, chunks.u0, chunks.k_end,
                                                chunks.gamma, s0)
  else:
    kwargs = {} if interpret is None else {"interpret": interpret}
    if interpret is None:
      kwargs["interpret"] = la_api.default_backend() != pass_backend
    if pass_backend == "gpu":
      kwargs["operand_dtype"] = q.dtype if q.dtype == jnp.bfloat16 else jnp.float32
    u, s_final = _state_pass(pass_backend)(chunks.w, chunks.u0, chunks.k_end, chunks.gamma,
                                           s0, **kwargs)
  u = reference.values_to_tokens(u).astype(q.dtype)
  if la_backend != "xla":
    # The output stage is linear attention: its own table entry, or XLA where no kernel tiles it.
    resolved = la_api.resolve_backend("auto", q, u, log_decay, chunk_size)
    la_backend = resolved if la_backend == "auto" or resolved == la_backend else "xla"
  o, _ = la_api.chunk_linear_attention(
      q, k.astype(q.dtype), u, log_decay, scale=scale, initial_state=s0, chunk_size=chunk_size,
      backend=la_backend, interpret=interpret)
  return o, s_final


def _pallas_tiles(backend, chunks) -> bool:
  """Whether the state-pass kernel of ``backend`` can tile these chunks (else XLA runs it)."""
  if backend == "xla":
    return False
  module = _state_pass(backend).__module__
  check = getattr(__import__(module, fromlist=["check_shapes"]), "check_shapes")
  try:
    check(chunks.w, chunks.u0, chunks.k_end, chunks.gamma)
  except (ValueError, TypeError):
    return False
  return True


def resolve_backend(backend) -> str:
  """``None``/``"auto"`` stay ``"auto"`` (:func:`apply` resolves each stage by
  ``lasp_jax.kernels.dispatch``); else as given."""
  if backend in (None, "auto"):
    return "auto"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS} or None, got {backend!r}")
  return backend


def chunk_delta_rule(q, k, v, beta, log_decay=None, *, scale=1.0, initial_state=None,
                     segment_ids=None, chunk_size=64, backend=None, interpret=None):
  """The causal delta rule (design §11), chunked, on one device.

  ``S_i = (I - beta_i k_i^T k_i) diag(exp g_i) S_{i-1} + beta_i k_i^T v_i``, ``o_i = scale q_i S_i``.

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; float32, bfloat16 or float16 (XLA path).
    beta: ``(B, N, H)``, in ``[0, 2]``.
    log_decay: None (DeltaNet), ``(H,)``, ``(B, N, H)`` (Gated DeltaNet) or ``(B, N, H, Dk)``
      (KDA); entries in ``[-inf, 0]`` (``-inf``: an exact reset).
    scale: multiplies q; None means ``Dk ** -0.5``.
    initial_state: None (zeros) or ``(B, H, Dk, Dv)``, feeding the first document of each row.
    segment_ids: None or ``(B, N)`` int: packed documents; the state restarts from zero wherever
      the id differs from the previous token's (an exact ``-inf`` decay there).
    chunk_size: tokens per chunk (the WY block); must divide N. A per-channel decay uses its
      largest divisor <= 16 for the solve.
    backend: ``"xla"``, ``"tpu"``, ``"gpu"``, ``"auto"`` or None (from the default device); a
      Pallas stage that cannot tile the shapes runs on XLA.
    interpret: run Pallas kernels in interpret mode; None: when not on their hardware.

  Returns:
    ``(o, final_state)``: ``o (B, N, H, Dv)`` in q's dtype, ``final_state (B, H, Dk, Dv)`` float32.
  """
  validate_inputs(q, k, v, beta, log_decay, initial_state, chunk_size, scale, segment_ids)
  scale = la_ref.resolve_scale(scale, q.shape[-1])
  backend = resolve_backend(backend)
  if segment_ids is not None:
    log_decay = la_api.reset_log_decay(log_decay, segment_ids, q.shape[2])
  # Non-finite inputs (module docstring): the stages on the finite inputs, then the marks.
  bsz, n, h, _ = q.shape
  raw = (q, k, v, la_ref.per_token_log_decay(log_decay, bsz, n, h), initial_state)
  beta_bad = ~jnp.isfinite(beta)
  q, k, v, beta = (la_ref.finite_values(x) for x in (q, k, v, beta))
  log_decay = la_ref.finite_log_decay(log_decay)
  initial_state = None if initial_state is None else la_ref.finite_values(initial_state)
  chunks = prepare(k, v, beta, log_decay, chunk_size=chunk_size, backend=backend,
                   interpret=interpret)
  o, s_final = apply(q, k, chunks, log_decay, scale=scale, initial_state=initial_state,
                     chunk_size=chunk_size, backend=backend, interpret=interpret)
  return la_ref.mark_nonfinite_outputs(o, s_final, *raw, token_bad=beta_bad,
                                      state_mixes_rows=True)
