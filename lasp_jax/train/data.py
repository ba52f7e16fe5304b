"""Training data: synthetic MQAR or parity, a UTF-8 text file as bytes, or a flat binary of token
ids.

Every example is a pure function of ``(seed, example index)`` (Grain ``MapDataset``s: a seeded
global shuffle of windows, or a seeded ``random_map`` for the synthetic sources), and the examples
of step ``s`` are ``[s * A * B, (s + 1) * A * B)`` (``A`` micro-batches of ``B`` sequences). So the
data position is the step: resuming at step ``s`` replays exactly what an uninterrupted run would
have seen.

A batch is three arrays of shape ``(A, B, N)``: ``inputs`` (int32 tokens), ``targets`` (the next
tokens; for parity the running XOR) and ``mask`` (float32, 1 where the loss counts: every token for
text, the query answers for MQAR, every position from ``data.parity.skip`` on for parity). They are
global ``jax.Array``s sharded ``P(None, batch_axes, "sp")``, in the model's layout (zigzag order
along N when the model's layout is zigzag), and each process reads only the rows its own devices
hold.

Packed documents (text / tokens with an EOS id, ``data.eos_id`` or the token file's sidecar): the
batch has a fourth array ``segment_ids`` (int32, same shape, layout and sharding), the documents of
each window numbered from 0, and ``mask`` is 0 where the input is an EOS, whose target is the next
document's first token. Windows stay fixed slices of the stream, so resuming stays exact.
"""

from __future__ import annotations

import json
import os
import warnings

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lasp_jax.sequence_parallel.layout import segment_order
from lasp_jax.train.config import (SYNTHETIC_SOURCES, DataConfig, candidate_paths,
                                   resolve_path)
from lasp_jax.train.mesh import SEQ_AXIS, batch_axes

Example = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------
# Sources: each is a grain.MapDataset of examples {inputs, targets, mask[, segment_ids]}, each (N,).

def mqar_vocab(vocab_size: int, num_kv_pairs: int, vocab_key: str = "the model's vocab_size"
               ) -> tuple[int, int]:
  """``(first value token, number of keys)``: keys ``1 .. nk``, values ``nk+1 .. V-1``, 0 unused.

  ``vocab_key`` names where ``vocab_size`` came from, for the error.
  """
  nk = (vocab_size - 1) // 2
  if nk < num_kv_pairs or vocab_size - 1 - nk < 2:
    raise ValueError(f"MQAR with data.mqar.num_kv_pairs={num_kv_pairs} needs a vocabulary of at "
                     f"least {2 * num_kv_pairs + 1} tokens; {vocab_key} is {vocab_size}")
  return 1 + nk, nk


def mqar_example(rng: np.random.Generator, seq_len: int, vocab_size: int,
                 num_kv_pairs: int) -> Example:
  """One multi-query associative recall sequence.

  ``k_1 v_1 .. k_n v_n`` (distinct keys, random values), then query pairs ``k v`` to the end, the
  keys drawn again from the n context keys. The loss counts only the answers: the targets at the
  query keys, whose right value is given only in the context (or an earlier query).
  """
  n = num_kv_pairs
  first_value, nk = mqar_vocab(vocab_size, n)
  total = seq_len + 1
  if total < 2 * n + 2:
    raise ValueError(f"data.seq_len={seq_len} is too short for data.mqar.num_kv_pairs={n}: it "
                     f"needs at least {2 * n + 1}")
  keys = rng.choice(nk, size=n, replace=False) + 1
  values = rng.integers(first_value, vocab_size, size=n)
  num_queries = (total - 2 * n + 1) // 2
  which = rng.integers(0, n, size=num_queries)
  queries = np.stack([keys[which], values[which]], axis=1).reshape(-1)
  x = np.concatenate([np.stack([keys, values], axis=1).reshape(-1), queries])[:total]
  mask = np.zeros(seq_len, np.float32)
  mask[2 * n::2] = 1.0                       # targets at query keys are the answers
  return {"inputs": x[:-1].astype(np.int32), "targets": x[1:].astype(np.int32), "mask": mask}


def mqar_dataset(cfg: DataConfig, vocab_size: int, seed: int) -> grain.MapDataset:
  n, L = cfg.mqar.num_kv_pairs, cfg.seq_len
  if cfg.mqar.vocab_size is not None:
    if cfg.mqar.vocab_size > vocab_size:
      raise ValueError(f"data.mqar.vocab_size={cfg.mqar.vocab_size} exceeds the model's vocab_size "
                       f"{vocab_size}")
    vocab_size = cfg.mqar.vocab_size
    mqar_vocab(vocab_size, n, vocab_key="data.mqar.vocab_size")
  mqar_example(np.random.default_rng(0), L, vocab_size, n)   # validate now, not in the loop
  return grain.MapDataset.range(2**62).random_map(
      lambda i, rng: mqar_example(rng, L, vocab_size, n), seed=seed)


def parity_example(rng: np.random.Generator, seq_len: int, first_token: int = 0,
                   skip: int = 0) -> Example:
  """One running-parity sequence, the state-tracking task of Grazzi et al. (2024).

  ``inputs`` are ``seq_len`` fair random bits ``b_1 .. b_N`` (token ``first_token + b``); the
  target at position ``t`` is their running parity ``p_t = b_1 xor .. xor b_t`` (token
  ``first_token + p_t``), which depends on every bit so far: a linear RNN tracks it only with a
  transition that can flip the sign of its state (eigenvalue -1: the delta rule with ``beta`` in
  ``[0, 2]``, design §11). ``mask`` is 1 from position ``skip`` on (0 before). Chance: 1/2.
  """
  bits = rng.integers(0, 2, size=seq_len)
  parity = np.cumsum(bits) % 2
  mask = np.ones(seq_len, np.float32)
  mask[:skip] = 0.0
  return {"inputs": (first_token + bits).astype(np.int32),
          "targets": (first_token + parity).astype(np.int32), "mask": mask}


def parity_dataset(cfg: DataConfig, vocab_size: int, seed: int) -> grain.MapDataset:
  first, skip, L = cfg.parity.first_token, cfg.parity.skip, cfg.seq_len
  if first + 2 > vocab_size:
    raise ValueError(f"parity with data.parity.first_token={first} uses tokens {first} and "
                     f"{first + 1}: it needs the model's vocab_size > {first + 1}, "
                     f"got {vocab_size}")
  if not 0 <= skip < L:
    raise ValueError(f"data.parity.skip={skip} leaves no position of data.seq_len={L} in the loss")
  return grain.MapDataset.range(2**62).random_map(
      lambda i, rng: parity_example(rng, L, first, skip), seed=seed)


def sidecar_path(path: str) -> str:
  """``corpus.bin`` -> ``corpus.bin.json``: the token file's dtype, vocab_size, eos_id, count."""
  return path + ".json"


def read_sidecar(path: str) -> dict | None:
  """The sidecar of token file ``path`` (``train.py prepare`` writes it), or None if it has none."""
  side = sidecar_path(path)
  if not os.path.exists(side):
    return None
  with open(side, encoding="utf-8") as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{side}: not valid JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("dtype") not in ("uint16", "uint32"):
    raise ValueError(f"{side}: needs \"dtype\": \"uint16\" or \"uint32\", got {meta!r}")
  return meta


def token_dtype(cfg: DataConfig, path: str, vocab_size: int | None = None) -> str:
  """The id type of token file ``path``: from its sidecar, else ``data.token_dtype``.

  Errors name the file: no sidecar and no ``data.token_dtype`` (there is no safe default), a
  sidecar that disagrees with ``data.token_dtype``, with the file's size, or with the model's
  ``vocab_size`` (a model vocabulary larger than the data's, e.g. padded, is fine).
  """
  meta = read_sidecar(path)
  if meta is None:
    if cfg.token_dtype is None:
      raise ValueError(f"data.path={cfg.path!r}: the token file has no sidecar "
                       f"{sidecar_path(path)!r}, so its id type is unknown: set "
                       f"data.token_dtype=uint16 or uint32, or write the sidecar (python train.py "
                       f"prepare writes both the .bin and its sidecar)")
    return cfg.token_dtype
  side = sidecar_path(path)
  dtype = meta["dtype"]
  if cfg.token_dtype is not None and cfg.token_dtype != dtype:
    raise ValueError(f"data.token_dtype={cfg.token_dtype} but {side} says dtype {dtype}")
  count = meta.get("count")
  if count is not None and count * np.dtype(dtype).itemsize != os.path.getsize(path):
    raise ValueError(f"{side} says {count} {dtype} tokens but {path} holds "
                     f"{os.path.getsize(path)} bytes")
  data_vocab = meta.get("vocab_size")
  if vocab_size is not None and data_vocab is not None and data_vocab > vocab_size:
    raise ValueError(f"{side} says vocab_size {data_vocab}, more than the model's vocab_size "
                     f"{vocab_size}: set model.vocab_size >= {data_vocab}")
  return dtype


def data_vocab_size(cfg: DataConfig) -> tuple[int | None, str]:
  """``(vocab_size, where it comes from)`` of the data: the token file's sidecar, 256 for text
  (bytes), what MQAR (``data.mqar.vocab_size``, else ``2 * num_kv_pairs + 2``) or parity
  (``first_token + 2``) needs; None when unknown (a token file without a sidecar vocab_size)."""
  if cfg.source == "text":
    return 256, "the text source (bytes)"
  if cfg.source == "mqar":
    if cfg.mqar.vocab_size is not None:
      return cfg.mqar.vocab_size, f"data.mqar.vocab_size={cfg.mqar.vocab_size}"
    return 2 * cfg.mqar.num_kv_pairs + 2, (f"MQAR with data.mqar.num_kv_pairs="
                                           f"{cfg.mqar.num_kv_pairs}")
  if cfg.source == "parity":
    first = cfg.parity.first_token
    return first + 2, f"parity with data.parity.first_token={first}"
  if cfg.path is None:
    return None, "data.path"
  path = resolve_path(cfg.path)
  if not os.path.isfile(path):
    return None, path
  meta = read_sidecar(path) or {}
  v = meta.get("vocab_size")
  return (int(v) if isinstance(v, int) else None), f"{sidecar_path(path)}"


def _warn_if_wider(tokens: np.ndarray, path: str) -> None:
  """uint32 ids below 2**16 read as uint16 have a zero at every odd position (little endian)."""
  head = np.asarray(tokens[:1 << 16])
  if len(head) >= 64 and not head[1::2].any() and head[0::2].any():
    warnings.warn(f"{path}: read as uint16, every other token id is 0: it looks like a uint32 "
                  f"file; set data.token_dtype=uint32 (or fix its sidecar) if it is")


def load_tokens(cfg: DataConfig, vocab_size: int | None = None) -> np.ndarray:
  """The whole token stream, memory-mapped: bytes of a text file, or a flat uint16/uint32 file
  (dtype from ``token_dtype``)."""
  path = resolve_path(cfg.path)
  if not os.path.isfile(path):
    looked = " and ".join(repr(p) for p in dict.fromkeys(candidate_paths(cfg.path)))
    raise ValueError(f"data.path={cfg.path!r} is not a file (looked at {looked})")
  if os.path.getsize(path) == 0:     # numpy's "cannot mmap an empty file" names no file
    raise ValueError(f"data.path={cfg.path!r} is an empty file ({path!r})")
  if cfg.source == "text":
    return np.memmap(path, dtype=np.uint8, mode="r")
  dtype = token_dtype(cfg, path, vocab_size)
  itemsize = np.dtype(dtype).itemsize
  size = os.path.getsize(path)
  if size % itemsize:
    raise ValueError(f"data.path={cfg.path!r}: {size} bytes is not a whole number of "
                     f"{dtype} tokens")
  tokens = np.memmap(path, dtype=dtype, mode="r")
  if dtype == "uint16":
    _warn_if_wider(tokens, path)
  return tokens


def eos_id(cfg: DataConfig, vocab_size: int | None = None) -> int | None:
  """The id that ends documents: ``data.eos_id``, else (tokens) the sidecar's ``eos_id``; None when
  the stream is one document.

  It must lie below the data's vocabulary (256 bytes for text; the sidecar's ``vocab_size`` for
  tokens) and the model's ``vocab_size``; errors name where the id came from and its value.
  """
  if cfg.source in SYNTHETIC_SOURCES:
    if cfg.eos_id is not None:
      raise ValueError(f"data.eos_id={cfg.eos_id}: the {cfg.source} source has no documents; "
                       f"eos_id is for data.source=text or tokens")
    return None
  eos, where = cfg.eos_id, f"data.eos_id={cfg.eos_id}"
  data_vocab, data_name = 256, "the text source's byte vocabulary"
  if cfg.source == "tokens":
    path = resolve_path(cfg.path)
    meta = read_sidecar(path) or {}
    data_vocab, data_name = meta.get("vocab_size"), f"the vocab_size of {sidecar_path(path)}"
    if eos is None:
      eos, where = meta.get("eos_id"), f"{sidecar_path(path)}: eos_id {meta.get('eos_id')!r}"
  if eos is None:
    return None
  if isinstance(eos, bool) or not isinstance(eos, int) or eos < 0:
    raise ValueError(f"{where}: an EOS id must be a non-negative integer")
  for limit, name in ((data_vocab, data_name), (vocab_size, "the model's vocab_size")):
    if limit is not None and eos >= limit:
      raise ValueError(f"{where} is not below {name} {limit}")
  return eos


def documents(inputs: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
  """``(segment_ids, mask)`` of a window's ``inputs`` (N,), whose documents end with ``eos``.

  segment_ids (N,) int32: 0 at the window's first token (mid-document or not), +1 after each EOS,
  which belongs to the document it ends. mask (N,) float32: 0 where the input is an EOS, since its
  target opens the next document and cannot be predicted from this one.
  """
  is_eos = inputs == eos
  segment_ids = np.zeros(len(inputs), np.int32)
  np.cumsum(is_eos[:-1], out=segment_ids[1:])
  return segment_ids, (~is_eos).astype(np.float32)


def window_dataset(tokens: np.ndarray, cfg: DataConfig, split: str, seed: int,
                   eos: int | None = None) -> grain.MapDataset:
  """Non-overlapping windows of ``seq_len + 1`` tokens, shuffled anew each epoch (train split).

  With ``eos`` (see ``eos_id``) each example also has ``segment_ids`` and the masked targets of
  ``documents``.
  """
  L = cfg.seq_len
  num_windows = (len(tokens) - 1) // L
  num_eval = int(round(num_windows * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
  if cfg.eval_fraction > 0:
    num_eval = max(num_eval, 1)
  num_train = num_windows - num_eval
  if num_train < 1:
    raise ValueError(f"data.path={cfg.path!r} holds {len(tokens)} tokens: too few for one training "
                     f"window of data.seq_len={L} + 1 (with eval_fraction={cfg.eval_fraction})")
  if split == "eval" and num_eval == 0:
    raise ValueError("evaluation on text/tokens needs data.eval_fraction > 0")
  start, count = (0, num_train) if split == "train" else (num_train, num_eval)

  def window(w: int) -> Example:
    s = (start + int(w)) * L
    x = np.asarray(tokens[s:s + L + 1], dtype=np.int32)
    if eos is None:
      return {"inputs": x[:-1], "targets": x[1:], "mask": np.ones(L, np.float32)}
    segment_ids, mask = documents(x[:-1], eos)
    return {"inputs": x[:-1], "targets": x[1:], "mask": mask, "segment_ids": segment_ids}

  ds = grain.MapDataset.range(count)
  if split == "train":
    ds = ds.shuffle(seed=seed)
  return ds.repeat().map(window)


# ----------------------------------------------------------------------------------------------
# Batches on the mesh.

def zigzag_permutation(seq_len: int, num_shards: int) -> np.ndarray:
  """``perm`` with ``x[..., perm] == lasp_jax.zigzag(x, num_shards)`` along the sequence axis.

  Host-side numpy (the data pipeline must not compile a JAX program per chunk).
  """
  chunk = seq_len // (2 * num_shards)
  storage = np.argsort(segment_order("zigzag", num_shards))   # natural chunk held at each slot
  return (storage[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1)


class Batches:
  """Global, sharded batches ``(A, B, N)`` for a step, in the model's layout.

  ``split="train"`` gives step ``s``'s batch; ``split="eval"`` gives a fixed set of eval batches.
  ``eos_id`` is the resolved document separator (None: no ``segment_ids`` in the batches).
  """

  def __init__(self, cfg: DataConfig, *, vocab_size: int, mesh, layout: str, micro_batches: int = 1,
               split: str = "train"):
    self.cfg, self.mesh, self.layout, self.split = cfg, mesh, layout, split
    self.vocab_size = vocab_size
    self.A, self.B, self.N = micro_batches, cfg.batch_size, cfg.seq_len
    axes = batch_axes(mesh)
    num_batch_shards = int(np.prod([dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in axes]))
    self.W = dict(zip(mesh.axis_names, mesh.axis_sizes))[SEQ_AXIS]
    if self.B % num_batch_shards:
      raise ValueError(f"data.batch_size={self.B} is not divisible by the {num_batch_shards} batch "
                       f"shards of the mesh (axes {axes})")
    multiple = 2 * self.W if layout == "zigzag" else self.W
    if self.N % multiple:
      raise ValueError(f"data.seq_len={self.N} must be divisible by {multiple} ({layout} layout "
                       f"over sp={self.W} devices)")
    self.sharding = NamedSharding(mesh, P(None, axes if axes else None, SEQ_AXIS))
    self.shape = (self.A, self.B, self.N)
    # Rows (micro, row) this process must read: those its own devices hold.
    index_map = self.sharding.addressable_devices_indices_map(self.shape)
    rows = set()
    for idx in index_map.values():
      for a in range(self.A)[idx[0]]:
        for b in range(self.B)[idx[1]]:
          rows.add((a, b))
    self.local_rows = sorted(rows)
    self.perm = zigzag_permutation(self.N, self.W) if layout == "zigzag" else None
    # eval: a different seed so that synthetic eval sequences are never trained on.
    seed = cfg.seed if split == "train" else cfg.seed + 1_000_003
    if cfg.source in SYNTHETIC_SOURCES:
      self.eos_id = eos_id(cfg)
      make = mqar_dataset if cfg.source == "mqar" else parity_dataset
      self.dataset = make(cfg, vocab_size, seed)
    else:
      tokens = load_tokens(cfg, vocab_size)     # first: its errors (no file, no dtype) come first
      self.eos_id = eos_id(cfg, vocab_size)
      self.dataset = window_dataset(tokens, cfg, split, seed, self.eos_id)
    self.names = ("inputs", "targets", "mask") + (("segment_ids",) if self.eos_id is not None
                                                  else ())

  def examples_per_step(self) -> int:
    return self.A * self.B

  def _example(self, index: int) -> Example:
    ex = self.dataset[index]
    if self.perm is not None:
      ex = {k: v[self.perm] for k, v in ex.items()}
    return ex

  def host_batch(self, start: int) -> dict[str, dict[tuple[int, int], np.ndarray]]:
    """This process's rows of the batch from example ``start``: ``{name: {(micro, row): (N,)}}``."""
    base = start
    out = {k: {} for k in self.names}
    for a, b in self.local_rows:
      ex = self._example(base + a * self.B + b)
      for k in out:
        out[k][(a, b)] = ex[k]
    top = max(int(v.max()) for v in out["inputs"].values()) if out["inputs"] else 0
    top = max(top, max((int(v.max()) for v in out["targets"].values()), default=0))
    if top >= self.vocab_size:
      raise ValueError(f"token id {top} in {self.cfg.source} data (path {self.cfg.path!r}) is >= "
                       f"the model's vocab_size {self.vocab_size}")
    return out

  def get(self, start: int) -> dict[str, jax.Array]:
    """Examples ``start .. start + A * B`` as global sharded arrays ``{inputs, targets, mask}``
    (plus ``segment_ids`` with an EOS id), each (A, B, N); the loop passes
    ``start = step * A * B`` (the data position)."""
    host = self.host_batch(start)
    return {k: self._assemble(rows) for k, rows in host.items()}

  def _assemble(self, rows: dict) -> jax.Array:
    def cb(idx) -> np.ndarray:
      a_range, b_range = range(self.A)[idx[0]], range(self.B)[idx[1]]
      block = np.stack([np.stack([rows[(a, b)] for b in b_range]) for a in a_range])
      return block[:, :, idx[2]]
    return jax.make_array_from_callback(self.shape, self.sharding, cb)

  def __len__(self) -> int:
    return len(self.dataset)


def natural_order(x: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
  """Undo the layout permutation along the last axis (for inspection and tests)."""
  if perm is None:
    return x
  out = np.empty_like(x)
  out[..., perm] = x
  return out

