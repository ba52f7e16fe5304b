"""Hugging Face checkpoints in and out: Qwen3.5 dense text models (``Qwen3_5ForCausalLM``, and the
text model inside ``Qwen3_5ForConditionalGeneration``).

``from_hf(path)`` reads a model folder (``config.json`` and one ``*.safetensors`` file, or shards
with ``model.safetensors.index.json``) tensor by tensor, each placed on the mesh by the sharding
rules as it is read (no whole host copy of the model); ``to_hf(model, path)`` writes the same
layout and a ``config.json`` that transformers loads. The mapping is one table (``_tensor_map``):
each Hugging Face tensor, the parameters it holds here and the two reshapes between them.

What Qwen3.5 is in ``ModelConfig`` terms: Gated DeltaNet linear layers (``linear.variant``
``gated_deltanet``, the kernel-4 short conv, ``linear.num_value_heads`` value heads sharing
``num_heads`` q/k heads, separate ``linear.key_dim``/``value_dim``), softmax layers with their own
heads and head size, q/k norm, partial rotary and the sigmoid output gate, zero-centred norms and
``layer_types`` from the file. Anything else in a checkpoint (MoE experts, the vision tower, the
multi-token-prediction head, attention biases, another RoPE type) is an error naming it; the vision
and MTP tensors of the released checkpoints may be skipped explicitly (``ignore_prefixes``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax.models.config import ModelConfig

TEXT_MODEL_TYPE = "qwen3_5_text"
WRAPPED_MODEL_TYPE = "qwen3_5"
WRAPPED_PREFIX = "model.language_model."
# What the released Qwen3.5 checkpoints hold besides the text model.
NON_TEXT_PREFIXES = ("model.visual.", "mtp.")
_HF_KINDS = {"linear_attention": "linear", "full_attention": "softmax"}
_OUR_KINDS = {v: k for k, v in _HF_KINDS.items()}


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

def _need(d: Mapping[str, Any], key: str, where: str):
  if key not in d or d[key] is None:
    raise ValueError(f"{where}: config.json has no {key!r}")
  return d[key]


def config_from_hf(hf: Mapping[str, Any], *, param_dtype: str = "float32", **runtime
                   ) -> ModelConfig:
  """Our config of a Qwen3.5 ``config.json`` (either model type); ``runtime``: any
  ``runtime.*`` field (``chunk_size``, ``layout``...). ValueError naming an unsupported key."""
  mt = hf.get("model_type")
  if mt == WRAPPED_MODEL_TYPE:
    text = dict(_need(hf, "text_config", "qwen3_5"))
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
  elif mt == TEXT_MODEL_TYPE:
    text = dict(hf)
  else:
    raise ValueError(f"config.json model_type {mt!r} is not supported; supported: "
                     f"{TEXT_MODEL_TYPE!r} (Qwen3_5ForCausalLM), {WRAPPED_MODEL_TYPE!r} "
                     f"(the text model of Qwen3_5ForConditionalGeneration)")
  where = f"model_type {mt!r}"
  for key, ok in (("hidden_act", "silu"), ("attention_bias", False)):
    if text.get(key, ok) != ok:
      raise ValueError(f"{where}: {key}={text[key]!r} is not supported (only {ok!r})")
  for key in ("num_experts", "num_local_experts"):
    if text.get(key):
      raise ValueError(f"{where}: {key}={text[key]!r}: MoE layers are not supported")
  n = int(_need(text, "num_hidden_layers", where))
  types = text.get("layer_types")
  if types is None:
    interval = int(text.get("full_attention_interval", 4))
    types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
             for i in range(n)]
  bad = [t for t in types if t not in _HF_KINDS]
  if bad:
    raise ValueError(f"{where}: layer_types {sorted(set(bad))} are not supported "
                     f"(only {list(_HF_KINDS)})")
  rope = dict(text.get("rope_parameters") or {})
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"{where}: rope_parameters.rope_type={rope['rope_type']!r} is not "
                     f"supported (only 'default')")
  theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
  fraction = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
  dk = int(_need(text, "linear_key_head_dim", where))
  return ModelConfig.from_dict({
      "vocab_size": int(_need(text, "vocab_size", where)),
      "d_model": int(_need(text, "hidden_size", where)),
      "num_layers": n,
      "num_heads": int(_need(text, "linear_num_key_heads", where)),
      "head_dim": dk,
      "ffn_dim": int(_need(text, "intermediate_size", where)),
      "layer_types": [_HF_KINDS[t] for t in types],
      "tie_embeddings": bool(text.get("tie_word_embeddings", False)),
      "param_dtype": param_dtype,
      "norm": {"eps": float(text.get("rms_norm_eps", 1e-6)), "zero_centered": True},
      "linear": {"variant": "gated_deltanet",
                 "short_conv": int(text.get("linear_conv_kernel_dim", 4)),
                 "num_value_heads": int(_need(text, "linear_num_value_heads", where)),
                 "key_dim": dk,
                 "value_dim": int(_need(text, "linear_value_head_dim", where))},
      "softmax": {"num_heads": int(_need(text, "num_attention_heads", where)),
                  "num_kv_heads": int(_need(text, "num_key_value_heads", where)),
                  "head_dim": int(text.get("head_dim") or
                                  int(text["hidden_size"]) // int(text["num_attention_heads"])),
                  "rope_base": float(theta), "rotary_fraction": float(fraction),
                  "qk_norm": True, "output_gate": True},
      "runtime": dict(runtime),
  })


def check_exportable(cfg: ModelConfig) -> None:
  """ValueError naming the first option a Qwen3.5 checkpoint cannot express."""
  want = {"linear.variant": "gated_deltanet", "norm.zero_centered": True,
          "softmax.qk_norm": True, "softmax.output_gate": True,
          "linear.allow_neg_eigval": False, "linear.memories": 0}
  flat = cfg.flat_dict()
  for key, val in want.items():
    if key in flat and flat[key] != val:
      raise ValueError(f"model.{key}={flat[key]!r}: a Qwen3.5 checkpoint needs {val!r}")
  if cfg.linear.short_conv <= 0:
    raise ValueError("model.linear.short_conv=0: a Qwen3.5 checkpoint needs the short conv")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """The ``config.json`` of ``cfg`` as a ``Qwen3_5ForCausalLM``."""
  check_exportable(cfg)
  return {
      "architectures": ["Qwen3_5ForCausalLM"], "model_type": TEXT_MODEL_TYPE,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.num_layers,
      "layer_types": [_OUR_KINDS[k] for k in cfg.layer_kinds],
      "num_attention_heads": cfg.softmax_heads, "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.softmax_head_dim,
      "linear_num_key_heads": cfg.num_heads, "linear_num_value_heads": cfg.linear_value_heads,
      "linear_key_head_dim": cfg.linear_key_dim, "linear_value_head_dim": cfg.linear_value_dim,
      "linear_conv_kernel_dim": cfg.linear.short_conv,
      "rms_norm_eps": cfg.norm.eps, "hidden_act": "silu", "attention_bias": False,
      "tie_word_embeddings": cfg.tie_embeddings,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.softmax.rope_base,
                          "partial_rotary_factor": cfg.softmax.rotary_fraction},
      "dtype": cfg.param_dtype,
  }


# ----------------------------------------------------------------------------------------------
# The tensor table

@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One Hugging Face tensor: the parameters (paths in ``nnx.state``) it holds, ``split`` (its
  array -> theirs) and ``join`` (theirs -> its array)."""
  name: str
  paths: tuple[tuple, ...]
  split: Callable[[jax.Array], tuple]
  join: Callable[..., jax.Array]


def _linear(name, path, heads=None):
  """A torch ``Linear`` weight ``(out, in)`` <-> ours ``(in, out)`` or ``(in, H, D)``."""
  def split(w):
    w = w.T
    return (w if heads is None else w.reshape(w.shape[0], heads, -1),)
  return _Tensor(name, (path,), split, lambda x: x.reshape(x.shape[0], -1).T)


def _out_linear(name, path, heads):
  """A torch output projection ``(D, H * Dh)`` <-> ours ``(H, Dh, D)``."""
  return _Tensor(name, (path,), lambda w: (w.T.reshape(heads, -1, w.shape[0]),),
                 lambda x: x.reshape(-1, x.shape[-1]).T)


def _same(name, path):
  return _Tensor(name, (path,), lambda w: (w,), lambda x: x)


def _tensor_map(cfg: ModelConfig, prefix: str = "model.") -> list[_Tensor]:
  """Every tensor of a Qwen3.5 checkpoint of ``cfg`` (text weights under ``prefix``)."""
  out = [_same(f"{prefix}embed_tokens.weight", ("embed",)),
         _same(f"{prefix}norm.weight", ("final_norm", "weight"))]
  if not cfg.tie_embeddings:
    out.append(_linear("lm_head.weight", ("lm_head",)))
  hk, hv = cfg.num_heads, cfg.linear_value_heads
  kd, h = hk * cfg.linear_key_dim, cfg.softmax_heads
  for i, kind in enumerate(cfg.layer_kinds):
    pre, me = f"{prefix}layers.{i}.", ("layers", i)
    out += [_same(pre + "input_layernorm.weight", me + ("attn_norm", "weight")),
            _same(pre + "post_attention_layernorm.weight", me + ("mlp_norm", "weight")),
            _linear(pre + "mlp.gate_proj.weight", me + ("mlp", "w_gate")),
            _linear(pre + "mlp.up_proj.weight", me + ("mlp", "w_up")),
            _linear(pre + "mlp.down_proj.weight", me + ("mlp", "w_down"))]
    att = me + ("attn",)
    if kind == "linear":
      pre += "linear_attn."

      def split_qkv(w, kd=kd):      # rows: all q heads, all k heads, all v heads
        q, k, v = w[:kd].T, w[kd:2 * kd].T, w[2 * kd:].T
        return q.reshape(-1, hk, kd // hk), k.reshape(-1, hk, kd // hk), v.reshape(-1, hv,
                                                                                  v.shape[1] // hv)

      def split_conv(w, kd=kd):     # (C, 1, K), the same channel order as in_proj_qkv
        w = w[:, 0, :].T
        return (w[:, :kd].reshape(-1, hk, kd // hk), w[:, kd:2 * kd].reshape(-1, hk, kd // hk),
                w[:, 2 * kd:].reshape(-1, hv, (w.shape[1] - 2 * kd) // hv))

      out += [
          _Tensor(pre + "in_proj_qkv.weight", tuple(att + (n,) for n in ("w_q", "w_k", "w_v")),
                  split_qkv,
                  lambda *xs: jnp.concatenate([x.reshape(x.shape[0], -1).T for x in xs])),
          _Tensor(pre + "conv1d.weight",
                  tuple(att + (n,) for n in ("conv_q", "conv_k", "conv_v")), split_conv,
                  lambda *xs: jnp.concatenate([x.reshape(x.shape[0], -1).T
                                               for x in xs])[:, None, :]),
          _linear(pre + "in_proj_z.weight", att + ("w_og",), heads=hv),
          _linear(pre + "in_proj_b.weight", att + ("w_b",)),
          _linear(pre + "in_proj_a.weight", att + ("w_g",)),
          _same(pre + "dt_bias", att + ("b_g",)),
          _same(pre + "A_log", att + ("a_log",)),
          _same(pre + "norm.weight", att + ("o_norm",)),
          _out_linear(pre + "out_proj.weight", att + ("w_o",), heads=hv)]
    else:
      pre += "self_attn."

      def split_q(w):               # per head: [query_h | gate_h]
        r = w.reshape(h, 2, -1, w.shape[-1])
        return r[:, 0].transpose(2, 0, 1), r[:, 1].transpose(2, 0, 1)

      out += [
          _Tensor(pre + "q_proj.weight", (att + ("w_q",), att + ("w_gate",)), split_q,
                  lambda q, g: jnp.stack([q.transpose(1, 2, 0), g.transpose(1, 2, 0)],
                                         axis=1).reshape(-1, q.shape[0])),
          _linear(pre + "k_proj.weight", att + ("w_k",), heads=cfg.kv_heads),
          _linear(pre + "v_proj.weight", att + ("w_v",), heads=cfg.kv_heads),
          _out_linear(pre + "o_proj.weight", att + ("w_o",), heads=h),
          _same(pre + "q_norm.weight", att + ("q_norm",)),
          _same(pre + "k_norm.weight", att + ("k_norm",))]
  return out


# ----------------------------------------------------------------------------------------------
# Reading and writing

def _checkpoint_files(path: str) -> tuple[dict, dict[str, str]]:
  """``(config.json, {tensor name: file})`` of a model folder."""
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} is not a directory (a Hugging Face model folder)")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise ValueError(f"{path!r} has no config.json")
  with open(cfg_path, encoding="utf-8") as f:
    hf = json.load(f)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index!r} has no weight_map")
    files = {k: os.path.join(path, v) for k, v in weight_map.items()}
    for f in sorted(set(files.values())):
      if not os.path.isfile(f):
        raise ValueError(f"{index!r} names {os.path.basename(f)!r}, which is missing")
    return hf, files
  single = os.path.join(path, "model.safetensors")
  if not os.path.isfile(single):
    raise ValueError(f"{path!r} has neither model.safetensors nor model.safetensors.index.json")
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(single, framework="flax") as f:
    return hf, {k: single for k in f.keys()}


def from_hf(path: str, *, mesh=None, param_dtype: str = "float32",
            ignore_prefixes: Sequence[str] = (), **runtime):
  """A ``LinearLlama`` with the weights of the Qwen3.5 model folder ``path``.

  Args:
    mesh: place every parameter on it by the sharding rules (None: the ``jax.set_mesh`` mesh if
      any, else the default device); each tensor is read alone and put straight on its devices.
    param_dtype: the weights' dtype here (``"float32"`` or ``"bfloat16"``).
    ignore_prefixes: tensor-name prefixes to skip on purpose, e.g. ``NON_TEXT_PREFIXES`` for the
      vision tower and MTP head of the released checkpoints; any other tensor this model has no
      place for is an error.
    runtime: ``runtime.*`` fields of the config (``chunk_size``, ``layout``, ...).

  Raises:
    ValueError: a missing file or tensor, an unexpected tensor, a shape that does not match the
      config, or an unsupported option, each named.
  """
  from lasp_jax.models import llama  # pylint: disable=import-outside-toplevel
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  hf, files = _checkpoint_files(path)
  cfg = config_from_hf(hf, param_dtype=param_dtype, **runtime)
  prefix = WRAPPED_PREFIX if any(k.startswith(WRAPPED_PREFIX) for k in files) else "model."
  table = _tensor_map(cfg, prefix)
  known = {t.name for t in table}
  extra = sorted(k for k in files if k not in known
                 and not any(k.startswith(p) for p in ignore_prefixes))
  if extra:
    hint = (f" (the released checkpoints' vision tower and MTP head: pass ignore_prefixes="
            f"{NON_TEXT_PREFIXES}, --text-only on the command line)"
            if any(extra[0].startswith(p) for p in NON_TEXT_PREFIXES) else "")
    raise ValueError(f"{path!r}: tensor {extra[0]!r} has no place in the model "
                     f"({len(extra)} such){hint}")
  missing = [t.name for t in table if t.name not in files]
  if missing:
    raise ValueError(f"{path!r}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
  abstract = nnx.eval_shape(lambda: llama.LinearLlama(cfg, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(abstract)
  variables = dict(nnx.to_flat_state(state))
  if mesh is None:
    ctx_mesh = jax.sharding.get_abstract_mesh()
    if ctx_mesh is not None and ctx_mesh.axis_names:
      mesh = llama._concrete_mesh(ctx_mesh)  # pylint: disable=protected-access
  shardings = (dict(nnx.to_flat_state(llama.param_shardings(abstract, mesh)))
               if mesh is not None else {})
  covered = {p for t in table for p in t.paths}
  assert covered == set(variables), sorted(set(variables) ^ covered)  # the table is complete
  dtype = jnp.dtype(param_dtype)
  handles = {}
  try:
    for t in table:
      fname = files[t.name]
      if fname not in handles:
        handles[fname] = safe_open(fname, framework="flax")
      src = handles[fname].get_tensor(t.name)
      want = jax.eval_shape(t.join, *(variables[p] for p in t.paths)).shape
      if tuple(src.shape) != tuple(want):
        raise ValueError(f"{path!r}: tensor {t.name!r} has shape {tuple(src.shape)}, the "
                         f"config needs {tuple(want)}")
      for p, val in zip(t.paths, t.split(src.astype(jnp.float32))):
        val = val.astype(dtype)
        val = jax.device_put(val, shardings[p]) if p in shardings else val
        variables[p].set_value(val)
  finally:
    handles.clear()
  return nnx.merge(graphdef, state)


def to_hf(model, path: str, *, dtype: str | None = None) -> None:
  """Writes ``model`` as a ``Qwen3_5ForCausalLM`` folder (``config.json``, ``model.safetensors``)
  at ``path``, which must not exist yet; ``dtype``: of the stored tensors (None: the params').
  Written to a temporary folder and renamed, so a failure leaves nothing behind."""
  from safetensors.flax import save_file  # pylint: disable=import-outside-toplevel
  cfg = model.config
  config = hf_config(cfg)
  if os.path.exists(path):
    raise ValueError(f"{path!r} exists; to_hf writes a new folder")
  out_dtype = jnp.dtype(dtype or cfg.param_dtype)
  config["dtype"] = str(out_dtype)
  variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  tensors = {}
  for t in _tensor_map(cfg):
    parts = [jnp.asarray(jax.device_get(variables[p][...]), jnp.float32) for p in t.paths]
    tensors[t.name] = jnp.asarray(t.join(*parts), out_dtype)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".to_hf-", dir=parent)
  try:
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

