"""The delta rule (DeltaNet, Gated DeltaNet, KDA): the chunked WY form in XLA, Pallas kernels for
the WY prepare (GPU) and the state pass, and the linear-attention kernels for the output (design
§11)."""

from lasp_jax.kernels.delta_rule.api import (apply, check_beta, chunk_delta_rule, prepare,
                                    validate_inputs)
from lasp_jax.kernels.delta_rule.reference import DeltaChunks, delta_state_pass_xla, segment_summary

__all__ = ["DeltaChunks", "apply", "check_beta", "chunk_delta_rule", "delta_state_pass_xla",
           "prepare", "segment_summary", "validate_inputs"]
