"""``train.py import`` / ``export``: a Qwen3.5 folder becomes a run that trains on from its weights,
and a run's weights leave as a folder that imports back (and that transformers loads:
tests/models/test_hf.py)."""

import pathlib

import numpy as np
import pytest

import train as train_cli
from lasp_jax.train import loop
from lasp_jax.train.config import load_config
from tests.fixtures import hf_checkpoint_variants as variants

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
CKPT = FIXTURES / "qwen3_5_tiny"
TEXT = pathlib.Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare_head.txt"


@pytest.mark.slow   # trains on 8 devices; the import/export maths is in tests/models/test_hf.py
def test_import_train_export(tmp_path, capsys):
  run_dir, step0, trained = tmp_path / "run", tmp_path / "step0", tmp_path / "trained"
  assert train_cli.main(["import", str(CKPT), str(run_dir), "data.source=text",
                         f"data.path={TEXT}", "data.seq_len=64", "data.batch_size=2",
                         "model.runtime.chunk_size=8", "log.progress=false",
                         "log.eval_every=0", "log.tensorboard=false"]) == 0
  # The step-0 checkpoint holds the imported weights exactly.
  assert train_cli.main(["export", str(run_dir), str(step0), "--step", "0"]) == 0
  want, _ = variants.read_safetensors(CKPT / "model.safetensors")
  got, _ = variants.read_safetensors(step0 / "model.safetensors")
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Training resumes from them, on the run's 8-device mesh, and exports again.
  summary = loop.run(load_config(str(run_dir / "config.yaml"), ["steps=2", "optim.warmup_steps=1"]))
  assert summary["resumed"] and summary["start_step"] == 0 and summary["steps"] == 2
  assert train_cli.main(["export", str(run_dir), str(trained)]) == 0
  moved, _ = variants.read_safetensors(trained / "model.safetensors")
  assert any(not np.array_equal(moved[k], want[k]) for k in want)
  out = capsys.readouterr().out
  assert "exported" in out and "(step 2)" in out


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
  assert train_cli.main(["import", str(tmp_path / "nope"), str(tmp_path / "run")]) == 2
  assert "is not a directory" in capsys.readouterr().err
  wrapped = variants.write_conditional_generation(CKPT, tmp_path / "wrapped", extra_keys=True)
  assert train_cli.main(["import", str(wrapped), str(tmp_path / "run")]) == 2
  assert "--text-only" in capsys.readouterr().err
  assert not (tmp_path / "run").exists() and not (tmp_path / "run.importing").exists()
  assert train_cli.main(["import", str(wrapped), str(tmp_path / "run"), "--text-only",
                         "log.progress=false"]) == 0
  assert train_cli.main(["import", str(CKPT), str(tmp_path / "run")]) == 2
  assert "exists" in capsys.readouterr().err
  assert train_cli.main(["export", str(tmp_path / "none"), str(tmp_path / "hf")]) == 2
  assert not (tmp_path / "hf").exists()
