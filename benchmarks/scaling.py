"""A model of time per training step at the LASP-2 paper's scale, beside the paper's numbers.

  python benchmarks/scaling.py [--out benchmarks/results/scaling.json] [--small]

Model: Linear-Llama3-1B (16 layers, hidden 2048, 16 heads of 128, SwiGLU FFN 8192, vocab 128256),
basic linear attention (no decay), one sequence of N tokens split over P devices (C = N / P each),
for LASP-2, LASP-1, ring attention in the left-product form (the paper's Ring Attention baseline)
and Ulysses. Per device and step:

  compute = (dense FLOPs + 16 x attention-core FLOPs) / (peak FLOP/s x MFU)
  comm    = 16 x (bytes received per layer / link bandwidth + sequential steps x latency)
  step    = compute + comm (no overlap)   ...   max(compute, comm) (perfect overlap)

- Collective bytes and sequential steps per layer (forward+backward) are MEASURED: each method's
  program is compiled on --measure-w simulated CPU devices at the same per-device length C and
  its HLO read (benchmarks/_methods.py), then scaled to P devices by (P - 1) / (W - 1) (every
  method's traffic and ring depth grow with W - 1 at fixed C, which comm.py's W sweep checks).
  Measured in float32 (XLA:CPU upcasts bf16 collectives); in bf16 training the K/V-carrying methods
  (ring, Ulysses) move half of that, the float32 states of LASP-1/2 the same: --kv-bytes 2 applies it.
- FLOPs are ANALYTIC (printed with the output): XLA's cost_analysis counts a while-loop body once,
  so it undercounts every scan/flash-based program (checked: the left-product ring's count only
  doubles when C doubles, and LASP-2H's does not move at all). Forward+backward = 3 x forward.
- Hardware numbers (peak bf16 dense FLOP/s, per-device link bandwidth across nodes, latency per
  collective step) are stated per preset below; MFU (default 0.4) is an assumption.

Second table, the state exchange's strategies (design §10) at the paper's scale (N = 2048K on 64-256
devices, and a TPU v5p slice): LASP-2's all-gather, the log-depth scan, and the LASP-1 chain of
W-1 state sends, for the diagonal summary (Linear-Llama3-1B's, per-channel decay: ``Dk + Dk Dv``
floats per head) and the delta rule's (``Dk Dk + Dk Dv``). MODELLED, not measured: each strategy's
time per layer is ``exchange.exchange_cost`` (its formula and link assumptions are printed),
forward + backward = 2x (the scan's backward is the same scan reversed; the all-gather's is a
reduce-scatter of the same size), 16 layers, added to the same compute model (no overlap, and
perfect overlap). The message counts it uses are the ones comm.py measures in the HLO.
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# The repository before benchmarks/ (which has a kernels.py of its own), then benchmarks/.
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:
  sys.path.append(_HERE)
import _methods as M  # noqa: E402

MODEL = dict(layers=16, d_model=2048, heads=16, head_dim=128, ffn=8192, vocab=128256, chunk=64)

# Peak bf16 dense FLOP/s; bandwidth a device gets in a collective that spans nodes; per-step latency.
HARDWARE = {
    "a100": dict(peak=312e12, bw=25e9, latency=20e-6,
                 note="A100 SXM 80GB as in the paper: 312 TFLOP/s bf16; NVLink 300 GB/s per "
                      "direction inside a node, but a 64/128-GPU ring crosses nodes: one HDR "
                      "200 Gb/s NIC per GPU = 25 GB/s; 20 us per collective step"),
    "h100": dict(peak=989e12, bw=50e9, latency=15e-6,
                 note="H100 SXM: 989 TFLOP/s bf16 dense; one NDR 400 Gb/s NIC per GPU = 50 GB/s "
                      "across nodes; 15 us per collective step"),
    "tpu_v5p": dict(peak=459e12, bw=200e9, latency=5e-6,
                    note="TPU v5p: 459 TFLOP/s bf16; ICI 4800 Gb/s per chip over 6 links (3D "
                         "torus); a ring along one torus axis uses 2 links = 200 GB/s; 5 us per "
                         "collective step"),
}

PAPER = {"lasp1_vs_lasp2_pct": 15.2, "ring_vs_lasp2_pct": 36.6, "at": "N=2048K, 64 A100 GPUs",
         "lasp2_tokens_per_s_2048k_128gpu": 769e3,
         "source": "LASP-2 paper (Sun et al. 2025), throughput comparison, Linear-Llama3-1B"}


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--methods", nargs="+", default=["lasp2", "lasp1", "ring_linear",
                                                   "ulysses_linear"], choices=M.LINEAR)
  ap.add_argument("--devices", type=int, nargs="+", default=[64, 128])
  ap.add_argument("--n", type=int, nargs="+", default=[524288, 1048576, 2097152])
  ap.add_argument("--hardware", nargs="+", default=list(HARDWARE), choices=list(HARDWARE))
  ap.add_argument("--mfu", type=float, default=0.4)
  ap.add_argument("--kv-bytes", type=int, default=2, help="bytes per K/V element in training")
  ap.add_argument("--measure-w", type=int, default=8)
  ap.add_argument("--exchange-devices", type=int, nargs="+", default=[64, 128, 256],
                  help="devices of the exchange-strategy table")
  ap.add_argument("--exchange-n", type=int, default=2097152, help="N of the exchange table")
  ap.add_argument("--exchange-layout", default="contiguous", choices=["contiguous", "zigzag"])
  ap.add_argument("--small", action="store_true", help="toy sizes (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/scaling.json")
  ap.add_argument("--plot", default=None)
  args = ap.parse_args(argv)
  args.model = dict(MODEL)
  if args.small:
    args.devices, args.n, args.measure_w = [4], [2048], 2
    args.exchange_devices, args.exchange_n = [4, 8], 4096
    args.model.update(heads=4, head_dim=16, d_model=64, ffn=128, vocab=256)
  return args


def dense_flops_per_token(m):
  """Training FLOPs per token outside the attention core: 3 x 2 x (weights touched per token).

  Per layer: q, k, v, o projections (4 d H Dh), the output gate (d x d), SwiGLU (3 d F); plus the
  LM head (d x vocab). Norms, feature maps and the loss are ignored (< 1%).
  """
  hd = m["heads"] * m["head_dim"]
  per_layer = 4 * m["d_model"] * hd + m["d_model"] * m["d_model"] + 3 * m["d_model"] * m["ffn"]
  return 3 * 2 * (m["layers"] * per_layer + m["d_model"] * m["vocab"])


def attention_flops(method, m, c, p):
  """Forward+backward FLOPs of one attention core per device (B = 1), analytic.

  Chunked right-product form (LASP-2, LASP-1, and Ulysses, which runs the same work on the full
  sequence for H / P heads): per token and head 2 c (Dk + Dv) for the masked c x c tiles and
  6 Dk Dv for the states (k^T v, q S and the exchanged state). Left-product ring: every device
  scores its C queries against all P blocks of C keys, full blocks masked:
  4 P C^2 D per head, plus one recomputation in the backward pass (checkpointed blocks).
  """
  h, d, ch = m["heads"], m["head_dim"], m["chunk"]
  if method == "ring_linear":
    return 4 * (4 * p * c * c * d * h)
  return 3 * c * h * (2 * ch * (d + d) + 6 * d * d)


def measure(args, c):
  """Measured per-layer fwd+bwd comm at ``--measure-w`` devices and per-device length ``c``."""
  import jax.numpy as jnp
  w = args.measure_w
  m = args.model
  out = {}
  for method in args.methods:
    if method.startswith("ulysses") and m["heads"] % w:
      continue
    compiled = M.compile_program(M.mesh_of(w), method, "fwd+bwd", jnp.float32,
                                 chunk_size=min(m["chunk"], c), batch=1, n=c * w,
                                 heads=m["heads"], kv_heads=m["heads"], dim=m["head_dim"])
    out[method] = M.comm_summary(compiled.as_text(), w)
  return out


# The scaling presets' links in the exchange cost model (lasp_jax.sequence_parallel.exchange):
# the same bandwidth and per-collective latency as HARDWARE above; a TPU axis of P > 16 chips is
# laid over two torus dimensions of 16 (a v5p slice is a 3D torus with 16-chip rings at most in
# the common shapes), so a scan's shift by 2**k is a few hops, not 2**k.
EXCHANGE_LINKS = {
    "a100": dict(hardware="infiniband", bandwidth=25e9, latency_s=20e-6),
    "h100": dict(hardware="infiniband", bandwidth=50e9, latency_s=15e-6),
    "tpu_v5p": dict(hardware="tpu_ici"),
}


def _links(hw_name, p):
  links = dict(EXCHANGE_LINKS[hw_name])
  if links["hardware"] == "tpu_ici" and p > 16:
    links["topology"] = (p // 16, 16) if p % 16 == 0 else "ring"
  return links


def exchange_rows(args, dense):
  """Modelled step time with each exchange strategy (allgather, scan, LASP-1 chain) per
  hardware, device count and summary kind, at ``--exchange-n`` tokens."""
  from lasp_jax.sequence_parallel import exchange
  m = args.model
  h, d = m["heads"], m["head_dim"]
  state = h * d * d * 4                                   # B = 1, float32
  kinds = {"diagonal": h * (d + d * d) * 4, "delta": h * (d * d + d * d) * 4}
  segments = 2 if args.exchange_layout == "zigzag" else 1
  rows = []
  for hw_name in args.hardware:
    hw = HARDWARE[hw_name]
    for p in args.exchange_devices:
      c = args.exchange_n // p
      flops = dense * c + m["layers"] * attention_flops("lasp2", m, c, p)
      t_comp = flops / (hw["peak"] * args.mfu)
      links = _links(hw_name, p)
      for kind, summ in kinds.items():
        for strategy in ("allgather", "scan", "lasp1_chain"):
          if strategy == "lasp1_chain":  # W-1 sequential sends of one state, each way
            lk = dict(exchange.HARDWARE[links["hardware"]], **{k: v for k, v in links.items()
                                                                if k != "hardware"})
            # Neighbours send to neighbours: one hop on any topology.
            # The chain passes states (each device composes its own summary in): state-sized.
            per = lk["latency_s"] + lk["step_s"] + state / lk["bandwidth"]
            cost = dict(time_s=(p * segments - 1) * per, received_bytes=(p * segments - 1) * state,
                        steps=p * segments - 1, held_bytes=2 * summ)
          else:
            cost = exchange.exchange_cost(strategy, p, summ, segments=segments, state_bytes=state,
                                          **links)
          t_comm = m["layers"] * 2 * cost["time_s"]            # forward + backward
          rows.append(dict(hardware=hw_name, devices=p, n=args.exchange_n, c=c, kind=kind,
                           strategy=strategy, summary_bytes=summ, links=links,
                           layer_fwd_s=cost["time_s"], layer_steps=cost["steps"],
                           layer_fwd_bytes=cost["received_bytes"], held_bytes=cost["held_bytes"],
                           compute_s=t_comp, comm_s=t_comm, step_serial_s=t_comp + t_comm,
                           step_overlap_s=max(t_comp, t_comm),
                           tokens_per_s_serial=args.exchange_n / (t_comp + t_comm),
                           auto=exchange.choose_exchange(p, summ, segments=segments,
                                                         state_bytes=state, **links)))
  return rows


def exchange_table(rows, args):
  from lasp_jax.sequence_parallel import exchange
  lines = ["", f"== Exchange strategies, N={args.exchange_n}, {args.exchange_layout} layout, B=1, "
           f"per layer x {args.model['layers']} layers, fwd+bwd = 2 x fwd (MODELLED) ==",
           "Cost model (lasp_jax.sequence_parallel.exchange.exchange_cost):",
           "  allgather: alpha + (W-1) tau + (W-1) S b / beta_ag (beta_ag = 2 beta on a torus); "
           "1 step",
           "  scan:      sum over ceil(log2 W S) rounds of alpha + h tau + sum_c h_c m / beta "
           "(h: hops, 1 switched)",
           "  lasp1:     (W S - 1) x (alpha + tau + state / beta), sequential",
           "Links: " + "; ".join(f"{k}: {v}" for k, v in exchange.HARDWARE.items()),
           "Presets here: " + "; ".join(f"{k} -> {v}" for k, v in EXCHANGE_LINKS.items())
           + " (TPU axes over 16: torus (P/16, 16))",
           f"{'hw':<8}{'P':>4}  {'kind':<9}{'strategy':<12}{'fwd us':>9}{'steps':>6}"
           f"{'MB recv':>9}{'MB held':>9}{'comm s':>8}{'step s':>8}{'tok/s':>10}{'auto':>11}"]
  for r in rows:
    lines.append(f"{r['hardware']:<8}{r['devices']:>4}  {r['kind']:<9}{r['strategy']:<12}"
                 f"{r['layer_fwd_s'] * 1e6:>9.1f}{r['layer_steps']:>6}"
                 f"{r['layer_fwd_bytes'] / 1e6:>9.1f}{r['held_bytes'] / 1e6:>9.1f}"
                 f"{r['comm_s']:>8.3f}{r['step_serial_s']:>8.3f}{r['tokens_per_s_serial']:>10.3g}"
                 f"{r['auto'] if r['strategy'] == 'scan' else '':>11}")
  return lines


def exchange_plot(rows, args, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  hws = list(dict.fromkeys(r["hardware"] for r in rows))
  fig, axes = plt.subplots(1, len(hws), figsize=(5.2 * len(hws), 4.2), squeeze=False)
  for ax, hw in zip(axes[0], hws):
    for kind, ls in (("diagonal", "-"), ("delta", "--")):
      for strategy in ("allgather", "scan", "lasp1_chain"):
        pts = sorted((r["devices"], r["layer_fwd_s"] * 2e6) for r in rows if r["hardware"] == hw
                     and r["kind"] == kind and r["strategy"] == strategy)
        ax.plot(*zip(*pts), marker="o", ls=ls, label=f"{strategy} {kind}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("modelled exchange time per layer, fwd+bwd (us)")
    ax.set_title(f"{hw}: {EXCHANGE_LINKS[hw]['hardware']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  args = parse(argv)
  M.set_devices(args.measure_w)
  import jax
  m = args.model
  cs = sorted({n // p for n in args.n for p in args.devices})
  measured = {c: measure(args, c) for c in cs}
  dense = dense_flops_per_token(m)
  rows = []
  for hw_name in args.hardware:
    hw = HARDWARE[hw_name]
    for p in args.devices:
      for n in args.n:
        c = n // p
        for method in args.methods:
          row = dict(hardware=hw_name, devices=p, n=n, c=c, method=method)
          meas = measured[c].get(method)
          if method.startswith("ulysses") and m["heads"] % p:
            row["skipped"] = f"Ulysses needs H % W == 0: H={m['heads']}, W={p}"
            rows.append(row)
            continue
          scale = (p - 1) / (args.measure_w - 1)
          kv_factor = args.kv_bytes / 4 if method in ("ring_linear", "ulysses_linear") else 1.0
          if method == "ulysses_linear":   # all-to-all volume is (W-1)/W of the local data
            scale = ((p - 1) / p) / ((args.measure_w - 1) / args.measure_w)
          layer_bytes = meas["received_bytes"] * scale * kv_factor
          layer_steps = meas["sequential_steps"] * (scale if method in ("lasp1", "ring_linear")
                                                    else 1.0)
          flops = dense * c + m["layers"] * attention_flops(method, m, c, p)
          t_comp = flops / (hw["peak"] * args.mfu)
          t_comm = m["layers"] * (layer_bytes / hw["bw"] + layer_steps * hw["latency"])
          row.update(layer_bytes=layer_bytes, layer_steps=layer_steps, flops_per_device=flops,
                     compute_s=t_comp, comm_s=t_comm, step_serial_s=t_comp + t_comm,
                     step_overlap_s=max(t_comp, t_comm),
                     tokens_per_s_serial=n / (t_comp + t_comm),
                     tokens_per_s_overlap=n / max(t_comp, t_comm))
          rows.append(row)
  by = {(r["hardware"], r["devices"], r["n"], r["method"]): r for r in rows}
  for r in rows:
    base = by.get((r["hardware"], r["devices"], r["n"], "lasp2"))
    if "skipped" in r or base is None:
      continue
    # "LASP-2 is x% faster than this method", as the paper states it (throughput ratio - 1).
    r["lasp2_gain_pct_serial"] = 100 * (r["step_serial_s"] / base["step_serial_s"] - 1)
    r["lasp2_gain_pct_overlap"] = 100 * (r["step_overlap_s"] / base["step_overlap_s"] - 1)

  tok_flops = dense + m["layers"] * attention_flops("lasp2", m, 1, 1)
  implied_mfu = PAPER["lasp2_tokens_per_s_2048k_128gpu"] * tok_flops / (128 * HARDWARE["a100"]["peak"])
  lines = ["Assumptions:",
           f"  model {m}; B=1; basic linear attention; MFU {args.mfu}",
           f"  dense FLOPs/token (fwd+bwd) {dense:.3e}; attention-core FLOPs analytic "
           f"(scaling.attention_flops)",
           f"  comm measured at W={args.measure_w} (float32 HLO), scaled by (P-1)/(W-1); "
           f"K/V bytes x {args.kv_bytes}/4 for bf16 training"]
  lines += [f"  {k}: {v['note']}" for k, v in HARDWARE.items() if k in args.hardware]
  lines.append(f"Paper ({PAPER['source']}): LASP-2 faster than LASP-1 by "
               f"{PAPER['lasp1_vs_lasp2_pct']}% and than Ring Attention by "
               f"{PAPER['ring_vs_lasp2_pct']}% at {PAPER['at']}; "
               f"{PAPER['lasp2_tokens_per_s_2048k_128gpu'] / 1e3:.0f}K tokens/s at 2048K on 128 "
               f"GPUs (implies MFU {implied_mfu:.2f} under this FLOP count on A100)")
  lines.append("")
  lines.append(f"{'hw':<8}{'P':>4}{'N':>9}  {'method':<15}{'MB/layer':>10}{'steps':>7}"
               f"{'compute s':>10}{'comm s':>9}{'step s':>9}{'tok/s':>10}{'LASP-2 +%':>11}"
               f"{'(overlap)':>10}")
  for r in rows:
    if "skipped" in r:
      lines.append(f"{r['hardware']:<8}{r['devices']:>4}{r['n']:>9}  {r['method']:<15}"
                   f"  n/a: {r['skipped']}")
      continue
    gain = r.get("lasp2_gain_pct_serial")
    lines.append(
        f"{r['hardware']:<8}{r['devices']:>4}{r['n']:>9}  {r['method']:<15}"
        f"{r['layer_bytes'] / 1e6:>10.1f}{r['layer_steps']:>7.0f}{r['compute_s']:>10.3f}"
        f"{r['comm_s']:>9.3f}{r['step_serial_s']:>9.3f}{r['tokens_per_s_serial']:>10.3g}"
        f"{'' if gain is None else format(gain, '.1f'):>11}"
        f"{'' if gain is None else format(r['lasp2_gain_pct_overlap'], '.1f'):>10}")
  ex_rows = exchange_rows(args, dense)
  ex_lines = exchange_table(ex_rows, args)
  print("\n".join(lines + ex_lines))
  M.write_json(args.out, dict(jax=jax.__version__, args=vars(args), hardware=HARDWARE,
                              paper=PAPER, implied_paper_mfu=implied_mfu,
                              measured_comm_per_layer=measured, rows=rows,
                              assumptions=lines[:lines.index("")], exchange_rows=ex_rows,
                              exchange_assumptions=ex_lines[1:8]))
  ex_png = os.path.splitext(args.plot or args.out)[0] + "_exchange.png"
  exchange_plot(ex_rows, args, ex_png)
  png = args.plot or os.path.splitext(args.out)[0] + ".png"
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(args.devices), figsize=(5.5 * len(args.devices), 4.2),
                           squeeze=False)
  hw0 = args.hardware[0]
  for ax, p in zip(axes[0], args.devices):
    for method in args.methods:
      pts = sorted((r["n"], r["tokens_per_s_serial"]) for r in rows
                   if r["hardware"] == hw0 and r["devices"] == p and r["method"] == method
                   and "skipped" not in r)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=method)
    if p == 128 and hw0 == "a100":
      ax.scatter([2097152], [PAPER["lasp2_tokens_per_s_2048k_128gpu"]], marker="*", s=120,
                 color="k", label="paper LASP-2", zorder=5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel("modelled tokens/s (no overlap)")
    ax.set_title(f"{hw0}, {p} devices, MFU {args.mfu}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=80)
  plt.close(fig)
  print(f"wrote {args.out}, {png} and {ex_png}")
  return rows


if __name__ == "__main__":
  main()
