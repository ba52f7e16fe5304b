"""Qwen3.5 checkpoints in and out (``lasp_jax.models.hf``) against transformers' own forward.

The reference is ``tests/fixtures/qwen3_5_tiny_reference.npz``: logits and greedy tokens that
transformers 5.25 computed for the random checkpoint in ``tests/fixtures/qwen3_5_tiny``
(``tests/fixtures/make_hf_fixtures.py`` makes both; torch is not needed here). The live test at the
end re-runs transformers when it is importable.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.flax import load_file

from lasp_jax import models
from lasp_jax.models import hf
from lasp_jax.sequence_parallel.layout import unzigzag, zigzag
from tests.fixtures import hf_checkpoint_variants as variants


FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
CKPT = FIXTURES / "qwen3_5_tiny"
# transformers' own float32 logits differ from its float64 ones by 2.7e-5 on this fixture (a gated
# norm of a near-zero head amplifies rounding; tests/fixtures/make_hf_fixtures.py): 1e-4 is that
# noise with a margin, and a wrong layout is off by O(1).
RTOL = 1e-4


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "qwen3_5_tiny_reference.npz"))


@pytest.fixture(scope="module")
def model():
  return hf.from_hf(str(CKPT), chunk_size=8)


def rel(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def logits(model, ids, **kw):
  return np.asarray(jax.jit(lambda m, x: m(x, **kw))(model, jnp.asarray(ids, jnp.int32)))


def test_config_is_the_preset_and_logits_equal_transformers(model, ref):
  assert model.config == models.get_config("qwen3_5_tiny")
  assert rel(logits(model, ref["input_ids"]), ref["logits"]) < RTOL


def test_eight_devices_zigzag_equal_transformers(model, ref):
  """LASP-2 / LASP-2H over 8 devices in zigzag order: the first 64 tokens (causal, so their
  logits are transformers' too; 64 = 8 devices x 2 segments x chunk 4, and a segment holds the
  conv's 3-token halo)."""
  mesh = jax.make_mesh((8,), ("sp",))
  ids = jnp.asarray(ref["input_ids"][:, :64], jnp.int32)
  cfg = model.config.replace(layout="zigzag", chunk_size=4)
  with jax.set_mesh(mesh):
    sp_model = hf.from_hf(str(CKPT), mesh=mesh, layout="zigzag", chunk_size=4)
    assert sp_model.config == cfg
    out = jax.jit(lambda m, x: unzigzag(m(zigzag(x, 8)), 8))(sp_model, ids)
  assert rel(out, ref["logits"][:, :64]) < RTOL


def test_greedy_generation_equals_transformers(model, ref):
  prompt = jnp.asarray(ref["prompt_ids"], jnp.int32)
  new = ref["generated_ids"].shape[1] - prompt.shape[1]
  out = models.generate(model, prompt, max_new_tokens=new)
  np.testing.assert_array_equal(np.asarray(out)[:, -new:], ref["generated_ids"][:, -new:])


def test_export_is_bit_exact_and_round_trips(model, tmp_path):
  out = tmp_path / "export"
  hf.to_hf(model, str(out))
  want, _ = variants.read_safetensors(CKPT / "model.safetensors")
  got, _ = variants.read_safetensors(out / "model.safetensors")
  assert sorted(got) == sorted(want)
  for name, val in want.items():
    np.testing.assert_array_equal(got[name], val, err_msg=name)
  saved = json.loads((out / "config.json").read_text())
  assert hf.config_from_hf(saved, chunk_size=8) == model.config
  again = hf.from_hf(str(out), chunk_size=8)
  for (pa, a), (pb, b) in zip(nnx.to_flat_state(nnx.state(model)),
                              nnx.to_flat_state(nnx.state(again))):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(pa))


def test_bfloat16_checkpoint_in_and_out(model, tmp_path):
  """A bfloat16 export stores every tensor as the bf16 rounding of ours; read back as bfloat16
  params it is those tensors exactly, as float32 params their exact widening; and a bf16 model's
  own export is bit-exact with the file it came from."""
  out = tmp_path / "bf16"
  hf.to_hf(model, str(out), dtype="bfloat16")
  want, _ = variants.read_safetensors(CKPT / "model.safetensors")
  got = load_file(str(out / "model.safetensors"))   # flax: numpy has no bfloat16
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  for name, val in want.items():
    assert got[name].dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(np.asarray(got[name], np.float32),
                                  np.asarray(jnp.asarray(val, jnp.bfloat16), np.float32),
                                  err_msg=name)
  ours = {str(p): np.asarray(x[...]) for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for dtype in ("bfloat16", "float32"):
    back = hf.from_hf(str(out), chunk_size=8, param_dtype=dtype)
    assert back.config.param_dtype == dtype
    for p, x in nnx.to_flat_state(nnx.state(back, nnx.Param)):
      assert x[...].dtype == jnp.dtype(dtype), p
      np.testing.assert_array_equal(
          np.asarray(x[...], np.float32),
          np.asarray(jnp.asarray(ours[str(p)], jnp.bfloat16), np.float32), err_msg=str(p))
  again = tmp_path / "again"
  hf.to_hf(hf.from_hf(str(out), chunk_size=8, param_dtype="bfloat16"), str(again))
  for name, val in load_file(str(again / "model.safetensors")).items():
    assert val.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(val, np.float32), np.asarray(got[name], np.float32))


def test_sharded_and_wrapped_layouts(model, ref, tmp_path):
  """An index with two shards, and the released checkpoints' layout (text weights under
  ``model.language_model.``, a nested ``text_config``; vision and MTP tensors skipped only when
  asked)."""
  want = logits(model, ref["input_ids"][:1])
  sharded = variants.write_sharded(CKPT, tmp_path / "sharded")
  assert len(list(sharded.glob("*.safetensors"))) == 2
  np.testing.assert_array_equal(logits(hf.from_hf(str(sharded), chunk_size=8),
                                       ref["input_ids"][:1]), want)
  wrapped = variants.write_conditional_generation(CKPT, tmp_path / "wrapped", extra_keys=True)
  with pytest.raises(ValueError, match=r"tensor '(mtp|model\.visual)\..*' has no place .*"
                                       r"ignore_prefixes"):
    hf.from_hf(str(wrapped), chunk_size=8)
  m = hf.from_hf(str(wrapped), chunk_size=8, ignore_prefixes=hf.NON_TEXT_PREFIXES)
  np.testing.assert_array_equal(logits(m, ref["input_ids"][:1]), want)


def _broken(tmp_path, **edits):
  return variants.broken_copy(CKPT, tmp_path, **edits)


@pytest.mark.parametrize("case, needle", [
    ("missing", "tensor 'model.layers.0.linear_attn.A_log' is missing"),
    ("extra", "tensor 'model.layers.0.mlp.experts.0.w1' has no place"),
    ("shape", "tensor 'model.norm.weight' has shape (63,), the config needs (64,)"),
    ("moe", "num_experts=8: MoE layers are not supported"),
    ("bias", "attention_bias=True is not supported"),
    ("type", "model_type 'llama' is not supported"),
    ("rope", "rope_type='yarn' is not supported"),
    ("no_dir", "is not a directory"),
])
def test_bad_checkpoints_name_the_problem(case, needle, tmp_path):
  edits = {
      "missing": dict(edit_tensors=lambda t: t.pop("model.layers.0.linear_attn.A_log")),
      "extra": dict(edit_tensors=lambda t: t.update(
          {"model.layers.0.mlp.experts.0.w1": np.zeros((2, 2), np.float32)})),
      "shape": dict(edit_tensors=lambda t: t.update(
          {"model.norm.weight": np.zeros((63,), np.float32)})),
      "moe": dict(edit_config=lambda c: c.update(num_experts=8)),
      "bias": dict(edit_config=lambda c: c.update(attention_bias=True)),
      "type": dict(edit_config=lambda c: c.update(model_type="llama")),
      "rope": dict(edit_config=lambda c: c["rope_parameters"].update(rope_type="yarn")),
  }
  path = str(tmp_path / "nope") if case == "no_dir" else _broken(tmp_path, **edits[case])
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    hf.from_hf(path, chunk_size=8)


def test_export_refuses_what_qwen3_5_cannot_express(tmp_path):
  tiny = models.create_model(models.get_config("tiny_gdn_hybrid"))
  with pytest.raises(ValueError, match="model.norm.zero_centered=False"):
    hf.to_hf(tiny, str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()
  (tmp_path / "taken").mkdir()
  with pytest.raises(ValueError, match="exists"):
    hf.to_hf(models.create_model(models.get_config("qwen3_5_tiny")), str(tmp_path / "taken"))
  assert list(tmp_path.iterdir()) == [tmp_path / "taken"]


def test_live_transformers_loads_an_export(tmp_path):
  """When torch and transformers are importable: a model made here (random weights, every norm
  randomised), exported, gives transformers the same logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "Qwen3_5ForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5")
  cfg = models.get_config("qwen3_5_tiny")
  m = models.create_model(cfg, seed=3)
  rng = np.random.default_rng(0)
  for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    if var[...].ndim == 1:                       # norms, A_log, dt_bias: not their init values
      var.set_value(jnp.asarray(0.3 * rng.standard_normal(var.shape), jnp.float32))
  hf.to_hf(m, str(tmp_path / "out"))
  theirs = transformers.Qwen3_5ForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                           torch_dtype=torch.float32).eval()
  ids = rng.integers(0, cfg.vocab_size, (2, 72))
  with torch.no_grad():
    want = theirs(torch.as_tensor(ids)).logits.numpy()
  assert rel(logits(m, ids), want) < RTOL
