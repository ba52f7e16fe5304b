"""Smoke test: each sequence-parallel benchmark script runs at toy size and writes JSON + PNG.

Not a timing test. The methods' exactness is tested in tests/baselines.
"""

import importlib.util
import json
import math
import os

import pytest

import lasp_jax  # noqa: F401  (the real `kernels` package is imported before benchmarks/ is on the path)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                os.path.join(ROOT, "benchmarks", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("name,extra", [
    ("sp_speed", ["--methods", "lasp2", "ring_linear"]),
    ("memory", ["--methods", "lasp2", "ulysses_linear"]),
    ("scaling", ["--methods", "lasp2", "lasp1", "--hardware", "a100"]),
])
def test_script_runs(tmp_path, name, extra):
  out = tmp_path / f"{name}.json"
  _script(name).main(["--small", "--out", str(out)] + extra)
  data = json.loads(out.read_text())
  _check_rows(name, data, [a for a in extra[1:] if not a.startswith("--")][:2])
  assert (tmp_path / f"{name}.png").stat().st_size > 0


def _check_rows(name, data, methods):
  """The JSON holds a row per requested method with sane values (not just something)."""
  rows = [r for r in data["rows"] if "skipped" not in r]
  assert {r["method"] for r in rows} == set(methods), [r["method"] for r in rows]
  if name == "sp_speed":
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows), rows
    by = {(r["method"], r["n"]): r for r in rows}
    for r in rows:   # the ratio is to LASP-2's time at the same N (1 for LASP-2 itself)
      assert r["ratio_to_lasp"] == pytest.approx(r["ms"] / by[("lasp2", r["n"])]["ms"]), r
  elif name == "memory":
    assert all(isinstance(r["peak"], int) and r["peak"] > 0 for r in rows), rows
    assert set(data["longest_within_budget"]) == set(methods)
  elif name == "scaling":
    for r in rows:
      assert r["step_serial_s"] == pytest.approx(r["compute_s"] + r["comm_s"]), r
      assert r["step_overlap_s"] == pytest.approx(max(r["compute_s"], r["comm_s"])), r
      if r["method"] == "lasp2":
        assert r["lasp2_gain_pct_serial"] == 0.0, r
      elif r["devices"] > 2:   # LASP-1's chained permutes: more sequential steps than one gather
        lasp2 = [x for x in rows if x["method"] == "lasp2" and x["devices"] == r["devices"]
                 and x["n"] == r["n"]][0]
        assert r["layer_steps"] > lasp2["layer_steps"], (r, lasp2)


def test_comm_runs_and_counts_match_spec9(tmp_path):
  """comm.py at toy size (W=4); its HLO counts are what design §9 says: LASP-2 one
  all-gather (1 step), LASP-1 W-1 = 3 chained state permutes, both receiving W-1 float32 states;
  the exchange sweep's scan rows are its schedule's permutes."""
  out = tmp_path / "comm.json"
  rows, _ = _script("comm").main(["--small", "--out", str(out), "--methods", "lasp2", "lasp1",
                                  "ulysses_softmax"])
  assert json.loads(out.read_text())["n_sweep"]
  assert (tmp_path / "comm.png").stat().st_size > 0
  fwd = {r["method"]: r for r in rows if r["passes"] == "fwd"}
  assert set(fwd["lasp2"]["by_kind"]) == {"all-gather"}
  assert set(fwd["lasp1"]["by_kind"]) == {"collective-permute"}
  assert set(fwd["ulysses_softmax"]["by_kind"]) == {"all-to-all"}
  assert fwd["ulysses_softmax"]["collectives"] == 4
  for m in ("lasp2", "lasp1"):
    assert fwd[m]["received_bytes"] == fwd[m]["spec9_fwd_bytes"]
    assert fwd[m]["sequential_steps"] == fwd[m]["spec9_fwd_steps"]
  assert fwd["lasp1"]["sequential_steps"] == 3
  # The exchange sweep (design §10, W = 4, zigzag at toy size): the scan is the schedule's permutes
  # (+ the final state's all-reduce), never an all-gather; the all-gather one all-gather.
  from lasp_jax.sequence_parallel import exchange
  ex = json.loads(out.read_text())["exchange_sweep"]
  assert {(r["strategy"], r["kind"], r["passes"]) for r in ex} == {
      (s, k, p) for s in ("allgather", "scan") for k in ("diagonal", "delta")
      for p in ("fwd", "fwd+bwd")}
  for r in ex:
    if r["strategy"] == "scan":
      assert set(r["by_kind"]) == {"collective-permute", "all-reduce"}, r["by_kind"]
      want = exchange.scan_counts(r["layout"], r["w"])["permutes"]
      per_pass = 1 if r["passes"] == "fwd" else 2
      assert r["by_kind"]["collective-permute"]["count"] == want * per_pass
    elif r["passes"] == "fwd":
      assert r["by_kind"]["all-gather"]["count"] == 1
  assert (tmp_path / "comm_exchange.png").stat().st_size > 0
