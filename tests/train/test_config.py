"""Training config: YAML presets load, overrides are typed, bad keys and values are named."""

import glob
import json
import os
import re

import pytest

from lasp_jax import models
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
    (["optim.lr=nan"], "optim.lr must be finite and > 0, got nan"),
    (["optim.lr=inf"], "optim.lr must be finite and > 0, got inf"),
    (["optim.eps=0"], "optim.eps must be finite and > 0, got 0.0"),
    (["optim.eps=nan"], "optim.eps"),
    (["optim.weight_decay=nan"], "optim.weight_decay must be finite and >= 0, got nan"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.clip_norm=nan"], "optim.clip_norm must be finite and >= 0, got nan"),
    (["optim.clip_norm=-1"], "optim.clip_norm"),
    (["optim.end_lr_ratio=nan"], "optim.end_lr_ratio must be in [0, 1], got nan"),
    (["optim.end_lr_ratio=1.5"], "optim.end_lr_ratio"),
    (["optim.b1=nan"], "optim.b1 must be in [0, 1), got nan"),
    (["optim.b2=1"], "optim.b2 must be in [0, 1), got 1.0"),
    (["data.eval_fraction=nan"], "data.eval_fraction"),
    (["log.peak_tflops_per_device=nan"], "log.peak_tflops_per_device"),
    (["checkpoint.step=3", "checkpoint.resume=false"], "checkpoint.step=3"),
    (["checkpoint.step=3", "checkpoint.overwrite=true"], "checkpoint.step=3"),
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
  with pytest.raises(ValueError, match="model.runtime.seq_axis"):
    loop.run(C.load_config(None, base + ["model.seq_axis=seq"]))


def test_command_line_reports_config_errors(capsys):
  import train  # the top-level script
  assert train.main(["configs/tiny.yaml", "optim.lr=fast", "--steps", "3"]) == 2
  assert "optim.lr" in capsys.readouterr().err
  assert train.main(["--optim.nope", "1"]) == 2
  assert "optim.nope" in capsys.readouterr().err


def test_unavailable_platform_is_named_with_the_ones_jax_has():
  """In this process (backends already up, CPU forced by tests/conftest.py) and in a fresh one
  (where JAX would try each GPU plugin and report "Unable to initialize backend 'rocm'"). The
  fresh process sees the host's real devices: on a host with a GPU the request succeeds, and that
  half is skipped, saying so."""
  import subprocess
  import sys
  from lasp_jax.train.mesh import check_platform, setup_devices
  with pytest.raises(RuntimeError, match=r"mesh.platform='gpu': no GPU backend .*\['cpu'\]"):
    setup_devices(C.MeshConfig(platform="gpu"))
  check_platform("cpu")
  code = ("from lasp_jax.train.config import MeshConfig\n"
          "from lasp_jax.train.mesh import setup_devices\n"
          "setup_devices(MeshConfig(platform='gpu'))\n"
          "import jax\n"
          "print('PLATFORMS', sorted({d.platform for d in jax.devices()}))")
  p = subprocess.run([sys.executable, "-c", code], cwd=C.REPO_ROOT, capture_output=True, text=True,
                     timeout=120, env={**os.environ, "JAX_PLATFORMS": ""})
  if p.returncode == 0 and "'gpu'" in p.stdout:
    pytest.skip(f"test_unavailable_platform_is_named_with_the_ones_jax_has: this host has a GPU "
                f"({p.stdout.strip()}), so a fresh process cannot show the no-GPU message")
  assert p.returncode != 0, p.stdout[-2000:]
  assert "no GPU backend is available" in p.stderr and "['cpu']" in p.stderr, p.stderr[-2000:]


def test_speed_honours_steps(monkeypatch, capsys):
  """``train.py speed steps=N`` runs N steps per mesh (30 without ``steps=``), leaving out the
  first ``min(5, N - 1)`` (compilation) from the medians."""
  import train  # the top-level script
  from lasp_jax.train import speed
  runs = []

  def fake_run(cfg):
    runs.append(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "w") as f:
      for s in range(1, cfg.steps + 1):
        f.write(json.dumps({"kind": "train", "step": s, "loss": 1.0 / s, "tok_s": 10.0 * s,
                            "step_time": 0.1}) + "\n")
  monkeypatch.setattr(speed, "run", fake_run)
  assert train.main(["speed", "steps=3", "log.progress=false"]) == 0
  assert [c.steps for c in runs] == [3, 3] and "tokens/s" in capsys.readouterr().out
  r = speed.compare(C.load_config(None, ["steps=3"]), steps=3)
  assert all(v["tok_s"] == 30.0 and v["final_loss"] == 1 / 3 for v in r.values()), r
  runs.clear()
  assert train.main(["speed"]) == 0
  assert [c.steps for c in runs] == [30, 30]
  assert train.main(["speed", "steps=1"]) == 2
  assert "steps=1 must be >= 2" in capsys.readouterr().err


def test_grouped_model_keys_and_the_flat_ones_of_earlier_versions():
  """``model.linear.variant=gla`` (the grouped key), ``model.linear_variant=gla`` (the flat name
  of earlier versions) and nested YAML are one config; written back nested; and a run saved with
  the flat names resumes under the grouped ones (no conflict) but not with another variant."""
  from lasp_jax.train.checkpoint import resume_conflicts  # pylint: disable=import-outside-toplevel
  a = C.load_config(None, ["model.linear.variant=gla", "model.runtime.chunk_size=32"])
  b = C.load_config(None, ["model.linear_variant=gla", "model.chunk_size=32"])
  assert a == b and a.model.overrides["linear.variant"] == "gla"
  assert a.to_dict()["model"]["linear"]["variant"] == "gla"
  assert C.from_dict(a.to_dict()) == a
  with pytest.raises(ValueError, match="linear.variant must be one of .* got 'fancy'"):
    C.load_config(None, ["model.linear.variant=fancy"])
  with pytest.raises(ValueError, match=re.escape("['model.linear.varaint']")):
    C.load_config(None, ["model.linear.varaint=gla"])
  mcfg = models.get_config("tiny_hybrid", linear_variant="gla", chunk_size=32)
  new = {**a.to_dict(), "resolved_model": mcfg.to_dict()}
  flat_name = {v: k for k, v in models.config.FLAT_ALIASES.items()}
  # The fields of earlier versions: the aliased ones and the top-level ones of then.
  old_flat = {flat_name.get(k, k): v for k, v in mcfg.flat_dict().items()
              if k in flat_name or ("." not in k and k != "layer_types")}
  assert resume_conflicts({**new, "resolved_model": old_flat}, new) == []
  old_flat["linear_variant"] = "basic"
  old_flat["chunk_size"] = 16                       # runtime: may change on resume
  assert resume_conflicts({**new, "resolved_model": old_flat}, new) == [
      "model.linear.variant: 'basic' -> 'gla'"]
