"""The TPU interpreter's race detector, read after every kernel call.

The interpreter keeps its race state in a module global that the next kernel call replaces, so
reading it once at the end of a test sees only the last call (a race in the forward would be gone
after the backward). This wraps the interpreter's per-call clean-up to record each call's result.
The module is private, but JAX 0.10 and 0.11 (the supported range) both have it: a move is a
test failure here, not a skipped check.
"""

import contextlib
import importlib

INTERPRETER = "jax._src.pallas.mosaic.interpret.interpret_pallas_call"


@contextlib.contextmanager
def races_per_call(monkeypatch):
  """Yields a list that gets one bool per interpreted kernel call: whether it raced."""
  mod = importlib.import_module(INTERPRETER)
  assert hasattr(mod, "races") and hasattr(mod, "_clean_up_shared_memory"), (
      f"{INTERPRETER} changed: the race check cannot read the detector")
  found = []
  original = mod._clean_up_shared_memory

  def clean_up(*args, **kwargs):
    if mod.races is not None:
      found.append(bool(mod.races.races_found))
    return original(*args, **kwargs)

  monkeypatch.setattr(mod, "_clean_up_shared_memory", clean_up)
  yield found
