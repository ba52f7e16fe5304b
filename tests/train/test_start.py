"""Starting and stopping a run from the command line (issue 23): Ctrl-C at any moment of the start
stops cleanly, a failed start is one line and leaves nothing behind, and the quieter messages (a
warmup longer than the run, eval lines). ``checkpoint.overwrite=true`` alone: test_integrity.py."""

import os
import signal
import subprocess
import sys

import pytest

from lasp_jax.train import loop
from tests.train.runs import COMMON, QUIET, config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# python train.py in a fresh process, with a SIGINT sent ``delay`` seconds after the first XLA
# compilation starts (the model's initialisation), or after start-up when there is none yet
# (``delay`` < 0: during the imports).
_SIGINT_DURING = r"""
import os, signal, sys, threading
sys.path.insert(0, {root!r})
delay = {delay!r}
kill = lambda: os.kill(os.getpid(), signal.SIGINT)
if delay < 0:
  threading.Timer(-delay, kill).start()
import train
if delay >= 0:
  from jax._src import compiler
  original, fired = compiler.backend_compile_and_load, []
  def compile_and_interrupt(*args, **kwargs):
    if not fired:
      fired.append(threading.Timer(delay, kill))
      fired[0].start()
    return original(*args, **kwargs)
  compiler.backend_compile_and_load = compile_and_interrupt
sys.exit(train.main(sys.argv[1:]))
"""


def _train_py(run_dir, *args, delay=None, timeout=300):
  code = _SIGINT_DURING.format(root=REPO_ROOT, delay=delay) if delay is not None else None
  cmd = [sys.executable] + (["-c", code] if code else ["train.py"])
  return subprocess.run(cmd + [f"run_dir={run_dir}", *QUIET, *COMMON, *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("delay", [0.0, -0.05])
def test_ctrl_c_during_the_first_compile_or_the_imports_stops_cleanly(tmp_path, delay):
  # Issue 23: Ctrl-C in the first seconds of train.py was a KeyboardInterrupt inside XLA's
  # compiler and then a segmentation fault (exit -11), or a traceback (-2) during the imports,
  # or was swallowed by a gc callback and the run went on (exit 0).
  run_dir = tmp_path / "run"
  p = _train_py(run_dir, delay=delay)
  assert p.returncode == 130, (p.returncode, p.stdout[-2000:], p.stderr[-4000:])
  assert "stopped by SIGINT before" in p.stdout + p.stderr
  assert "Traceback" not in p.stderr, p.stderr[-4000:]
  assert not run_dir.exists()      # nothing written: the same command starts afresh


def test_failed_start_is_one_line_naming_every_place_and_leaves_nothing(tmp_path, capsys,
                                                                         monkeypatch):
  import train  # the top-level script
  run_dir = tmp_path / "run"
  monkeypatch.chdir(tmp_path)
  code = train.main([f"run_dir={run_dir}", *QUIET, *COMMON, "model.vocab_size=256",
                     "data.source=text", "data.path=no/such.txt"])
  err = capsys.readouterr().err
  assert code == 2
  assert err.strip().count("\n") == 0 and "Traceback" not in err, err
  assert str(tmp_path / "no" / "such.txt") in err, err                  # the working directory
  assert os.path.join(REPO_ROOT, "no", "such.txt") in err, err          # and the repository
  assert not run_dir.exists()      # no config.yaml, no empty checkpoints/
  # Found in the first batch (bytes >= the model's vocabulary): the same.
  (tmp_path / "text.txt").write_bytes(bytes(range(256)) * 64)
  code = train.main([f"run_dir={run_dir}", *QUIET, *COMMON, "model.vocab_size=128",
                     "data.source=text", "data.path=text.txt"])
  err = capsys.readouterr().err
  assert code == 2 and err.strip().count("\n") == 0, err
  assert "is >= the model's vocab_size 128" in err, err
  assert not run_dir.exists()


def test_warmup_longer_than_the_run_warns(tmp_path, monkeypatch):
  # Issue 23: with steps below the warmup the learning rate never decayed, and nothing said so.
  monkeypatch.setattr(loop, "_train", lambda *a: {})     # the set-up is what is tested
  with pytest.warns(UserWarning, match=r"optim.warmup_steps=8 >= steps=6: .* never decays"):
    loop.run(config(tmp_path, "optim.warmup_steps=8"))


def test_eval_lines_are_labelled(tmp_path, capsys):
  from lasp_jax.train.metrics import RunLog
  log = RunLog(str(tmp_path), total_steps=2, start_step=0, tensorboard=False, progress=True,
               every=1)
  log.write({"step": 2, "loss": 1.5, "accuracy": 0.25}, kind="eval")
  log.close()
  out = capsys.readouterr()
  assert "eval: step=2 loss=1.5 accuracy=0.25" in out.out + out.err
