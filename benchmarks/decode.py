"""Decode tokens/s, cache memory and prefill time against prompt length: pure linear, the 1/4
hybrid and all-softmax, side by side.

  python benchmarks/decode.py [--prompt-lens 1024 2048 ... 65536] [--new-tokens 32]
                              [--variant gated_deltanet] [--softmax-prefill-max 65536]
                              [--sp-devices 8] [--sp-len P] [--out benchmarks/results/decode.json]
  python benchmarks/decode.py --quick --out /tmp/decode.json        # smoke test (toy sizes)

Three models of one size (default d_model 256, 4 layers, 4 heads of 64, GQA with 2 key/value heads
in the softmax layers, FFN 1024, vocabulary 256, chunk 64, float32; 4.1M to 4.6M parameters, sized
so the whole default run takes about 11 minutes on 2 CPU cores): ``layer_pattern="L"`` (every layer
linear, ``--variant``, default ``gated_deltanet`` with its kernel-4 short conv), ``"LLLN"`` (the
paper's 1/4 hybrid: three such layers, then softmax) and ``"N"`` (every layer softmax). For each
prompt length P:

  decode tok/s   B x T / (time of one jitted ``lax.scan`` of T = ``--new-tokens`` ``decode_step``s,
                 greedy, from the prefilled cache; ``nnx.split`` + ``jax.jit``, compiled ahead,
                 one warmup call, then the median of up to ``--repeats`` calls, stopping early
                 once the timed calls have taken ``--budget-s``). The cache is donated (each call
                 gets a fresh copy, made outside the timing).
  cache MiB      ``Cache.nbytes`` of the prefilled cache, ``max_len = P + T``: the linear layers'
                 float32 (B, H, Dk, Dv) state + conv tail (constant in P), the softmax layers'
                 K and V of ``max_len`` slots (linear in P).
  prefill s      ``prefill`` on one device (jitted, compiled ahead, a warmup call, then the
                 median as above; a warmup that alone takes ``--budget-s`` or more is the one
                 timing, which saves minutes at long P).

Softmax prefill is quadratic in P (on 2 CPU cores the all-softmax model took 1.0 s at 4K and
209 s at 64K), so ``--softmax-prefill-max`` can cap it: above it the models with softmax layers
are not prefilled (by default they always are): their cache is built
with the shapes and dtypes ``prefill`` would give (``jax.eval_shape``), filled with random values
and ``length = P``. The decode step reads every slot of the cache whatever its contents
(``decode_attention`` masks slots >= length), so its time and the cache bytes are those of a real
prefill; the prefill column says "synthetic" there. The pure linear model is always really
prefilled.

SP prefill: the hybrid's prefill at ``--sp-len`` (default: the longest prompt at which it is
really prefilled, so the longest prompt by default; one hybrid prefill at 64K takes ~1 min here)
jitted inside ``jax.set_mesh(jax.make_mesh((W,), ("sp",)))`` (LASP-2 for the linear layers,
LASP-2H for the softmax one; W = ``--sp-devices`` simulated CPU devices, set before jax starts)
against the same prefill on one device: each warmed up, then ``--sp-repeats`` interleaved pairs,
median, ratio, and the largest difference of the two logits. The simulated devices share the same 2 cores, so the ratio measures the overhead of the
split (and its collectives as memcpy), not a speed-up.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
# The repository before benchmarks/ (which has a kernels.py of its own), then benchmarks/.
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:
  sys.path.append(_HERE)
import _methods as M  # noqa: E402

# (name, layer_pattern), in table order; "softmax" is what the ratios are taken against.
MODELS = (("linear", "L"), ("hybrid", "LLLN"), ("softmax", "N"))
BASE = "softmax"


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--prompt-lens", type=int, nargs="+",
                  default=[1024 << i for i in range(7)], help="P (default 1K ... 64K)")
  ap.add_argument("--new-tokens", type=int, default=32, help="T: decode steps per timed call")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--variant", default="gated_deltanet",
                  help="linear_variant of the linear layers (lasp_jax.models.LINEAR_VARIANTS)")
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv-heads", type=int, default=2, help="softmax layers' key/value heads")
  ap.add_argument("--ffn", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--chunk", type=int, default=64)
  ap.add_argument("--short-conv", type=int, default=4)
  ap.add_argument("--softmax-prefill-max", type=int, default=65536,
                  help="longest P at which models with softmax layers are really prefilled; "
                       "above it their cache is synthetic (see the docstring)")
  ap.add_argument("--repeats", type=int, default=7, help="timed calls at most (after a warmup)")
  ap.add_argument("--budget-s", type=float, default=4.0,
                  help="stop repeating a measurement once its timed calls took this long")
  ap.add_argument("--sp-devices", type=int, default=8, help="0: skip the SP-prefill comparison")
  ap.add_argument("--sp-len", type=int, default=None,
                  help="P of the SP-prefill comparison (default: the longest real hybrid prefill)")
  ap.add_argument("--sp-repeats", type=int, default=1,
                  help="interleaved timed pairs after the warmups; 0: the (compiled-ahead) "
                       "warmups are the timing, for prompts where one prefill takes minutes")
  ap.add_argument("--fast-compile", action="store_true",
                  help="compile with XLA's backend optimisation level 0 (quicker compiles, "
                       "slower programs; --quick sets it)")
  ap.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/decode.json")
  ap.add_argument("--plot", default=None)
  args = ap.parse_args(argv)
  if args.quick:
    args.prompt_lens, args.new_tokens, args.softmax_prefill_max = [32, 64], 4, 32
    args.d_model, args.heads, args.kv_heads, args.ffn, args.chunk = 32, 4, 2, 64, 16
    args.repeats, args.budget_s, args.sp_devices, args.sp_repeats = 1, 1.0, 2, 1
    args.fast_compile = True
  args.prompt_lens = sorted(set(args.prompt_lens))
  if args.sp_len is None:
    real = [p for p in args.prompt_lens if p <= args.softmax_prefill_max]
    args.sp_len = max(real) if real else min(args.prompt_lens)
  return args


def model_config(args, pattern):
  from lasp_jax.models import get_config
  return get_config("tiny", vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                    num_heads=args.heads, num_kv_heads=args.kv_heads, ffn_dim=args.ffn,
                    layer_pattern=pattern, linear_variant=args.variant, chunk_size=args.chunk,
                    short_conv=args.short_conv, feature_dim=16, gate_rank=16)


def _prefill(graphdef, state, prompt, *, max_len):
  from flax import nnx
  from lasp_jax.models.decoding import prefill
  return prefill(nnx.merge(graphdef, state), prompt, max_len=max_len)


def _decode_loop(graphdef, state, cache, token, *, steps):
  """T greedy decode steps from ``cache``: ``(the last token, the cache after them)``."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from lasp_jax.models.decoding import decode_step
  model = nnx.merge(graphdef, state)

  def body(carry, _):
    tok, cache = carry
    logits, cache = decode_step(model, cache, tok)
    return (jnp.argmax(logits, axis=-1).astype(jnp.int32), cache), None

  (tok, cache), _ = jax.lax.scan(body, (token, cache), None, length=steps)
  return tok, cache


def _timed(fn, make_args, repeats, budget_s, *, long_warmup_counts=False):
  """One warmup call, then up to ``repeats`` timed ones (fewer once ``budget_s`` is spent):
  ``(last output, [seconds], whether the warmup is the timing)``. With ``long_warmup_counts``, a
  warmup that alone took ``budget_s`` or more is the one timing (``fn`` is compiled ahead, so
  the warmup holds no compile)."""
  import jax
  a = jax.block_until_ready(make_args())
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*a))
  warm = time.perf_counter() - t0
  if long_warmup_counts and warm >= budget_s:
    return out, [warm], True
  times = []
  for _ in range(max(repeats, 1)):
    del out, a
    a = jax.block_until_ready(make_args())
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*a))
    times.append(time.perf_counter() - t0)
    if sum(times) >= budget_s:
      break
  return out, times, False


def synthetic_cache(abstract_cache, p, seed=0):
  """A cache with ``prefill``'s shapes and dtypes, random contents (from numpy: no compile per
  shape) and ``length = p``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lasp_jax.models.cache import Cache
  rng = np.random.default_rng(seed)
  layers = jax.tree.map(
      lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape, np.float32), x.dtype),
      abstract_cache.layers)
  return Cache(layers, jnp.asarray(p, jnp.int32), abstract_cache.max_len)


def build_model(cfg, seed=0):
  """``(graphdef, state, parameter count)`` of ``LinearLlama(cfg)``, its initialisation one
  jitted program compiled at XLA's optimisation level 0 (eager init compiles one program per
  parameter shape: ~3x slower here)."""
  import jax
  from flax import nnx
  from lasp_jax.models import LinearLlama
  build = lambda: LinearLlama(cfg, rngs=nnx.Rngs(seed))  # noqa: E731
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  state = jax.jit(lambda: nnx.state(build())).lower().compile(
      {"xla_backend_optimization_level": 0})()
  params = int(sum(x.size for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state),
                                                                nnx.Param))))
  return graphdef, state, params


def main(argv=None):
  args = parse(argv)
  if args.sp_devices:
    M.set_devices(args.sp_devices)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from lasp_jax import comm

  t_start = time.perf_counter()
  med = lambda t: float(np.median(t))  # noqa: E731
  t_new, bsz = args.new_tokens, args.batch
  copts = {"xla_backend_optimization_level": 0} if args.fast_compile else None
  models, rows, prefills = {}, [], {}
  for name, pattern in MODELS:
    cfg = model_config(args, pattern)
    graphdef, state, params = build_model(cfg)
    models[name] = dict(cfg=cfg, graphdef=graphdef, state=state, params=params)

  for p in args.prompt_lens:
    prompt = jax.random.randint(jax.random.key(p), (bsz, p), 0, args.vocab, jnp.int32)
    max_len = p + t_new
    for name, pattern in MODELS:
      m = models[name]
      has_softmax = "softmax" in m["cfg"].layer_kinds
      real = not has_softmax or p <= args.softmax_prefill_max
      t_item = time.perf_counter()
      pf = jax.jit(functools.partial(_prefill, m["graphdef"], max_len=max_len))
      prefill_s = prefill_times = prefill_warm = None
      if real:
        pf_c = pf.lower(m["state"], prompt).compile(copts)
        (logits, cache), prefill_times, prefill_warm = _timed(
            pf_c, lambda: (m["state"], prompt), args.repeats, args.budget_s,
            long_warmup_counts=True)
        prefill_s = med(prefill_times)
        prefills[(name, p)] = (pf_c, logits)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      else:
        _, abstract = jax.eval_shape(pf, m["state"], prompt)
        cache = synthetic_cache(abstract, p)
        token = prompt[:, -1]
      dec = jax.jit(functools.partial(_decode_loop, m["graphdef"], steps=t_new),
                    donate_argnums=(1,))
      dec_c = dec.lower(m["state"], cache, token).compile(copts)
      fresh = lambda: (m["state"], jax.tree.map(jnp.copy, cache), token)  # noqa: E731
      _, dec_times, _ = _timed(dec_c, fresh, args.repeats, args.budget_s)
      rows.append(dict(prompt_len=p, model=name, layer_pattern=pattern, max_len=max_len,
                       new_tokens=t_new, batch=bsz, decode_tok_s=bsz * t_new / med(dec_times),
                       decode_s=med(dec_times), decode_times=dec_times,
                       cache_bytes=int(cache.nbytes), prefill="real" if real else "synthetic",
                       prefill_s=prefill_s, prefill_times=prefill_times,
                       prefill_timed_by_warmup=prefill_warm))
      del cache
      print(f"  P={p} {name}: {'prefill' if real else 'synthetic cache'} + decode, "
            f"{time.perf_counter() - t_item:.1f} s (total {time.perf_counter() - t_start:.0f} s)",
            file=sys.stderr, flush=True)

  # Ratios against the all-softmax model at each P.
  by = {(r["model"], r["prompt_len"]): r for r in rows}
  ratios = []
  for p in args.prompt_lens:
    base = by[(BASE, p)]
    for name, _ in MODELS:
      if name == BASE:
        continue
      r = by[(name, p)]
      ratios.append(dict(
          prompt_len=p, model=name, decode_tok_s_ratio=r["decode_tok_s"] / base["decode_tok_s"],
          cache_bytes_ratio=r["cache_bytes"] / base["cache_bytes"],
          prefill_s_ratio=(r["prefill_s"] / base["prefill_s"]
                           if r["prefill_s"] and base["prefill_s"] else None)))

  # SP prefill of the hybrid against one device.
  sp = None
  if args.sp_devices:
    w = args.sp_devices
    p = args.sp_len
    m = models["hybrid"]
    mesh = jax.make_mesh((w,), ("sp",), devices=jax.devices()[:w])
    prompt = jax.random.randint(jax.random.key(p), (bsz, p), 0, args.vocab, jnp.int32)
    print(f"  SP prefill: hybrid P={p} on {w} devices vs 1", file=sys.stderr, flush=True)
    if ("hybrid", p) in prefills:
      one_c, one_logits = prefills[("hybrid", p)]
    else:
      one_c = jax.jit(functools.partial(_prefill, m["graphdef"], max_len=p + t_new)).lower(
          m["state"], prompt).compile(copts)
      one_logits = None
    rep = NamedSharding(mesh, P())
    sp_state = jax.device_put(m["state"], rep)
    sp_prompt = jax.device_put(prompt, rep)
    with jax.set_mesh(mesh):
      sp_c = jax.jit(functools.partial(_prefill, m["graphdef"], max_len=p + t_new)).lower(
          sp_state, sp_prompt).compile(copts)
      colls = comm.summarize(comm.parse_collectives(sp_c.as_text()))
      t0 = time.perf_counter()
      sp_logits, _ = jax.block_until_ready(sp_c(sp_state, sp_prompt))     # its warmup
      t_sp = [time.perf_counter() - t0]
    t_one = []
    if one_logits is None:                    # else it ran (and was warmed up) in the table
      t0 = time.perf_counter()
      one_logits = jax.block_until_ready(one_c(m["state"], prompt))[0]
      t_one = [time.perf_counter() - t0]
    warmups_timed = args.sp_repeats == 0 and bool(t_one)
    if not warmups_timed:
      t_one, t_sp = [], []
    for _ in range(0 if warmups_timed else max(args.sp_repeats, 1)):  # interleaved: same load
      t0 = time.perf_counter()
      jax.block_until_ready(one_c(m["state"], prompt))
      t_one.append(time.perf_counter() - t0)
      with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        jax.block_until_ready(sp_c(sp_state, sp_prompt))
        t_sp.append(time.perf_counter() - t0)
    diff = float(jnp.max(jnp.abs(np.asarray(sp_logits) - np.asarray(one_logits))))
    sp = dict(model="hybrid", prompt_len=p, devices=w, one_device_s=med(t_one),
              sp_s=med(t_sp), ratio_sp_over_one=med(t_sp) / med(t_one), one_device_times=t_one,
              sp_times=t_sp, warmups_are_the_timing=warmups_timed, max_abs_logit_diff=diff,
              collectives=colls,
              note="simulated CPU devices sharing the host's cores: overhead, not speed-up")

  # Output.
  print(f"\ndecode: B={bsz}, T={t_new} greedy steps per timed call; d_model {args.d_model}, "
        f"{args.layers} layers, {args.heads} heads (softmax: {args.kv_heads} kv heads), "
        f"linear = {args.variant}; {jax.default_backend()}")
  print("params: " + ", ".join(f"{n} {models[n]['params'] / 1e6:.2f}M" for n, _ in MODELS))
  label = {"linear": f"linear ({args.variant})", "hybrid": "hybrid (LLLN)",
           "softmax": "softmax (N)"}
  print(f"{'prompt':>7}  {'model':<24}{'decode tok/s':>13}{'cache MiB':>11}{'prefill s':>11}")
  for r in rows:
    pf_txt = f"{r['prefill_s']:.3f}" if r["prefill_s"] is not None else "synthetic"
    print(f"{r['prompt_len']:>7}  {label[r['model']]:<24}{r['decode_tok_s']:>13.1f}"
          f"{r['cache_bytes'] / 2 ** 20:>11.3f}{pf_txt:>11}")
  print(f"\nratios against the all-softmax model (x: tok/s, cache bytes, prefill time)")
  print(f"{'prompt':>7}  {'model':<24}{'tok/s':>9}{'cache':>10}{'prefill':>9}")
  for r in ratios:
    pr = f"{r['prefill_s_ratio']:.2f}" if r["prefill_s_ratio"] is not None else "-"
    print(f"{r['prompt_len']:>7}  {label[r['model']]:<24}{r['decode_tok_s_ratio']:>9.2f}"
          f"{r['cache_bytes_ratio']:>10.4f}{pr:>9}")
  synth = sorted({r["prompt_len"] for r in rows if r["prefill"] == "synthetic"})
  if synth:
    print(f"synthetic: models with softmax layers at P = {synth} (> --softmax-prefill-max "
          f"{args.softmax_prefill_max}) got a cache of prefill's shapes with random contents, "
          f"not a prefill; their decode time and cache bytes are unaffected")
  if sp:
    print(f"\nSP prefill, hybrid, P={sp['prompt_len']}: {sp['devices']} simulated devices "
          f"{sp['sp_s']:.3f} s, one device {sp['one_device_s']:.3f} s, ratio "
          f"{sp['ratio_sp_over_one']:.2f} (max |logit diff| {sp['max_abs_logit_diff']:.2e}); "
          f"collectives: " + ", ".join(f"{k} {v['count']}x" for k, v in sp["collectives"].items()))
    print("  the simulated devices share this machine's cores: the ratio is the overhead of the "
          "split, not a speed-up")
  wall = time.perf_counter() - t_start
  print(f"wall {wall:.0f} s")
  M.write_json(args.out, dict(
      backend=jax.default_backend(), jax=jax.__version__, args=vars(args), wall_s=wall,
      models={n: dict(layer_pattern=m["cfg"].layer_pattern, params=m["params"],
                      config=m["cfg"].to_dict()) for n, m in models.items()},
      rows=rows, ratios_vs_softmax=ratios, sp_prefill=sp))

  png = args.plot or os.path.splitext(args.out)[0] + ".png"
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name, _ in MODELS:
    pts = sorted((r["prompt_len"], r["decode_tok_s"], r["cache_bytes"] / 2 ** 20)
                 for r in rows if r["model"] == name)
    xs = [x[0] for x in pts]
    axes[0].plot(xs, [x[1] for x in pts], marker="o", label=label[name])
    axes[1].plot(xs, [x[2] for x in pts], marker="o", label=label[name])
  axes[0].set_ylabel(f"decode tokens/s (B={bsz})")
  axes[1].set_ylabel(f"cache MiB (max_len = P + {t_new})")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length P")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"decode, d_model {args.d_model}, {args.layers} layers ({jax.default_backend()})",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(png, dpi=80)
  plt.close(fig)
  print(f"wrote {args.out} and {png}")
  return rows, sp


if __name__ == "__main__":
  main()
