"""fla's Gated DeltaNet checkpoints in and out (``lasp_jax.models.hf``) against fla's own forward.

The reference is ``tests/fixtures/fla_gdn_tiny_reference.npz``: float64 logits of fla 0.6's
``GatedDeltaNetForCausalLM`` module graph, run on CPU with its Triton kernels replaced by their
torch forms, for the random checkpoint in ``tests/fixtures/fla_gdn_tiny``
(``tests/fixtures/make_fla_fixtures.py`` makes both; neither torch nor fla is needed here). The
live test at the end runs fla the same way on an export when fla is importable.
"""

import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lasp_jax import models
from lasp_jax.models import hf, llama
from lasp_jax.sequence_parallel.layout import unzigzag, zigzag
from tests.fixtures import hf_checkpoint_variants as variants
from tests.models.test_hf import logits, rel


FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
CKPT = FIXTURES / "fla_gdn_tiny"
# Float32 here against fla's float64: fla's own float32 forward is 3.4e-6 off its float64 one on
# this fixture; a wrong layout or convention is off by O(1).
RTOL = 1e-4


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "fla_gdn_tiny_reference.npz"))


@pytest.fixture(scope="module")
def model():
  return hf.from_hf(str(CKPT), chunk_size=8)




def params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_config_maps_fla_keys(model):
  cfg = model.config
  assert cfg.layer_kinds == ("linear", "softmax", "linear")
  assert (cfg.num_heads, cfg.linear_value_heads, cfg.linear_key_dim, cfg.linear_value_dim) == (
      2, 4, 16, 32)
  assert cfg.linear.variant == "gated_deltanet" and cfg.linear.short_conv == 4
  assert cfg.linear.allow_neg_eigval and not cfg.norm.zero_centered and cfg.norm.eps == 1e-6
  assert (cfg.softmax_heads, cfg.kv_heads, cfg.softmax_head_dim, cfg.softmax.rotary_fraction) == (
      4, 2, 16, 1.0)
  assert not cfg.softmax.qk_norm and not cfg.softmax.output_gate
  assert cfg.ffn_dim == 128 and not cfg.tie_embeddings


def test_logits_equal_fla(model, ref):
  assert rel(logits(model, ref["input_ids"]), ref["logits"]) < RTOL


def test_eight_devices_zigzag_equal_fla(ref):
  """LASP-2 / LASP-2H over 8 devices in zigzag order on the first 64 tokens (causal, so their
  logits are fla's too; 64 = 8 devices x 2 segments x chunk 4)."""
  mesh = jax.make_mesh((8,), ("sp",))
  ids = jnp.asarray(ref["input_ids"][:, :64], jnp.int32)
  with jax.set_mesh(mesh):
    sp_model = hf.from_hf(str(CKPT), mesh=mesh, layout="zigzag", chunk_size=4)
    out = jax.jit(lambda m, x: unzigzag(m(zigzag(x, 8)), 8))(sp_model, ids)
  assert rel(out, ref["logits"][:, :64]) < RTOL


def test_export_is_bit_exact_and_round_trips(model, tmp_path):
  out = tmp_path / "export"
  hf.to_hf(model, str(out), layout="fla")
  want, _ = variants.read_safetensors(CKPT / "model.safetensors")
  got, _ = variants.read_safetensors(out / "model.safetensors")
  assert sorted(got) == sorted(want)
  for name, val in want.items():
    np.testing.assert_array_equal(got[name], val, err_msg=name)
  saved = json.loads((out / "config.json").read_text())
  fixture = json.loads((CKPT / "config.json").read_text())
  for key in ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
              "num_heads", "head_dim", "num_v_heads", "expand_v", "use_gate", "use_short_conv",
              "conv_size", "allow_neg_eigval", "intermediate_size", "hidden_act", "norm_eps",
              "tie_word_embeddings", "output_gate_activation"):
    assert saved[key] == fixture[key], key
  assert saved["attn"] == {k: fixture["attn"][k] for k in saved["attn"]}
  assert hf.config_from_hf(saved, chunk_size=8) == model.config
  again = params(hf.from_hf(str(out), chunk_size=8))
  for path, val in params(model).items():
    np.testing.assert_array_equal(again[path], val, err_msg=str(path))


def test_made_here_round_trips_without_conv_or_softmax(tmp_path):
  """A model made here with tied embeddings, no short conv and no softmax layer (fla's
  ``use_short_conv: false``, ``attn: null``) comes back with the same config and weights."""
  cfg = models.get_config("tiny_gdn_hybrid").replace(
      layer_pattern="L", short_conv=0, tie_embeddings=True, linear__num_value_heads=8,
      linear__value_dim=16)
  m = llama.LinearLlama(cfg, rngs=nnx.Rngs(params=1))   # eager: no init program to compile
  hf.to_hf(m, str(tmp_path / "out"), layout="fla")
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert saved["attn"] is None and saved["use_short_conv"] is False and saved["expand_v"] == 2.0
  back = hf.from_hf(str(tmp_path / "out"), chunk_size=16)
  flat, back_flat = cfg.flat_dict(), back.config.flat_dict()
  for key in ("d_model", "num_layers", "num_heads", "ffn_dim", "tie_embeddings", "linear.variant",
              "linear.short_conv", "norm.eps", "norm.zero_centered"):
    assert back_flat[key] == flat[key], key
  assert back.config.layer_kinds == cfg.layer_kinds
  assert (back.config.linear_value_heads, back.config.linear_value_dim) == (8, 16)
  again = params(back)
  for path, val in params(m).items():
    np.testing.assert_array_equal(again[path], val, err_msg=str(path))


def _broken(tmp_path, **edits):
  return variants.broken_copy(CKPT, tmp_path, **edits)


@pytest.mark.parametrize("case, needle", [
    ("no_gate", "use_gate=False is not supported"),
    ("sigmoid_gate", "output_gate_activation='sigmoid' is not supported"),
    ("powlu", "hidden_act='powlu' is not supported"),
    ("attnres", "attnres_block_size=2 is not supported"),
    ("qkv_bias", "attn.qkv_bias=True is not supported"),
    ("window", "attn.window_size=16 is not supported"),
    ("two_attn", "attn specs with different (num_heads, num_kv_heads, rope_theta)"),
    ("expand_v", "head_dim * expand_v = 20.8 is not an integer"),
    ("missing", "tensor 'model.layers.2.attn.v_conv1d.weight' is missing"),
])
def test_bad_fla_checkpoints_name_the_problem(case, needle, tmp_path):
  def two_attn(c):
    c["attn"] = [c["attn"], dict(c["attn"], layers=[2], num_heads=2)]
  edits = {
      "no_gate": dict(edit_config=lambda c: c.update(use_gate=False)),
      "sigmoid_gate": dict(edit_config=lambda c: c.update(output_gate_activation="sigmoid")),
      "powlu": dict(edit_config=lambda c: c.update(hidden_act="powlu")),
      "attnres": dict(edit_config=lambda c: c.update(attnres_block_size=2)),
      "qkv_bias": dict(edit_config=lambda c: c["attn"].update(qkv_bias=True)),
      "window": dict(edit_config=lambda c: c["attn"].update(window_size=16)),
      "two_attn": dict(edit_config=two_attn),
      "expand_v": dict(edit_config=lambda c: c.update(expand_v=1.3)),
      "missing": dict(edit_tensors=lambda t: t.pop("model.layers.2.attn.v_conv1d.weight")),
  }
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")
                     .replace("*", r"\*")):
    hf.from_hf(_broken(tmp_path, **edits[case]), chunk_size=8)


def test_export_refuses_what_fla_cannot_express(tmp_path):
  # to_hf checks the config before it reads a weight: a stand-in with only .config does.
  qwen = types.SimpleNamespace(config=models.get_config("qwen3_5_tiny"))
  with pytest.raises(ValueError, match="model.norm.zero_centered=True: an fla Gated DeltaNet"):
    hf.to_hf(qwen, str(tmp_path / "x"), layout="fla")
  gated = types.SimpleNamespace(
      config=models.get_config("tiny_gdn_hybrid", softmax__output_gate=True))
  with pytest.raises(ValueError, match="model.softmax.output_gate=True: fla's softmax"):
    hf.to_hf(gated, str(tmp_path / "x"), layout="fla")
  with pytest.raises(ValueError, match="layout 'mamba' is not one of"):
    hf.to_hf(gated, str(tmp_path / "x"), layout="mamba")
  assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_live_fla_loads_an_export(tmp_path):
  """When torch and fla are importable: a model made here (random weights, every norm, A_log and
  dt_bias randomised), exported, gives fla (run as the fixture script runs it) the same logits.
  Slow (about 11 s, most of it importing fla) and fla is not a dependency: ``-m slow``."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("fla")
  from tests.fixtures import make_fla_fixtures as fla_ref  # pylint: disable=import-outside-toplevel
  cfg = models.get_config("tiny_gdn_hybrid").replace(
      num_layers=3, layer_types=["linear", "softmax", "linear"], linear__num_value_heads=8,
      linear__value_dim=16, chunk_size=8)
  m = models.create_model(cfg, seed=3)
  rng = np.random.default_rng(0)
  for _, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    if var[...].ndim == 1:
      var.set_value(jnp.asarray(0.5 + rng.random(var.shape), jnp.float32))
  hf.to_hf(m, str(tmp_path / "out"), layout="fla")
  fla_ref._patch_fla()  # pylint: disable=protected-access
  from fla.models import GatedDeltaNetForCausalLM  # pylint: disable=import-outside-toplevel
  theirs = GatedDeltaNetForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                    dtype=torch.float64).eval()
  ids = rng.integers(0, cfg.vocab_size, (2, 40))
  want = fla_ref.logits_of(theirs, torch.as_tensor(ids))
  assert rel(logits(m, ids), want) < RTOL


def test_cli_import_then_export_fla_is_bit_exact(tmp_path):
  """``train.py import`` finds the layout by ``model_type``; ``export --layout fla`` writes it
  back, the step-0 weights bit for bit."""
  import train as train_cli  # pylint: disable=import-outside-toplevel
  run_dir, out = tmp_path / "run", tmp_path / "out"
  assert train_cli.main(["import", str(CKPT), str(run_dir), "model.runtime.chunk_size=8",
                         "log.progress=false"]) == 0
  assert train_cli.main(["export", str(run_dir), str(out), "--step", "0", "--layout", "fla"]) == 0
  want, _ = variants.read_safetensors(CKPT / "model.safetensors")
  got, _ = variants.read_safetensors(out / "model.safetensors")
  assert sorted(got) == sorted(want)
  for name, val in want.items():
    np.testing.assert_array_equal(got[name], val, err_msg=name)
