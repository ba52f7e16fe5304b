"""``train.py eval`` runs sequence parallel on the run's mesh (issue 24): the parameters restored
sharded on it, the training loop's batches and eval step; the loss equals a one-device float64
computation of every packed document run alone, and the compiled eval has LASP-2's all-gather."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import train
from lasp_jax import comm
from lasp_jax.train import evaluate as eval_lib
from lasp_jax.train import loop
from lasp_jax.train.config import REPO_ROOT
from lasp_jax.train.data import Batches
from tests.train.runs import config

TEXT = os.path.join(REPO_ROOT, "tests", "data", "tinyshakespeare_head.txt")
EOS = 10                               # each line a document


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """2 steps on packed lines of Shakespeare (bytes, EOS = newline), mesh data=2 x sp=4, zigzag,
  a linear and a softmax layer (tests/train/runs.py); the training loop evaluates 2 batches at the
  end. ``(summary, run_dir)``."""
  run_dir = tmp_path_factory.mktemp("text_run")
  summary = loop.run(config(run_dir, "data.source=text", f"data.path={TEXT}", f"data.eos_id={EOS}",
                            "data.eval_fraction=0.1", "steps=2", "optim.warmup_steps=1",
                            "log.eval_every=2", "log.eval_batches=2"))
  return summary, run_dir


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _one_device_reference(run_dir, stream, windows):
  """``(nll sum, counted tokens)`` of ``windows`` (indices into ``stream``) without a mesh: the
  model restored on one device (``sample.load_model``), every document of every window run alone
  (no segment_ids; the tokens after it padded, which causal attention ignores), float64 NLL. The
  target after an EOS is not counted."""
  from lasp_jax.train.sample import load_model  # pylint: disable=import-outside-toplevel
  model, cfg = load_model(str(run_dir))
  assert {d for x in jax.tree.leaves(nnx.state(model)) for d in x.sharding.device_set} \
      == {jax.devices()[0]}
  L = cfg.data.seq_len
  rows, spans = [], []
  for w in windows:
    x = np.asarray(stream[w * L:w * L + L + 1], np.int64)
    inputs, targets = x[:-1], x[1:]
    bounds = [0] + [i + 1 for i in np.flatnonzero(inputs == EOS)] + [L]
    for a, b in zip(bounds[:-1], bounds[1:]):
      if a < b:
        doc = np.full(L, ord("a"), np.int32)
        doc[:b - a] = inputs[a:b]
        rows.append(doc)
        spans.append((inputs[a:b], targets[a:b]))
  rows += [rows[0]] * (-len(rows) % 64)              # a fixed batch: one compile
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  logits = np.asarray(forward(state, np.stack(rows)), np.float64)
  nll = count = 0.0
  for lp, (inputs, targets) in zip(_log_softmax(logits), spans):
    keep = inputs != EOS
    nll -= lp[np.arange(len(targets)), targets][keep].sum()
    count += keep.sum()
  return nll, count


def test_sp_eval_on_the_runs_mesh(text_run, capsys, tmp_path):
  """One test (the run's training compiles once per worker); see the two parts."""
  _check_equals_one_device_float64_documents(text_run, tmp_path)
  _check_runs_sharded_on_the_mesh(text_run, capsys, tmp_path)


def _check_equals_one_device_float64_documents(text_run, tmp_path):
  """The whole eval split (31 windows: a last half batch, padded and not counted) on the 8-device
  mesh equals the one-device float64 reference; ``--batches 2`` equals the training loop's own
  eval; ``--data`` (a text file) likewise."""
  summary, run_dir = text_run
  res = eval_lib.evaluate(str(run_dir))
  assert res["mesh"] == {"data": 2, "sp": 4}
  stream = np.fromfile(TEXT, np.uint8)
  nw = (len(stream) - 1) // 64
  ne = int(round(nw * 0.1))
  assert res["examples"] == ne and ne % 2 == 1
  nll, count = _one_device_reference(run_dir, stream, range(nw - ne, nw))
  assert res["tokens"] == count == res["bytes"]
  assert res["loss"] == pytest.approx(nll / count, rel=1e-5)
  assert res["bits_per_byte"] == pytest.approx(nll / np.log(2) / count, rel=1e-5)
  # The training loop's eval at its last step: the same batches and jitted step, the same bits.
  assert eval_lib.evaluate(str(run_dir), batches=2)["loss"] == summary["evals"][-1]["loss"]
  # --data: a text file of 3 windows and a bit, encoded with the run's (byte) tokenizer.
  text = stream[:3 * 64 + 20].tobytes()
  (tmp_path / "t.txt").write_bytes(text)
  res = eval_lib.evaluate(str(run_dir), data=str(tmp_path / "t.txt"))
  nll, count = _one_device_reference(run_dir, np.frombuffer(text, np.uint8), range(3))
  assert res["tokens"] == count and res["mesh"] == {"data": 2, "sp": 4}
  assert res["loss"] == pytest.approx(nll / count, rel=1e-5)


def _check_runs_sharded_on_the_mesh(text_run, capsys, tmp_path):
  """Parameters restored with the shardings training gives them on the run's 8-device mesh;
  batches identical (values and sharding) to the training loop's eval batches; the compiled eval
  step holds LASP-2's all-gather. ``--mesh.sp/--mesh.data``: fewer devices, the same loss; bad
  meshes are one-line errors naming the value."""
  _, run_dir = text_run
  from lasp_jax.train.sample import read_run_config  # pylint: disable=import-outside-toplevel
  train_cfg, model_cfg = read_run_config(str(run_dir))
  mesh, layout = eval_lib.run_mesh(train_cfg, model_cfg, train_cfg.mesh)
  assert dict(mesh.shape) == {"data": 2, "sp": 4} and layout == "zigzag"
  with jax.set_mesh(mesh):
    graphdef, params, rest, step = eval_lib.restore_on_mesh(str(run_dir), train_cfg, model_cfg,
                                                            mesh)
    assert step == 2
    trained = loop._models().create_model(model_cfg, mesh=mesh)    # how training places them
    want = jax.tree.leaves(nnx.split(trained, nnx.Param, ...)[1])
    for got, like in zip(jax.tree.leaves(params), want, strict=True):
      assert got.sharding == like.sharding and len(got.sharding.device_set) == 8
    # The first eval batch: what the training loop's Batches gives, values and sharding.
    ref = Batches(train_cfg.data, vocab_size=model_cfg.vocab_size, mesh=mesh, layout=layout,
                  split="eval")
    assert ref.names == ("inputs", "targets", "mask", "segment_ids")
    host = {k: np.stack([ref.dataset[i][k] for i in range(2)]) for k in ref.names}
    batch = eval_lib.place(host, mesh, layout)
    for k, v in ref.get(0).items():
      assert batch[k].sharding == v.sharding and batch[k].shape == (1, 2, 64)
      np.testing.assert_array_equal(np.asarray(batch[k]), np.asarray(v))
    eval_step = loop._step_functions(graphdef, train_cfg.optim, train_cfg.steps)[3]
    hlo = eval_step.lower(params, rest, batch).compile().as_text()
  assert comm.summarize(comm.parse_collectives(hlo))["all-gather"]["count"] >= 1
  # Fewer devices: data=1 x sp=2.
  res = eval_lib.evaluate(str(run_dir))
  capsys.readouterr()
  out = tmp_path / "e.json"
  assert train.main(["eval", str(run_dir), "--mesh.sp", "2", "--mesh.data", "1", "--no-progress",
                     "--out", str(out)]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert line["mesh"] == {"data": 1, "sp": 2} and line["tokens"] == res["tokens"]
  assert line["loss"] == pytest.approx(res["loss"], rel=1e-5)
  assert json.loads(out.read_text())["loss"] == line["loss"]
  for argv, msg in (
      (["--mesh.sp", "8", "--mesh.data", "1"], "data.seq_len=64 must be a multiple of 128"),
      (["--mesh.sp", "4", "--mesh.data", "4"], "needs 16 devices; there are 8"),
      (["--mesh.sp", "0"], "--mesh.sp must be >= 1, got 0"),
      (["--mesh.sp", "1", "--mesh.data", "1"], "use --mesh.sp >= 2"),
      (["--mesh.sp", "2", "--mesh.data", "4"], "data.batch_size=2 is not divisible by the 4")):
    assert train.main(["eval", str(run_dir), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err, (argv, err)
