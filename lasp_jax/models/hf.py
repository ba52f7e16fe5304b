"""Hugging Face checkpoints in and out: Qwen3.5 dense text models (``Qwen3_5ForCausalLM``, and the
text model inside ``Qwen3_5ForConditionalGeneration``) and flash-linear-attention's (fla)
``GatedDeltaNetForCausalLM``.

``from_hf(path)`` reads a model folder (``config.json`` and one ``*.safetensors`` file, or shards
with ``model.safetensors.index.json``) tensor by tensor, each placed on the mesh by the sharding
rules as it is read (no whole host copy of the model); the layout comes from ``model_type``.
``to_hf(model, path, layout=...)`` writes either layout and a ``config.json`` that transformers
(Qwen3.5) or fla (``gated_deltanet``) loads. The mapping is one table per layout
(``_tensor_map``, ``_fla_tensor_map``): each Hugging Face tensor, the parameters it holds here and
the two reshapes between them.

What Qwen3.5 is in ``ModelConfig`` terms: Gated DeltaNet linear layers (``linear.variant``
``gated_deltanet``, the kernel-4 short conv, ``linear.num_value_heads`` value heads sharing
``num_heads`` q/k heads, separate ``linear.key_dim``/``value_dim``), softmax layers with their own
heads and head size, q/k norm, partial rotary and the sigmoid output gate, zero-centred norms and
``layer_types`` from the file. Anything else in a checkpoint (MoE experts, the vision tower, the
multi-token-prediction head, attention biases, another RoPE type) is an error naming it; the vision
and MTP tensors of the released checkpoints may be skipped explicitly (``ignore_prefixes``).

What fla's Gated DeltaNet is: the same linear layers (separate q/k/v short convs, or none with
``use_short_conv: false``; ``num_v_heads``, ``head_dim`` and ``expand_v``; ``allow_neg_eigval``),
plain (not zero-centred) norms with ``norm_eps``, the ``GatedMLP`` (``intermediate_size``, or fla's
rounding of ``hidden_ratio``), and for the layers its ``attn`` entry names, fla's softmax
``Attention``: GQA, head size ``hidden_size / num_heads``, full rotary with ``rope_theta``, no q/k
norm, no output gate. ``use_gate: false``, a sigmoid output gate, attention biases or windows, a
``powlu`` MLP and attention residuals are errors naming the key.
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
FLA_MODEL_TYPE = "gated_deltanet"
# ``to_hf``'s layouts: Qwen3_5ForCausalLM, fla's GatedDeltaNetForCausalLM.
LAYOUTS = ("qwen3_5", "fla")
# fla's GatedDeltaNetConfig defaults (fla 0.6), for what a config.json leaves out.
_FLA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 21,
                 "num_heads": 6, "head_dim": 256, "num_v_heads": None, "expand_v": 2.0,
                 "use_gate": True, "use_short_conv": True, "conv_size": 4,
                 "allow_neg_eigval": False, "hidden_ratio": 4, "intermediate_size": None,
                 "hidden_act": "swish", "norm_eps": 1e-6, "attn": None,
                 "tie_word_embeddings": False, "output_gate_activation": "swish",
                 "attnres_block_size": None}


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

def _need(d: Mapping[str, Any], key: str, where: str):
  if key not in d or d[key] is None:
    raise ValueError(f"{where}: config.json has no {key!r}")
  return d[key]


def config_from_hf(hf: Mapping[str, Any], *, param_dtype: str = "float32", **runtime
                   ) -> ModelConfig:
  """Our config of a Qwen3.5 (either model type) or fla Gated DeltaNet ``config.json``;
  ``runtime``: any ``runtime.*`` field (``chunk_size``, ``layout``...). ValueError naming an
  unsupported key."""
  mt = hf.get("model_type")
  if mt == FLA_MODEL_TYPE:
    return _fla_config(hf, param_dtype=param_dtype, **runtime)
  if mt == WRAPPED_MODEL_TYPE:
    text = dict(_need(hf, "text_config", "qwen3_5"))
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
  elif mt == TEXT_MODEL_TYPE:
    text = dict(hf)
  else:
    raise ValueError(f"config.json model_type {mt!r} is not supported; supported: "
                     f"{TEXT_MODEL_TYPE!r} (Qwen3_5ForCausalLM), {WRAPPED_MODEL_TYPE!r} "
                     f"(the text model of Qwen3_5ForConditionalGeneration), "
                     f"{FLA_MODEL_TYPE!r} (fla's GatedDeltaNetForCausalLM)")
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


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")


def _check_options(cfg: ModelConfig, want: Mapping[str, Any], what: str) -> None:
  flat = cfg.flat_dict()
  for key, val in want.items():
    if key in flat and flat[key] != val:
      raise ValueError(f"model.{key}={flat[key]!r}: {what} needs {val!r}")


def check_exportable(cfg: ModelConfig, layout: str = "qwen3_5") -> None:
  """ValueError naming the first option a checkpoint of ``layout`` (``LAYOUTS``) cannot
  express."""
  _check_layout(layout)
  if layout == "fla":
    return _check_fla_exportable(cfg)
  _check_options(cfg, {"linear.variant": "gated_deltanet", "norm.zero_centered": True,
                       "softmax.qk_norm": True, "softmax.output_gate": True,
                       "linear.allow_neg_eigval": False, "linear.memories": 0},
                 "a Qwen3.5 checkpoint")
  if cfg.linear.short_conv <= 0:
    raise ValueError("model.linear.short_conv=0: a Qwen3.5 checkpoint needs the short conv")


def hf_config(cfg: ModelConfig, layout: str = "qwen3_5") -> dict[str, Any]:
  """The ``config.json`` of ``cfg`` as a ``Qwen3_5ForCausalLM`` or (``layout="fla"``) fla's
  ``GatedDeltaNetForCausalLM``."""
  check_exportable(cfg, layout)
  if layout == "fla":
    return _fla_hf_config(cfg)
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
# fla's GatedDeltaNetForCausalLM config.json <-> ModelConfig

def _fla_attention(c: Mapping[str, Any], n: int, where: str) -> tuple[list[str], dict]:
  """Layer kinds and our ``softmax`` group from fla's ``attn`` (None, one spec or a list)."""
  attn = c.get("attn")
  specs = [] if attn is None else [attn] if isinstance(attn, Mapping) else list(attn)
  kinds = ["linear"] * n
  for spec in specs:
    for key, ok in (("qkv_bias", False), ("window_size", None)):
      if spec.get(key, ok) != ok:
        raise ValueError(f"{where}: attn.{key}={spec[key]!r} is not supported (only {ok!r})")
    for i in spec["layers"]:
      if not 0 <= int(i) < n:
        raise ValueError(f"{where}: attn.layers has {i!r}, not a layer of {n}")
      kinds[int(i)] = "softmax"
  if not specs:
    return kinds, {"qk_norm": False, "output_gate": False}
  # One softmax group here: every spec must give the same heads and rope_theta.
  shapes = {(int(s["num_heads"]), int(s.get("num_kv_heads") or s["num_heads"]),
             float(s.get("rope_theta", 10000.0))) for s in specs}
  if len(shapes) > 1:
    raise ValueError(f"{where}: attn specs with different (num_heads, num_kv_heads, rope_theta) "
                     f"{sorted(shapes)} are not supported (one softmax config)")
  heads, kv_heads, theta = shapes.pop()
  d = int(c["hidden_size"])
  if d % heads:
    raise ValueError(f"{where}: attn.num_heads={heads} does not divide hidden_size={d}")
  return kinds, {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": d // heads,
                 "rope_base": theta, "rotary_fraction": 1.0, "qk_norm": False,
                 "output_gate": False}


def _fla_ffn_dim(c: Mapping[str, Any]) -> int:
  """fla's GatedMLP width: ``intermediate_size``, else 2/3 of ``hidden_ratio`` (4) times the
  hidden size rounded up to a multiple of 256."""
  if c.get("intermediate_size"):
    return int(c["intermediate_size"])
  width = int(int(c["hidden_size"]) * (c.get("hidden_ratio") or 4) * 2 / 3)
  return 256 * ((width + 255) // 256)


def _fla_config(hf: Mapping[str, Any], *, param_dtype: str, **runtime) -> ModelConfig:
  """Our config of an fla ``gated_deltanet`` config.json (missing keys: fla's defaults)."""
  c = {**_FLA_DEFAULTS, **hf}
  where = f"model_type {FLA_MODEL_TYPE!r}"
  for key, ok in (("hidden_act", ("swish",)), ("use_gate", (True,)),
                  ("output_gate_activation", ("swish", "silu")), ("attnres_block_size", (None,))):
    if c[key] not in ok:
      raise ValueError(f"{where}: {key}={c[key]!r} is not supported (only "
                       f"{' or '.join(map(repr, ok))})")
  dk = int(c["head_dim"])
  dv = dk * float(c["expand_v"])
  if dv != int(dv):
    raise ValueError(f"{where}: head_dim * expand_v = {dv} is not an integer")
  n = int(c["num_hidden_layers"])
  kinds, softmax = _fla_attention(c, n, where)
  return ModelConfig.from_dict({
      "vocab_size": int(c["vocab_size"]), "d_model": int(c["hidden_size"]), "num_layers": n,
      "num_heads": int(c["num_heads"]), "head_dim": dk, "ffn_dim": _fla_ffn_dim(c),
      "layer_types": kinds, "tie_embeddings": bool(c["tie_word_embeddings"]),
      "param_dtype": param_dtype,
      "norm": {"eps": float(c["norm_eps"]), "zero_centered": False},
      "linear": {"variant": "gated_deltanet",
                 "short_conv": int(c["conv_size"]) if c["use_short_conv"] else 0,
                 "num_value_heads": int(c["num_v_heads"] or c["num_heads"]),
                 "key_dim": dk, "value_dim": int(dv),
                 "allow_neg_eigval": bool(c["allow_neg_eigval"])},
      "softmax": softmax,
      "runtime": dict(runtime),
  })


def _check_fla_exportable(cfg: ModelConfig) -> None:
  _check_options(cfg, {"linear.variant": "gated_deltanet", "norm.zero_centered": False,
                       "linear.memories": 0}, "an fla Gated DeltaNet checkpoint")
  dk, dv = cfg.linear_key_dim, cfg.linear_value_dim
  if int(dk * (dv / dk)) != dv:
    raise ValueError(f"linear value_dim {dv} is not key_dim {dk} times a float expand_v")
  if "softmax" in cfg.layer_kinds:
    _check_options(cfg, {"softmax.qk_norm": False, "softmax.output_gate": False,
                         "softmax.rotary_fraction": 1.0},
                   "fla's softmax Attention layer")
    if cfg.softmax_head_dim * cfg.softmax_heads != cfg.d_model:
      raise ValueError(f"softmax heads {cfg.softmax_heads} x head_dim {cfg.softmax_head_dim}: "
                       f"fla's Attention layer needs them to make d_model={cfg.d_model}")


def _fla_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  softmax = [i for i, k in enumerate(cfg.layer_kinds) if k == "softmax"]
  attn = {"layers": softmax, "num_heads": cfg.softmax_heads, "num_kv_heads": cfg.kv_heads,
          "qkv_bias": False, "window_size": None,
          "rope_theta": cfg.softmax.rope_base} if softmax else None
  dk, dv = cfg.linear_key_dim, cfg.linear_value_dim
  return {
      "architectures": ["GatedDeltaNetForCausalLM"], "model_type": FLA_MODEL_TYPE,
      "attn_mode": "chunk", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_heads": cfg.num_heads, "head_dim": dk,
      "num_v_heads": cfg.linear_value_heads, "expand_v": dv / dk, "use_gate": True,
      "output_gate_activation": "swish", "use_short_conv": cfg.linear.short_conv > 0,
      "conv_size": cfg.linear.short_conv or 4, "allow_neg_eigval": cfg.linear.allow_neg_eigval,
      "intermediate_size": cfg.ffn_dim, "hidden_ratio": 4, "hidden_act": "swish",
      "norm_eps": cfg.norm.eps, "attn": attn, "attnres_block_size": None,
      "tie_word_embeddings": cfg.tie_embeddings, "fuse_norm": True, "fuse_swiglu": True,
      "fuse_cross_entropy": True, "dtype": cfg.param_dtype,
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


def _model_tensors(cfg: ModelConfig, embed: str, final_norm: str) -> list[_Tensor]:
  """The embedding, the final norm and (untied) the output head: every layout's, by its names."""
  out = [_same(embed, ("embed",)), _same(final_norm, ("final_norm", "weight"))]
  if not cfg.tie_embeddings:
    out.append(_linear("lm_head.weight", ("lm_head",)))
  return out


def _block_tensors(pre: str, me: tuple, attn_norm: str, mlp_norm: str) -> list[_Tensor]:
  """A layer's two norms (by the layout's names) and its SwiGLU MLP (the same in every layout)."""
  return [_same(pre + attn_norm, me + ("attn_norm", "weight")),
          _same(pre + mlp_norm, me + ("mlp_norm", "weight")),
          *(_linear(pre + f"mlp.{w}_proj.weight", me + ("mlp", f"w_{w}"))
            for w in ("gate", "up", "down"))]


def _tensor_map(cfg: ModelConfig, prefix: str = "model.") -> list[_Tensor]:
  """Every tensor of a Qwen3.5 checkpoint of ``cfg`` (text weights under ``prefix``)."""
  out = _model_tensors(cfg, f"{prefix}embed_tokens.weight", f"{prefix}norm.weight")
  hk, hv = cfg.num_heads, cfg.linear_value_heads
  kd, h = hk * cfg.linear_key_dim, cfg.softmax_heads
  for i, kind in enumerate(cfg.layer_kinds):
    pre, me = f"{prefix}layers.{i}.", ("layers", i)
    out += _block_tensors(pre, me, "input_layernorm.weight", "post_attention_layernorm.weight")
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


def _conv(name, path, heads):
  """A torch depthwise ``Conv1d`` weight ``(C, 1, K)`` <-> ours ``(K, H, Dh)`` (same channels)."""
  return _Tensor(name, (path,), lambda w: (w[:, 0, :].T.reshape(w.shape[2], heads, -1),),
                 lambda x: x.reshape(x.shape[0], -1).T[:, None, :])


def _fla_tensor_map(cfg: ModelConfig) -> list[_Tensor]:
  """Every tensor of an fla ``GatedDeltaNetForCausalLM`` checkpoint of ``cfg``."""
  out = _model_tensors(cfg, "model.embeddings.weight", "model.norm.weight")
  hk, hv = cfg.num_heads, cfg.linear_value_heads
  for i, kind in enumerate(cfg.layer_kinds):
    pre, me = f"model.layers.{i}.", ("layers", i)
    out += _block_tensors(pre, me, "attn_norm.weight", "mlp_norm.weight")
    pre, att = pre + "attn.", me + ("attn",)
    if kind == "softmax":
      out += [_linear(pre + "q_proj.weight", att + ("w_q",), heads=cfg.softmax_heads),
              _linear(pre + "k_proj.weight", att + ("w_k",), heads=cfg.kv_heads),
              _linear(pre + "v_proj.weight", att + ("w_v",), heads=cfg.kv_heads),
              _out_linear(pre + "o_proj.weight", att + ("w_o",), heads=cfg.softmax_heads)]
      continue
    out += [_linear(pre + "q_proj.weight", att + ("w_q",), heads=hk),
            _linear(pre + "k_proj.weight", att + ("w_k",), heads=hk),
            _linear(pre + "v_proj.weight", att + ("w_v",), heads=hv),
            _linear(pre + "g_proj.weight", att + ("w_og",), heads=hv),
            _linear(pre + "a_proj.weight", att + ("w_g",)),
            _linear(pre + "b_proj.weight", att + ("w_b",)),
            _same(pre + "A_log", att + ("a_log",)),
            _same(pre + "dt_bias", att + ("b_g",)),
            _same(pre + "o_norm.weight", att + ("o_norm",)),
            _out_linear(pre + "o_proj.weight", att + ("w_o",), heads=hv)]
    if cfg.linear.short_conv:
      out += [_conv(pre + f"{n}_conv1d.weight", att + (f"conv_{n}",), heads=h)
              for n, h in (("q", hk), ("k", hk), ("v", hv))]
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
  """A ``LinearLlama`` with the weights of the Qwen3.5 or fla Gated DeltaNet model folder
  ``path`` (which one: its ``model_type``).

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
  if hf.get("model_type") == FLA_MODEL_TYPE:
    table = _fla_tensor_map(cfg)
  else:
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


def to_hf(model, path: str, *, dtype: str | None = None, layout: str = "qwen3_5") -> None:
  """Writes ``model`` as a ``Qwen3_5ForCausalLM`` folder (``layout="fla"``: fla's
  ``GatedDeltaNetForCausalLM``; ``config.json``, ``model.safetensors``) at ``path``, which must not
  exist yet; ``dtype``: of the stored tensors (None: the params'). Written to a temporary folder
  and renamed, so a failure leaves nothing behind."""
  from safetensors.flax import save_file  # pylint: disable=import-outside-toplevel
  cfg = model.config
  config = hf_config(cfg, layout)
  if os.path.exists(path):
    raise ValueError(f"{path!r} exists; to_hf writes a new folder")
  out_dtype = jnp.dtype(dtype or cfg.param_dtype)
  config["dtype"] = str(out_dtype)
  variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  tensors = {}
  for t in (_fla_tensor_map(cfg) if layout == "fla" else _tensor_map(cfg)):
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

