"""Tokenizers for text in and out: bytes (optionally with an EOS id after them) or a Hugging Face
``tokenizer.json`` (the ``tokenizers`` library).

A token file's sidecar (``train.py prepare``) names its tokenizer: ``"tokenizer": "byte"`` (ids are
bytes; ``vocab_size`` 257 and ``eos_id`` 256 when documents are split), or ``"tokenizer":
"huggingface"`` with ``"tokenizer_file"`` (a copy beside the token file, relative to it) and
``"tokenizer_sha256"``. A training run copies the tokenizer into its directory
(``RUN_DIR/tokenizer.json`` and ``RUN_DIR/data.json``), and ``train.py sample`` / ``eval`` read it
from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

BYTE_VOCAB = 256
RUN_DATA = "data.json"               # in a run directory: the tokenizer's kind, vocab and EOS
RUN_TOKENIZER = "tokenizer.json"     # in a run directory: the Hugging Face tokenizer's copy


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      h.update(block)
  return h.hexdigest()


class ByteTokenizer:
  """UTF-8 bytes; ``eos_id`` (256 when the vocabulary is 257) ends documents."""

  kind = "byte"

  def __init__(self, vocab_size: int = BYTE_VOCAB, eos_id: int | None = None):
    self.vocab_size, self.eos_id = vocab_size, eos_id

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8", "surrogateescape"))

  def encode_batch(self, texts) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """Bytes as UTF-8 (``errors="replace"``); an id >= 256 (the paragraph EOS) as a blank line."""
    out, run = [], bytearray()
    for t in ids:
      t = int(t)
      if t < BYTE_VOCAB:
        run.append(t)
      else:
        out.append(bytes(run).decode("utf-8", errors="replace") + "\n")
        run = bytearray()
    out.append(bytes(run).decode("utf-8", errors="replace"))
    return "".join(out)

  def num_bytes(self, ids) -> int:
    """Bytes the ids stand for: one per token (bits per byte counts an EOS as one byte)."""
    return len(ids)


class HFTokenizer:
  """A Hugging Face ``tokenizer.json``."""

  kind = "huggingface"

  def __init__(self, path: str, eos_id: int | None = None):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer file {path!r} does not exist")
    try:
      self.tok = Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (the library raises plain Exception)
      raise ValueError(f"{path!r} is not a Hugging Face tokenizer.json ({e})") from None
    self.path, self.sha256 = path, sha256_file(path)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = eos_id if eos_id is not None else guess_eos(self.tok)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts) -> list[list[int]]:
    return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(t) for t in ids], skip_special_tokens=False)

  def num_bytes(self, ids) -> int:
    """UTF-8 bytes of the decoded ids, special tokens (EOS) left out."""
    return len(self.tok.decode([int(t) for t in ids], skip_special_tokens=True).encode("utf-8"))


EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")


def guess_eos(tok) -> int | None:
  """The id of a tokenizer's end-of-text token, by its usual names; None if it has none."""
  for name in EOS_NAMES:
    i = tok.token_to_id(name)
    if i is not None:
      return int(i)
  return None


def from_sidecar(token_path: str, meta: dict):
  """The tokenizer that wrote token file ``token_path`` (sidecar ``meta``)."""
  kind = meta.get("tokenizer")
  if kind == "byte":
    return ByteTokenizer(meta.get("vocab_size") or BYTE_VOCAB, meta.get("eos_id"))
  if kind == "huggingface":
    f = meta.get("tokenizer_file")
    if not f:
      raise ValueError(f"{token_path}.json: tokenizer huggingface without a tokenizer_file")
    path = os.path.join(os.path.dirname(os.path.abspath(token_path)), f)
    return HFTokenizer(path, meta.get("eos_id"))
  raise ValueError(f"{token_path}.json: unknown tokenizer {kind!r}")


def data_tokenizer_meta(data_cfg, vocab_size: int) -> tuple[dict, str | None] | None:
  """``(run data.json contents, tokenizer file to copy or None)`` for a run's data, or None when
  the data has no text tokenizer (synthetic sources, a token file without a known tokenizer)."""
  from lasp_jax.train.config import resolve_path  # pylint: disable=import-outside-toplevel
  from lasp_jax.train.data import read_sidecar  # pylint: disable=import-outside-toplevel
  if data_cfg.source == "text":
    return {"tokenizer": "byte", "vocab_size": BYTE_VOCAB, "eos_id": data_cfg.eos_id}, None
  if data_cfg.source != "tokens":
    return None
  path = resolve_path(data_cfg.path)
  meta = read_sidecar(path) or {}
  eos = data_cfg.eos_id if data_cfg.eos_id is not None else meta.get("eos_id")
  if meta.get("tokenizer") == "byte":
    return ({"tokenizer": "byte", "vocab_size": meta.get("vocab_size", BYTE_VOCAB), "eos_id": eos},
            None)
  if meta.get("tokenizer") == "huggingface" and meta.get("tokenizer_file"):
    src = os.path.join(os.path.dirname(os.path.abspath(path)), meta["tokenizer_file"])
    if not os.path.isfile(src):
      raise ValueError(f"{path}.json names the tokenizer {meta['tokenizer_file']!r}, but {src!r} "
                       f"does not exist")
    want = meta.get("tokenizer_sha256")
    if want and sha256_file(src) != want:
      raise ValueError(f"{src!r} has changed since {path} was written (its sha256 differs from "
                       f"{path}.json's tokenizer_sha256 {want[:12]}...): prepare the data again")
    return ({"tokenizer": "huggingface", "vocab_size": meta.get("vocab_size"), "eos_id": eos,
             "tokenizer_file": RUN_TOKENIZER, "tokenizer_sha256": want}, src)
  return None


def save_run_tokenizer(run_dir: str, found) -> None:
  """Copies the data's tokenizer (``found``: ``data_tokenizer_meta``'s answer) into ``run_dir``
  (``data.json``, ``tokenizer.json``)."""
  if found is None:
    return
  meta, src = found
  if src is not None:
    dst = os.path.join(run_dir, RUN_TOKENIZER)
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
  dst = os.path.join(run_dir, RUN_DATA)
  with open(dst + ".tmp", "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  os.replace(dst + ".tmp", dst)


def load_run_tokenizer(run_dir: str, train_cfg=None):
  """The tokenizer a run trained with: ``RUN_DIR/data.json`` (and ``tokenizer.json``); for runs
  from before it existed, from the data config (text: bytes; tokens: the sidecar). None when the
  run has no text tokenizer."""
  path = os.path.join(run_dir, RUN_DATA)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("tokenizer") == "byte":
      return ByteTokenizer(meta.get("vocab_size") or BYTE_VOCAB, meta.get("eos_id"))
    return HFTokenizer(os.path.join(run_dir, meta.get("tokenizer_file", RUN_TOKENIZER)),
                       meta.get("eos_id"))
  if train_cfg is None:
    return None
  try:
    found = data_tokenizer_meta(train_cfg.data, 0)
  except (OSError, ValueError):
    return None
  if found is None:
    return None
  meta, src = found
  if meta["tokenizer"] == "byte":
    return ByteTokenizer(meta.get("vocab_size") or BYTE_VOCAB, meta.get("eos_id"))
  return HFTokenizer(src, meta.get("eos_id"))
