"""Sequence-parallel training from a config.

  python train.py                                   # configs/tiny.yaml: MQAR on 8 simulated CPUs
  python train.py configs/linear_llama3_1b.yaml data.path=tokens.bin
  python train.py configs/tiny.yaml optim.lr=1e-3 --mesh.data 2 --mesh.sp 4
  python train.py plot runs/tiny                    # loss curve -> runs/tiny/loss.png
  python train.py speed [config] [overrides]        # tokens/s: sequence over all devices vs 1
                                                    # (30 steps each unless steps= is given)
  python train.py prepare in.txt [more.txt dir/ ...] out.bin [--tokenizer tokenizer.json |
                    --train-bpe VOCAB] [--split-blank-lines] [--jsonl-key text] [--eos-id ID]
                                                    # out.bin + its out.bin.json sidecar
  python train.py eval runs/shakespeare [--data held_out.bin] [--batches N]
                                                    # loss, perplexity, bits per byte (JSON)
  python train.py sample runs/shakespeare --prompt "ROMEO:" --max-new-tokens 200
                    [--temperature T] [--top-k K] [--seed S] [--step STEP]
                                                    # the latest checkpoint, greedy by default;
                                                    # prints the prompt + the continuation
                                                    # (--prompt-ids 1,2,3: token ids;
                                                    # --stop-at-eos)
  python train.py import HF_DIR runs/qwen [--text-only] [overrides]
                                                    # Qwen3.5 weights -> a run at step 0
  python train.py export runs/qwen HF_DIR [--step N] [--dtype bfloat16]
                                                    # a run -> a Qwen3.5 folder (transformers)

Any config field can be overridden with dotted keys (``key=value`` or ``--key value``).
"""

import os
import signal
import sys


class _EarlySignals:
  """Records SIGINT / SIGTERM while JAX and the library load; the run's own handler
  (``loop._StopOnSignal``) takes over the recorded one (its ``received``) and stops cleanly."""

  def __init__(self):
    self.received = None

  def __call__(self, signum, frame):
    self.received = signal.Signals(signum).name


def main(argv):
  if argv and argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  if argv and argv[0] == "plot":
    from lasp_jax.train.plot import plot_run
    if len(argv) not in (2, 3):
      print("usage: python train.py plot <run_dir> [out.png]", file=sys.stderr)
      return 2
    print(plot_run(*argv[1:]))
    return 0
  if argv and argv[0] == "prepare":
    from lasp_jax.train.prepare import main as prepare_main
    return prepare_main(argv[1:])
  if argv and argv[0] == "eval":
    from lasp_jax.train.evaluate import main as eval_main
    return eval_main(argv[1:])
  if argv and argv[0] in ("import", "export"):
    from lasp_jax.train import interop
    return (interop.import_main if argv[0] == "import" else interop.export_main)(argv[1:])
  if argv and argv[0] == "sample":
    from lasp_jax.train.sample import main as sample_main
    return sample_main(argv[1:])
  early = _EarlySignals()
  previous = {sig: signal.signal(sig, early) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    return _train(argv, early)
  except KeyboardInterrupt:
    # The second Ctrl-C (the first stops at the next step boundary). Leave at once: a normal
    # interpreter exit while XLA compiles on other threads can end in a segmentation fault.
    print("interrupted: stopped at once, without a checkpoint", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _train(argv, early):
  """``python train.py [config] [overrides]`` and ``speed``; ``early``: signals received so far."""
  from lasp_jax.train import load_config, run
  from lasp_jax.train.loop import SetupError
  if early.received:
    print(f"stopped by {early.received} before training started", file=sys.stderr)
    return 130
  speed = bool(argv) and argv[0] == "speed"
  argv = argv[1:] if speed else argv
  path = None
  if argv and not argv[0].startswith("-") and "=" not in argv[0]:
    path, argv = argv[0], argv[1:]
  try:
    cfg = load_config(path, argv)
  except ValueError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  if speed:
    from lasp_jax.train import parse_overrides
    from lasp_jax.train import speed as speed_lib
    # A config's steps is a training length; speed measures 30 steps unless steps= is given.
    given = any(k == "steps" for k, _ in parse_overrides(argv))
    try:
      results = speed_lib.compare(cfg, steps=cfg.steps if given else speed_lib.DEFAULT_STEPS)
    except ValueError as e:
      print(f"config error: {e}", file=sys.stderr)
      return 2
    print(speed_lib.report(cfg, results))
    return 0
  try:
    summary = run(cfg)
  except SetupError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0 if summary["stopped_by"] is None else 130


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
