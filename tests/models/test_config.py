"""ModelConfig validation, presets, parameter counts, FLOPs, and the variants' closed forms."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lasp_jax import models
from lasp_jax.models import linear_attention as la


@pytest.mark.parametrize("changes, needle", [
    (dict(linear_variant="mamba"), "'mamba'"),
    (dict(layer_pattern="LLXN"), "'X'"),
    (dict(layer_pattern=""), "layer_pattern"),
    (dict(d_model=30, num_heads=4), "num_heads=4 does not divide d_model=30"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3"),
    (dict(feature_map="cosine"), "'cosine'"),
    (dict(compute_dtype="float16"), "'float16'"),
    (dict(layout="ring"), "'ring'"),
    (dict(num_layers=0), "num_layers"),
    (dict(chunk_size=-16), "-16"),
    (dict(batch_axes=("data", "sp")), "'sp'"),
    (dict(short_conv=-1), "short_conv must be a kernel size >= 0 (0: no conv), got -1"),
    (dict(short_conv=True), "got True"),
    (dict(kernel_backend="cuda"), "kernel_backend must be one of ('auto', 'xla', 'tpu', 'gpu'), "
                                  "got 'cuda'"),
])
def test_bad_config_names_the_value(changes, needle):
  with pytest.raises(ValueError, match=re.escape(needle)):
    models.ModelConfig.from_dict(changes)


def test_head_dim_set_explicitly_lifts_divisibility():
  cfg = models.ModelConfig(d_model=30, num_heads=4, head_dim=8)
  assert cfg.dim_per_head == 8


def test_dict_round_trip_and_unknown_keys():
  cfg = models.get_config("tiny_hybrid", layout="zigzag", batch_axes=("data", "fsdp"))
  d = cfg.to_dict()
  assert d["runtime"]["batch_axes"] == ["data", "fsdp"]  # YAML-friendly
  assert models.ModelConfig.from_dict(d) == cfg
  assert models.ModelConfig.from_dict(cfg.flat_dict()) == cfg
  with pytest.raises(ValueError, match="'d_modle'"):
    models.ModelConfig.from_dict({"d_modle": 64})
  with pytest.raises(ValueError, match="'linear.varaint'"):
    models.ModelConfig.from_dict({"linear": {"varaint": "gla"}})
  with pytest.raises(ValueError, match="'bogus'"):
    models.get_config("bogus")


def test_groups_and_the_flat_keys_of_earlier_versions():
  """Every key lives in one group; the flat names still work everywhere a config is built, and
  a saved ``resolved_model`` of an earlier version (flat) resumes as the same config."""
  cfg = models.get_config("tiny_gdn_hybrid")
  assert (cfg.linear.variant, cfg.linear.short_conv, cfg.softmax.num_kv_heads,
          cfg.runtime.chunk_size, cfg.norm.eps) == ("gated_deltanet", 4, 2, 16, 1e-5)
  flat_old = {"vocab_size": 256, "d_model": 32, "num_layers": 4, "num_heads": 4,
              "num_kv_heads": 2, "head_dim": None, "ffn_dim": 64, "layer_pattern": "LLLN",
              "linear_variant": "gated_deltanet", "feature_map": "swish", "feature_dim": 4,
              "gate_rank": 4, "gate_normalizer": 16.0, "allow_neg_eigval": False,
              "short_conv": 4, "tie_embeddings": False, "param_dtype": "float32",
              "compute_dtype": "float32", "chunk_size": 16, "rope_base": 500000.0,
              "norm_eps": 1e-5, "init_std": 0.02, "remat": False, "seq_axis": "sp",
              "batch_axes": ["data"], "fsdp_axis": "fsdp", "tensor_axis": "tensor",
              "layout": "contiguous", "exchange": "allgather", "kernel_backend": "auto"}
  assert models.ModelConfig.from_dict(flat_old) == cfg
  assert set(models.config.FLAT_ALIASES) | set(cfg.to_dict()) >= set(flat_old)
  assert (cfg.replace(linear_variant="gla") == cfg.replace(linear={"variant": "gla"})
          == cfg.replace(**{"linear.variant": "gla"}) == cfg.replace(linear__variant="gla"))
  assert cfg.replace(layout="zigzag").runtime.layout == "zigzag"
  assert set(cfg.flat_dict()) == set(models.ModelConfig.field_types())


def test_layer_pattern_repeats_to_depth():
  cfg = models.ModelConfig(num_layers=6, layer_pattern="LLLN")
  assert cfg.layer_kinds == ("linear",) * 3 + ("softmax",) + ("linear",) * 2


def _closed_form_count(cfg):
  v, d, h, hkv, dh, f = (cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.kv_heads,
                         cfg.dim_per_head, cfg.ffn_dim)
  linear = 5 * d * h * dh + dh        # q, k, v, output gate, output; per-head output norm
  linear += cfg.linear.short_conv * 3 * h * dh  # the depthwise taps on q, k, v
  softmax = 2 * d * h * dh + 2 * d * hkv * dh
  common = 2 * d + 3 * d * f          # two RMSNorms, SwiGLU
  layers = sum((linear if k == "linear" else softmax) + common for k in cfg.layer_kinds)
  return v * d * (1 if cfg.tie_embeddings else 2) + layers + d


def test_1b_preset_shapes_and_parameter_count():
  cfg = models.get_config("linear_llama3_1b")
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.ffn_dim) == (
      16, 2048, 16, 128, 8192)
  n = models.count_params(cfg)
  assert n == _closed_form_count(cfg)
  # 128256*2048 tied embedding + 16 * (5*2048^2 + 128 + 2*2048 + 3*2048*8192) + 2048
  assert n == 1_403_588_608
  hybrid = models.get_config("linear_llama3_1b_hybrid")
  assert hybrid.layer_kinds.count("softmax") == 4
  assert models.count_params(hybrid) == _closed_form_count(hybrid)
  gdn = models.get_config("gated_deltanet_1b_hybrid")
  assert gdn.linear.short_conv == 4 and gdn.layer_kinds.count("linear") == 12
  # + per linear layer: beta's and the decay gate's projections (d H each), dt_bias and A_log (H)
  n_gdn = models.count_params(gdn)
  assert n_gdn == _closed_form_count(gdn) + 12 * (2 * 2048 * 16 + 2 * 16)
  assert n_gdn == 1_371_115_392


@pytest.mark.parametrize("variant", ["gla", "simple_gla", "based", "rebased", "deltanet",
                                     "gated_deltanet", "kda"])
def test_count_params_matches_the_built_model(variant):
  cfg = models.get_config("tiny_hybrid", linear_variant=variant, tie_embeddings=True)
  state = nnx.state(nnx.eval_shape(lambda: models.LinearLlama(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  sizes = [x.size for x in jax.tree.leaves(state)]
  # three linear layers (d 32, 4 heads of 8, rank 4, feature_dim 4): gates and ReBased's affine;
  # the delta rule's beta projection (d H), Gated DeltaNet's and KDA's A_log (H) and dt_bias
  extra = {"gla": 3 * (32 * 4 + 4 * 32 + 32), "simple_gla": 3 * (32 * 4 + 4), "based": 0,
           "rebased": 3 * 2 * 4 * 4, "deltanet": 3 * 32 * 4,
           "gated_deltanet": 3 * (32 * 4 + 4 + 4 + 32 * 4),
           "kda": 3 * (32 * 4 + 4 * 32 + 32 + 4 + 32 * 4)}[variant]
  # q and k (and their conv taps) are feature_dim 4 wide per head, not head_dim 8
  dqk_delta = {v: 3 * 2 * (32 + cfg.linear.short_conv) * 4 * (4 - 8) for v in ("based", "rebased")}
  base = _closed_form_count(cfg) + extra + dqk_delta.get(variant, 0)
  assert models.count_params(cfg) == sum(sizes) == base


def test_flops_per_token():
  cfg = models.get_config("linear_llama3_1b")
  d, h, dh, f, v, c = 2048, 16, 128, 8192, 128256, cfg.runtime.chunk_size
  per_layer = 2 * (5 * d * h * dh + 3 * d * f) + h * (4 * dh * dh + c * 2 * dh)
  want = 3 * (2 * d * v + 16 * per_layer)
  assert models.flops_per_token(cfg, 8192) == pytest.approx(want)
  # Linear attention: the cost per token does not grow with the sequence; softmax layers do.
  assert models.flops_per_token(cfg, 65536) == models.flops_per_token(cfg, 8192)
  hyb = models.get_config("linear_llama3_1b_hybrid")
  grow = models.flops_per_token(hyb, 16384) - models.flops_per_token(hyb, 8192)
  assert grow == pytest.approx(3 * 4 * h * 2 * dh * 8192)
  with pytest.raises(ValueError, match="seq_len"):
    models.flops_per_token(cfg, 0)
  # The short conv: K multiply-adds per channel of q, k, v, forward and backward, per layer.
  conv = models.flops_per_token(cfg.replace(short_conv=4), 8192) - models.flops_per_token(cfg, 8192)
  assert conv == pytest.approx(3 * 16 * 2 * 4 * 3 * h * dh)


def test_presets_short_conv():
  assert models.get_config("tiny").linear.short_conv == models.get_config("tiny_hybrid").linear.short_conv == 4
  assert models.get_config("tiny_gdn_hybrid").linear.short_conv == 4
  assert models.get_config("gated_deltanet_1b_hybrid").linear.short_conv == 4
  assert models.get_config("linear_llama3_1b").linear.short_conv == 0


def test_decay_constants():
  ret = np.asarray(la.retention_log_decay(4))
  np.testing.assert_allclose(ret, np.log(1 - 2.0 ** (-5 - np.arange(4))), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(la.alibi_slopes(8)), 2.0 ** -np.arange(1, 9), rtol=1e-6)
  assert la.alibi_slopes(6).shape == (6,)
  first = np.asarray(la.lightning_log_decay(8, 0, 4))
  last = np.asarray(la.lightning_log_decay(8, 3, 4))
  np.testing.assert_allclose(first, -(2.0 ** -np.arange(1, 9)) * (1 + 1e-5), rtol=1e-6)
  assert np.all(first < last) and np.all(last < 0)  # deeper layers decay less, never zero


def test_feature_map_kernels():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 5))
  dot = jnp.sum(q * k)
  phi = jnp.sum(la.taylor_features(q) * la.taylor_features(k))
  assert la.taylor_features(q).shape[-1] == 1 + 5 + 25
  np.testing.assert_allclose(phi, 1 + dot + dot ** 2 / 2, rtol=1e-5)
  gamma = jax.random.normal(jax.random.key(1), (1, 5))
  beta = jax.random.normal(jax.random.key(2), (1, 5))

  def tilde(x):
    x = (x - x.mean()) / jnp.sqrt(x.var() + 1e-5)
    return gamma * x + beta

  phi = jnp.sum(la.rebased_features(q, gamma, beta) * la.rebased_features(k, gamma, beta))
  np.testing.assert_allclose(phi, jnp.sum(tilde(q) * tilde(k)) ** 2, rtol=1e-5)
  assert math.isfinite(float(phi))


def test_kernel_backend_reaches_the_linear_ops(monkeypatch):
  """``ModelConfig.runtime.kernel_backend`` is the ``backend=`` of every linear layer's op, one device and
  sequence parallel; on CPU "xla" is what "auto" picks, so the logits are the same bits."""
  import lasp_jax
  from lasp_jax.sequence_parallel import lasp2
  assert set(models.KERNEL_BACKENDS) == set(lasp2.BACKENDS)  # every value the ops take, no more
  seen = []

  def recording(op):
    def call(*args, **kwargs):
      seen.append((op.__name__, kwargs.get("backend")))
      return op(*args, **kwargs)
    return call

  monkeypatch.setattr(lasp_jax, "linear_attention", recording(lasp_jax.linear_attention))
  monkeypatch.setattr(lasp_jax, "lasp2_attention", recording(lasp_jax.lasp2_attention))
  cfg = models.get_config("tiny_gdn_hybrid", num_layers=2)   # two delta-rule layers
  assert cfg.runtime.kernel_backend == "auto"
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 64), 0, cfg.vocab_size)
  logits = {}
  for backend in ("auto", "xla"):
    seen.clear()
    model = models.create_model(cfg.replace(kernel_backend=backend))
    logits[backend] = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    assert seen == [("linear_attention", backend)] * 2
  np.testing.assert_array_equal(logits["xla"], logits["auto"])
  seen.clear()
  mesh = jax.make_mesh((2,), ("sp",))
  with jax.set_mesh(mesh):
    model = models.create_model(cfg.replace(kernel_backend="xla"), mesh=mesh)
    nnx.eval_shape(lambda m, t: m(t), model, tokens)   # tracing reaches the op: no compile
  assert seen == [("lasp2_attention", "xla")] * 2
