"""Smoke tests of the device check's Python parts: ``benchmarks/train_step.py --small`` (in a
subprocess without grain and tensorboardX, as on a bare accelerator image) and
``benchmarks/gpu_report.py``'s schema. Not timing tests."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The device image has neither: importing either must fail in the benchmark's process.
_WITHOUT_GRAIN = """
import runpy, sys
sys.modules["grain"] = None
sys.modules["tensorboardX"] = None
sys.argv = ["benchmarks/train_step.py"] + sys.argv[1:]
runpy.run_path("benchmarks/train_step.py", run_name="__main__")
"""


@pytest.mark.slow   # ~40 s; benchmarks/gpu_check.sh --small runs the same dry run
def test_train_step_small_runs_without_grain(tmp_path):
  out = tmp_path / "train.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", _WITHOUT_GRAIN, "--small", "--config",
       "configs/gated_deltanet_1b_hybrid.yaml", "--backends", "auto,xla", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  data = json.loads(out.read_text())
  assert {"device_kind", "jax_version", "peak_tflops", "rows", "skipped"} <= set(data)
  assert [(r["config"], r["backend"]) for r in data["rows"]] == [
      ("gated_deltanet_1b_hybrid", "auto"), ("gated_deltanet_1b_hybrid", "xla")]
  for r in data["rows"]:
    assert "error" not in r, r
    assert {"compile_s", "step_s", "tok_s", "mfu", "flops_per_token", "params"} <= set(r)
    assert r["layer_pattern"] == "LLLN" and r["compute_dtype"] == "bfloat16"
    assert r["finite"] and r["tok_s"] > 0 and 0 < r["mfu"] < 1
  # Same weights, data and maths (on CPU "auto" is the XLA path): the same losses.
  assert data["rows"][0]["loss_last"] == data["rows"][1]["loss_last"]


def test_train_step_bad_backend_is_one_line():
  spec = importlib.util.spec_from_file_location("bench_train_step",
                                                os.path.join(ROOT, "benchmarks", "train_step.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  with pytest.raises(ValueError, match=r"^--backends: unknown backend 'cuda'; choose from [^\n]*$"):
    mod.parse(["--backends", "auto,cuda"])


def test_gpu_report_schema(tmp_path):
  shape = [8, 8192, 16, 128, 128]

  def timing(impl, decay, ms, roof=None):
    return dict(impl=impl, shape=shape, dtype="bfloat16", decay=decay, chunk=64, fwdbwd_ms=ms,
                fwdbwd_roofline_pct=roof if roof is not None else 1.0)

  def check(decay, err, dtype="bfloat16", **extra):
    return dict(dtype=dtype, decay=decay, shape=[2, 512, 4, 128, 128], chunk=64, out="dq",
                pallas_vs_f64=err, xla_vs_f64=1e-3, pallas_vs_xla=err, finite=True, **extra)

  kernels = {"jax_version": "0.11.2", "device": "NVIDIA H200", "rows": [
      timing("pallas", "none", 2.0, 30.0), timing("xla", "none", 13.0),
      timing("pallas w8", "none", 1.5),                     # a sweep variant: not in the report
      timing("delta-pallas", "token", 500.0), timing("delta-xla", "token", 50.0)],
      "check": [check("none", 3e-3), check("none", 1e-5, dtype="float32"),
                check("head", 0.16), check("token", float("nan"), kernel="delta_rule")]}
  train = {"device_kind": "NVIDIA H200", "jax_version": "0.11.2", "rows": [
      dict(config="gated_deltanet_1b_hybrid", backend="auto", tok_s=16700.0, mfu=0.07),
      dict(config="gated_deltanet_1b_hybrid", backend="xla", error="did not finish")]}
  (tmp_path / "k.json").write_text(json.dumps(kernels))
  (tmp_path / "t.json").write_text(json.dumps(train))
  spec = importlib.util.spec_from_file_location("bench_gpu_report",
                                                os.path.join(ROOT, "benchmarks", "gpu_report.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  copy = tmp_path / "results" / "kernels_gpu.json"
  mod.main(["--kernels", str(tmp_path / "k.json"), "--train", str(tmp_path / "t.json"),
            "--out", str(tmp_path / "r.json"), "--copy-to", str(copy)])
  rep = json.loads((tmp_path / "r.json").read_text())
  assert json.loads(copy.read_text()) == rep
  assert set(rep) == {"device_kind", "jax_version", "rows", "train"}
  assert rep["device_kind"] == "NVIDIA H200" and rep["jax_version"] == "0.11.2"
  row_keys = {"kernel", "shape", "decay", "pallas_fwd_bwd_ms", "xla_fwd_bwd_ms",
              "roofline_fraction", "max_rel_err"}
  assert all(set(r) == row_keys for r in rep["rows"])
  rows = {(r["kernel"], r["decay"]): r for r in rep["rows"]}
  assert set(rows) == {("linear_attention", "none"), ("delta_rule", "token"),
                       ("linear_attention", "head")}
  la = rows["linear_attention", "none"]
  assert la["shape"] == "B8 N8192 H16 D128 bf16"
  assert (la["pallas_fwd_bwd_ms"], la["xla_fwd_bwd_ms"], la["roofline_fraction"]) == (
      2.0, 13.0, 0.3)
  assert la["max_rel_err"] == 3e-3                          # the worst over dtypes
  assert rows["delta_rule", "token"]["max_rel_err"] is None     # a non-finite check: failed
  head = rows["linear_attention", "head"]                       # checked, not timed
  assert head["pallas_fwd_bwd_ms"] is None and head["max_rel_err"] == 0.16
  assert head["shape"] == "B2 N512 H4 D128 bf16"
  assert rep["train"] == [
      dict(config="gated_deltanet_1b_hybrid", backend="auto", tok_s=16700.0, mfu=0.07),
      dict(config="gated_deltanet_1b_hybrid", backend="xla", tok_s=None, mfu=None)]
