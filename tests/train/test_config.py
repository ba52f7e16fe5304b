"""Training config: YAML presets load, overrides are typed, bad keys and values are named."""

import glob
import os

import pytest

from lasp_jax.train import config as C
from lasp_jax.train.mesh import axis_sizes


def test_default_and_every_preset_load():
  cfg = C.load_config()
  assert cfg.data.source == "mqar" and cfg.model.preset == "tiny_hybrid"
  paths = sorted(glob.glob(os.path.join(C.CONFIG_DIR, "*.yaml")))
  assert len(paths) >= 4
  for p in paths:
    c = C.load_config(p)
    assert c.steps > 0, p


def test_overrides_all_syntaxes_and_types():
  cfg = C.load_config(None, ["optim.lr=1e-3", "--data.seq_len", "512", "--mesh.data=2",
                             "checkpoint.resume=false", "model.num_layers=3",
                             "log.peak_tflops_per_device=none",
                             "model.layer_pattern=LN", "mesh.coordinator_address=127.0.0.1:1234"])
  assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
  assert cfg.data.seq_len == 512 and cfg.mesh.data == 2 and cfg.checkpoint.resume is False
  assert cfg.model.overrides["num_layers"] == 3 and cfg.model.overrides["layer_pattern"] == "LN"
  assert cfg.log.peak_tflops_per_device is None
  assert cfg.mesh.coordinator_address == "127.0.0.1:1234"
  # A mapping of dotted keys works too, and a preset name resolves inside configs/.
  cfg = C.load_config("linear_llama3_1b.yaml", {"steps": 7})
  assert cfg.steps == 7


@pytest.mark.parametrize("args, names", [
    (["optim.learning_rate=1"], "optim.learning_rate"),
    (["bogus=1"], "bogus"),
    (["model.not_a_field=3"], "model.not_a_field"),
    (["data.mqar.pairs=3"], "data.mqar.pairs"),
    (["optim.lr=fast"], "'fast'"),
    (["data.seq_len=12.5"], "data.seq_len"),
    (["data.source=parquet"], "'parquet'"),
    (["checkpoint.resume=maybe"], "checkpoint.resume"),
    (["model.num_layers=two"], "model.num_layers"),
    (["optim.lr=-1"], "optim.lr"),
    (["mesh.data=-1", "mesh.sp=-1"], "mesh"),
    (["data.source=text"], "data.path"),
    (["optim.b2=1.5"], "optim.b2"),
    (["model.preset=huge"], "'huge'"),
    (["model.linear_variant=fancy"], "'fancy'"),
    (["model.d_model=0"], "d_model"),
    (["data.mqar.vocab_size=0"], "data.mqar.vocab_size"),
    (["steps"], "'steps'"),
    (["--steps"], "--steps"),
    (["optim=3"], "optim"),
])
def test_bad_overrides_name_the_offender(args, names):
  with pytest.raises(ValueError, match=".*".join(map(_re, [names]))):
    C.load_config(None, args)


def _re(s):
  import re
  return re.escape(s)


def test_missing_config_file_is_named():
  with pytest.raises(ValueError, match="no_such.yaml"):
    C.load_config("no_such.yaml")


def test_mesh_sizes():
  assert axis_sizes(C.MeshConfig(data=2, sp=-1), 8) == {"data": 2, "sp": 4}
  assert axis_sizes(C.MeshConfig(data=-1, sp=4), 8) == {"data": 2, "sp": 4}
  assert axis_sizes(C.MeshConfig(data=1, fsdp=2, sp=4), 8) == {"data": 1, "fsdp": 2, "sp": 4}
  with pytest.raises(ValueError, match="needs 6 devices"):
    axis_sizes(C.MeshConfig(data=3, sp=2), 8)
  with pytest.raises(ValueError, match="mesh.sp=-1"):
    axis_sizes(C.MeshConfig(data=3, sp=-1), 8)


def test_to_dict_round_trips():
  cfg = C.load_config(None, ["model.num_layers=3", "optim.lr=2e-3"])
  again = C.from_dict(cfg.to_dict())
  assert again == cfg


def test_run_rejects_shapes_that_do_not_fit_the_mesh(tmp_path):
  from lasp_jax.train import loop
  base = [f"run_dir={tmp_path}", "log.progress=false", "model.layout=zigzag", "mesh.sp=8"]
  with pytest.raises(ValueError, match="data.seq_len=128 must be a multiple of 256.*chunk_size=16"):
    loop.run(C.load_config(None, base + ["data.seq_len=128", "model.chunk_size=16"]))
  with pytest.raises(ValueError, match="data.batch_size=3"):
    loop.run(C.load_config(None, base + ["mesh.data=2", "mesh.sp=4", "data.batch_size=3"]))
  with pytest.raises(ValueError, match="needs 16 devices"):
    loop.run(C.load_config(None, base + ["mesh.data=2", "mesh.sp=8"]))
  with pytest.raises(ValueError, match="model.seq_axis"):
    loop.run(C.load_config(None, base + ["model.seq_axis=seq"]))


def test_command_line_reports_config_errors(capsys):
  import train  # the top-level script
  assert train.main(["configs/tiny.yaml", "optim.lr=fast", "--steps", "3"]) == 2
  assert "optim.lr" in capsys.readouterr().err
  assert train.main(["--optim.nope", "1"]) == 2
  assert "optim.nope" in capsys.readouterr().err
