"""Sequence-parallel attention ops: LASP-2 (linear), LASP-2H (softmax), layouts."""
