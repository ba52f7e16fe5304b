"""Two processes on localhost (jax.distributed, gloo CPU collectives, 4 simulated devices each)
train the same steps as one process with 8 devices, each process reading only its half of the
batch."""

import pytest
import os
import socket
import subprocess
import sys

import numpy as np

from lasp_jax.train.config import REPO_ROOT
from lasp_jax.train.metrics import read_jsonl
from tests.train.runs import COMMON, QUIET

TIMEOUT_S = 480      # generous: a loaded 2-core CI machine; a hang still ends


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, straight_run):
  straight, _ = straight_run
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS")}
  port = _free_port()
  run_dir = tmp_path / "two"
  procs = []
  for i in range(2):
    cmd = [sys.executable, "train.py", f"run_dir={run_dir}", *QUIET, *COMMON,
           "mesh.platform=cpu", "mesh.num_cpu_devices=4", "mesh.distributed=on",
           f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2",
           f"mesh.process_id={i}", "mesh.init_timeout_s=120"]
    procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
  for out in outs:                  # data 2 x sp 4: each process holds one data row of devices
    assert "in 2 process(es), data mqar (this process reads 2/4 rows a step)" in out, out[-2000:]
  recs = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]
  assert [r["step"] for r in recs] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in recs], straight["losses"], rtol=1e-5)
  assert os.path.isdir(run_dir / "checkpoints" / "6")
