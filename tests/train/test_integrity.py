"""Run integrity: nothing silently wrong, nothing lost. A new run never inherits an old run's
checkpoints, an incompatible resume fails before touching the run directory, a damaged checkpoint
falls back to an older one, and a torn metrics line is dropped, not fatal."""

import glob
import json
import os
import shutil

import pytest

from lasp_jax.train import loop, plot_run
from lasp_jax.train.checkpoint import resume_conflicts
from lasp_jax.train.metrics import RunLog, read_jsonl
from tests.train.runs import config


def _copy_run(straight_run, tmp_path):
  """A private copy of the shared straight run (checkpoint 6, config.yaml, metrics.jsonl)."""
  dst = tmp_path / "run"
  shutil.copytree(straight_run[1], dst)
  return dst


def _meta(run_dir, step):
  with open(os.path.join(run_dir, "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)


def test_resume_false_on_checkpoints_is_an_error_unless_overwrite(tmp_path, straight_run):
  run_dir = _copy_run(straight_run, tmp_path)
  config_before = (run_dir / "config.yaml").read_bytes()
  with pytest.raises(ValueError, match=f"{run_dir}/checkpoints.*checkpoint.overwrite=true"):
    loop.run(config(run_dir, "checkpoint.resume=false", "seed=1"))
  assert (run_dir / "config.yaml").read_bytes() == config_before
  assert _meta(run_dir, 6)["config"]["seed"] == 0
  # overwrite=true clears the old checkpoints: the directory then holds only the new run's. On its
  # own (issue 23: it was refused without checkpoint.resume=false, which the README did not say).
  s = loop.run(config(run_dir, "checkpoint.overwrite=true", "seed=1", "checkpoint.every=4"))
  assert s["start_step"] == 0 and s["losses"] != straight_run[0]["losses"]
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["4", "6"]
  assert _meta(run_dir, 6)["config"]["seed"] == 1 and _meta(run_dir, 4)["config"]["seed"] == 1
  with pytest.raises(ValueError, match="checkpoint.step=4 .* no checkpoint.overwrite=true"):
    config(run_dir, "checkpoint.overwrite=true", "checkpoint.step=4")


def test_incompatible_resume_fails_first_and_names_the_fields(tmp_path, straight_run):
  run_dir = _copy_run(straight_run, tmp_path)
  config_before = (run_dir / "config.yaml").read_bytes()
  with pytest.raises(ValueError, match=r"model.d_model: 32 -> 64.*optim.clip_norm: 1.0 -> 0.0"):
    loop.run(config(run_dir, "model.d_model=64", "optim.clip_norm=0"))
  assert (run_dir / "config.yaml").read_bytes() == config_before
  # What may change on resume: the length, the schedule, logging, the mesh, runtime model fields.
  import yaml
  saved = yaml.safe_load(config_before)
  new = dict(saved, steps=99, log={**saved["log"], "every": 1}, mesh={**saved["mesh"], "sp": 8},
             optim={**saved["optim"], "lr": 1e-4, "warmup_steps": 0, "clip_norm": 0.5},
             resolved_model={**saved["resolved_model"], "chunk_size": 16, "remat": True})
  assert resume_conflicts(saved, new) == []
  new["resolved_model"]["layer_pattern"] = "NL"
  assert resume_conflicts(saved, new) == ["model.layer_pattern: 'LN' -> 'NL'"]


def _truncate_arrays(step_dir):
  for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    os.truncate(f, os.path.getsize(f) // 2)


def test_damaged_latest_checkpoint_falls_back_to_an_intact_one(tmp_path, straight_run):
  """Checkpoints 3 and 6; 6 damaged (truncated arrays, then missing array metadata): the run
  resumes at 3 with a warning naming step 6 and repeats steps 4-6 exactly."""
  straight = straight_run[0]["losses"]
  args = ["checkpoint.every=3"]
  assert loop.run(config(tmp_path, *args))["losses"] == straight
  for damage in (_truncate_arrays, lambda d: os.remove(os.path.join(d, "state", "_METADATA"))):
    damage(str(tmp_path / "checkpoints" / "6"))
    (tmp_path / "checkpoints" / "6" / "marker").write_text("the damaged one")
    with pytest.warns(UserWarning, match="step 3.*step 6: "):
      s = loop.run(config(tmp_path, *args))
    assert s["start_step"] == 3 and s["losses"] == straight[3:]
    # Step 6 was saved anew over the damaged one, not skipped.
    assert not os.path.exists(tmp_path / "checkpoints" / "6" / "marker")
  # checkpoint.step picks a step; the later ones (a branch left behind) are deleted.
  def crash_at_4(step, rec):
    if step == 4:
      raise RuntimeError("simulated crash")
  with pytest.raises(RuntimeError, match="simulated crash"):
    loop.run(config(tmp_path, *args, "checkpoint.step=3"), on_step=crash_at_4)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  with pytest.raises(ValueError, match=r"checkpoint.step=5: no such checkpoint.*\[3\]"):
    loop.run(config(tmp_path, *args, "checkpoint.step=5"))


def _write_lines(path, lines):
  path.write_text("".join(lines), encoding="utf-8")


def test_torn_metrics_line(tmp_path):
  rec = [json.dumps({"kind": "train", "step": s, "loss": 5.0 - s}) + "\n" for s in (1, 2, 3)]
  path = tmp_path / "metrics.jsonl"
  _write_lines(path, rec + ['{"kind": "train", "step": 4, "lo'])   # died mid-write
  with pytest.warns(UserWarning, match="metrics.jsonl, line 4: dropped a torn last record"):
    assert [r["step"] for r in read_jsonl(str(path))] == [1, 2, 3]
  with pytest.warns(UserWarning, match="torn"):
    assert os.path.getsize(plot_run(str(tmp_path))) > 1000
  # A resume at step 2 rewrites the file without the torn line (and the records after step 2).
  with pytest.warns(UserWarning, match="torn"):
    RunLog(str(tmp_path), total_steps=5, start_step=2, tensorboard=False, progress=False,
           every=1).close()
  assert path.read_text(encoding="utf-8") == "".join(rec[:2])
  _write_lines(path, [rec[0], '{"kind": "tr\n', rec[2]])
  with pytest.raises(ValueError, match="metrics.jsonl, line 2: not a JSON record"):
    read_jsonl(str(path))
