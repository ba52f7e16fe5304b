"""Merges the device check's kernel and training-step JSON into one report, ``kernels_gpu.json``.

  python benchmarks/gpu_report.py --kernels $OUT/kernels.json --train $OUT/train.json \\
      --out $OUT/kernels_gpu.json [--copy-to benchmarks/results/kernels_gpu.json]

Schema (issue 22)::

  {"device_kind", "jax_version",
   "rows": [{"kernel": "linear_attention" | "delta_rule", "shape": "B8 N8192 H16 D128 bf16",
             "decay", "pallas_fwd_bwd_ms", "xla_fwd_bwd_ms", "roofline_fraction", "max_rel_err"}],
   "train": [{"config", "backend", "tok_s", "mfu"}]}

From ``benchmarks/kernels.py`` JSON: one row per kernel family, shape, dtype and decay it timed;
``pallas_fwd_bwd_ms`` and ``roofline_fraction`` (0..1, kernels.py's yardstick) are of the default
block sizes (row ``pallas`` / ``delta-pallas``; the sweep's variants stay in kernels.json),
``xla_fwd_bwd_ms`` of ``xla`` / ``delta-xla``. ``max_rel_err`` is the largest ``pallas_vs_f64``
of the compiled check (``--check``) of that family and decay, over every output and gradient,
dtype and check shape (the checks run at their own, smaller shapes); a (family, decay) that was
checked but not timed gets a row of its own, with the check's shape and null times. Null: not
measured, or failed (a kernel that errored, a check that crashed or gave non-finite values; each
is printed). From ``benchmarks/train_step.py`` JSON: tokens/s and MFU per config and backend.
Either input may be missing (a stage that timed out): its part of the report is then empty.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

FAMILIES = ("linear_attention", "delta_rule")
_DTYPES = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


def _read(path):
  if not path or not os.path.exists(path):
    print(f"gpu_report: {path} missing, its part of the report stays empty")
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    print(f"gpu_report: {path} is not JSON ({e}), its part of the report stays empty")
    return {}


def _family(row):
  """kernels.py marks delta-rule timings by ``impl``; checks of either family may name it."""
  named = row.get("kernel") or row.get("family")
  if named in FAMILIES:
    return named
  return "delta_rule" if "delta" in str(row.get("impl", "")) else "linear_attention"


def shape_str(shape, dtype):
  b, n, h, dk, dv = shape
  d = f"D{dk}" if dk == dv else f"Dk{dk} Dv{dv}"
  return f"B{b} N{n} H{h} {d} {_DTYPES.get(dtype, dtype)}"


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


def check_errors(checks):
  """``{(family, decay): max pallas_vs_f64 or None}``; None when any check of the pair failed."""
  out = {}
  for r in checks:
    key = (_family(r), r.get("decay"))
    err = r.get("pallas_vs_f64")
    bad = "error" in r or r.get("finite") is False or not _finite(err)
    if bad:
      print(f"gpu_report: check FAILED {key} {r.get('dtype')} {r.get('shape')} {r.get('out')}: "
            f"{r.get('error', err)}")
    prev = out.get(key, 0.0)
    out[key] = None if bad or prev is None else max(prev, float(err))
  return out


def kernel_rows(kern):
  timed = {}   # (family, shape, dtype, decay) -> {"pallas": row, "xla": row}
  for r in kern.get("rows", []):
    impl = r.get("impl", "")
    kind = {"pallas": "pallas", "delta-pallas": "pallas", "xla": "xla",
            "delta-xla": "xla"}.get(impl)
    if kind is None:          # a block-size variant of the sweep
      continue
    key = (_family(r), tuple(r["shape"]), r.get("dtype", "bfloat16"), r["decay"])
    timed.setdefault(key, {})[kind] = r
    if "error" in r:
      print(f"gpu_report: {impl} {r['shape']} {r['decay']} errored: {r['error'][:200]}")
  checks = kern.get("check", [])
  errs = check_errors(checks)
  rows = []
  for (family, shape, dtype, decay), by in timed.items():
    pal, xla = by.get("pallas", {}), by.get("xla", {})
    roof = pal.get("fwdbwd_roofline_pct")
    rows.append({"kernel": family, "shape": shape_str(shape, dtype), "decay": decay,
                 "pallas_fwd_bwd_ms": pal.get("fwdbwd_ms"), "xla_fwd_bwd_ms": xla.get("fwdbwd_ms"),
                 "roofline_fraction": None if roof is None else roof / 100.0,
                 "max_rel_err": errs.get((family, decay))})
  timed_pairs = {(f, d) for f, _, _, d in timed}
  untimed = {}                # checked, never timed (e.g. the (H,) decay): a bf16 shape preferred
  for r in checks:
    key = (_family(r), r.get("decay"))
    if key in timed_pairs or "shape" not in r:
      continue
    if key not in untimed or (r.get("dtype") == "bfloat16" and untimed[key][1] != "bfloat16"):
      untimed[key] = (r["shape"], r.get("dtype"))
  for (family, decay), (shape, dtype) in untimed.items():
    rows.append({"kernel": family, "shape": shape_str(shape, dtype), "decay": decay,
                 "pallas_fwd_bwd_ms": None, "xla_fwd_bwd_ms": None, "roofline_fraction": None,
                 "max_rel_err": errs.get((family, decay))})
  return rows


def train_rows(train):
  return [{"config": r.get("config"), "backend": r.get("backend"), "tok_s": r.get("tok_s"),
           "mfu": r.get("mfu")} for r in train.get("rows", [])]


def report(kern, train):
  return {"device_kind": kern.get("device") or train.get("device_kind"),
          "jax_version": kern.get("jax_version") or train.get("jax_version"),
          "rows": kernel_rows(kern), "train": train_rows(train)}


def _num(x, fmt):
  return "-" if x is None else format(x, fmt)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kernels", required=True, help="benchmarks/kernels.py --check JSON")
  p.add_argument("--train", required=True, help="benchmarks/train_step.py JSON")
  p.add_argument("--out", required=True)
  p.add_argument("--copy-to", default=None, help="also write the report here")
  args = p.parse_args(argv)
  rep = report(_read(args.kernels), _read(args.train))
  for path in filter(None, (args.out, args.copy_to)):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(rep, f, indent=1)
  if args.copy_to:
    shutil.copyfile(args.out, args.copy_to)
  print(f"\n{rep['device_kind']}, jax {rep['jax_version']}")
  print(f"{'kernel':17s} {'shape':30s} {'decay':6s} {'pallas ms':>10s} {'xla ms':>9s} "
        f"{'roofline':>8s} {'max rel err':>11s}")
  for r in rep["rows"]:
    print(f"{r['kernel']:17s} {r['shape']:30s} {str(r['decay']):6s} "
          f"{_num(r['pallas_fwd_bwd_ms'], '10.3f'):>10s} {_num(r['xla_fwd_bwd_ms'], '9.3f'):>9s} "
          f"{_num(r['roofline_fraction'], '8.3f'):>8s} {_num(r['max_rel_err'], '11.2e'):>11s}")
  print(f"\n{'config':28s} {'backend':8s} {'tokens/s':>10s} {'MFU':>7s}")
  for r in rep["train"]:
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
    print(f"{str(r['config']):28s} {str(r['backend']):8s} {_num(r['tok_s'], '10.0f'):>10s} "
          f"{mfu:>7s}")
  print(f"wrote {args.out}" + (f" and {args.copy_to}" if args.copy_to else ""))
  return rep


if __name__ == "__main__":
  main()
