"""Smoke test: benchmarks/decode.py runs at toy size (``--quick``) and writes JSON + PNG.

Not a timing test. What it checks is what the benchmark is about: rows for the three models at
every prompt length, the pure linear model's cache the same size at every length, the softmax
models' caches growing with it, and the SP prefill giving the one-device logits.
"""

import json

from tests.benchmarks.test_sp_benchmarks import _script


def test_decode_benchmark_quick(tmp_path):
  out = tmp_path / "decode.json"
  # basic: the cheapest variant to compile (the gated_deltanet default adds ~10 s of compiles);
  # decoding of every variant is tested in tests/models/test_decoding.py.
  _script("decode").main(["--quick", "--variant", "basic", "--out", str(out)])
  data = json.loads(out.read_text())
  assert (tmp_path / "decode.png").stat().st_size > 0
  lens = data["args"]["prompt_lens"]
  assert len(lens) >= 2
  rows = {(r["model"], r["prompt_len"]): r for r in data["rows"]}
  assert set(rows) == {(m, p) for m in ("linear", "hybrid", "softmax") for p in lens}
  for r in data["rows"]:
    assert r["decode_tok_s"] > 0 and r["cache_bytes"] > 0
    assert (r["prefill_s"] is None) == (r["prefill"] == "synthetic")
  # Quick mode prefills the softmax models at the shortest length only: both paths are covered.
  assert rows[("softmax", lens[0])]["prefill"] == "real"
  assert rows[("softmax", lens[-1])]["prefill"] == "synthetic"
  assert all(rows[("linear", p)]["prefill"] == "real" for p in lens)
  linear = [rows[("linear", p)]["cache_bytes"] for p in lens]
  assert len(set(linear)) == 1, linear
  for name in ("hybrid", "softmax"):
    sizes = [rows[(name, p)]["cache_bytes"] for p in lens]
    assert all(a < b for a, b in zip(sizes, sizes[1:])), (name, sizes)
  for p in lens:
    assert (rows[("linear", p)]["cache_bytes"] < rows[("hybrid", p)]["cache_bytes"]
            < rows[("softmax", p)]["cache_bytes"])
  assert {r["model"] for r in data["ratios_vs_softmax"]} == {"linear", "hybrid"}
  sp = data["sp_prefill"]
  assert sp["devices"] == 2 and sp["sp_s"] > 0 and sp["one_device_s"] > 0
  assert sp["max_abs_logit_diff"] < 1e-4
