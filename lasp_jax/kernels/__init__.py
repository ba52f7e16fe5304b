"""Kernels for lasp-jax, one package per family; they know nothing about meshes (``lasp_jax``
composes them across devices)."""

from lasp_jax.kernels import delta_rule, linear_attention
from lasp_jax.kernels.linear_attention import chunk_linear_attention_xla


def chunk_linear_attention(q, k, v, log_decay=None, *, beta=None, scale=1.0, initial_state=None,
                           segment_ids=None, chunk_size=64, backend=None, interpret=None,
                           scores="dot"):
  """Causal chunked linear attention on one device, either family.

  ``beta`` None: the diagonal family (``linear_attention.chunk_linear_attention``, whose
  docstring has the arguments); ``beta`` ``(B, N, H)`` in ``[0, 2]``: the delta rule
  (``delta_rule.chunk_delta_rule``, design §11), which builds on the first and takes the same
  other arguments. Returns ``(o, final_state)``. ``scores="square"`` (ReBased's ``(q . k)^2``
  kernel, ``linear_attention.chunk_linear_attention``) is the diagonal family's only.
  """
  kwargs = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                chunk_size=chunk_size, backend=backend, interpret=interpret)
  if beta is None:
    return linear_attention.chunk_linear_attention(q, k, v, log_decay, scores=scores, **kwargs)
  if scores != "dot":
    raise ValueError(f"scores={scores!r} needs beta=None: the delta rule scores q . k")
  return delta_rule.chunk_delta_rule(q, k, v, beta, log_decay, **kwargs)


__all__ = ["chunk_linear_attention", "chunk_linear_attention_xla", "delta_rule",
           "linear_attention"]
