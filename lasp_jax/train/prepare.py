"""``python train.py prepare INPUT.txt OUTPUT.bin [--tokenizer byte]``: token file plus sidecar.

Tokenises a UTF-8 text file into a flat binary of token ids (``data.source=tokens``) and writes the
sidecar ``OUTPUT.bin.json``: ``{"dtype", "vocab_size", "eos_id", "count", "tokenizer"}``, which the
data pipeline reads instead of trusting ``data.token_dtype``. The byte tokenizer maps each byte to
its value (vocabulary 256, no end-of-text token: the file is one document); it is the only one, as
no maintained BPE library is a dependency of this project.
"""

from __future__ import annotations

import codecs
import json
import os

import numpy as np

from lasp_jax.train.data import sidecar_path

TOKENIZERS = ("byte",)
_CHUNK = 1 << 24                     # bytes read at a time: a corpus need not fit in memory


def prepare(src: str, dst: str, tokenizer: str = "byte") -> dict:
  """Writes ``dst`` (uint16 ids) and ``dst.json``; returns the sidecar's contents.

  Both files appear whole or not at all (written aside, then renamed), the sidecar last, so that a
  crash never leaves a token file described by a stale sidecar.
  """
  if tokenizer not in TOKENIZERS:
    raise ValueError(f"--tokenizer {tokenizer!r}: the tokenizers are {list(TOKENIZERS)}")
  if not os.path.isfile(src):
    raise ValueError(f"{src!r} is not a file")
  decoder = codecs.getincrementaldecoder("utf-8")()
  count = 0
  tmp = dst + ".tmp"
  with open(src, "rb") as fin, open(tmp, "wb") as fout:
    while chunk := fin.read(_CHUNK):
      try:
        decoder.decode(chunk)
      except UnicodeDecodeError as e:
        os.remove(tmp)
        raise ValueError(f"{src!r} is not UTF-8 text: byte {count + e.start} ({e.reason})"
                         ) from None
      np.frombuffer(chunk, np.uint8).astype(np.uint16).tofile(fout)
      count += len(chunk)
  try:
    decoder.decode(b"", final=True)
  except UnicodeDecodeError:
    os.remove(tmp)
    raise ValueError(f"{src!r} is not UTF-8 text: it ends inside a character") from None
  if count == 0:
    os.remove(tmp)
    raise ValueError(f"{src!r} is empty")
  side = sidecar_path(dst)
  if os.path.exists(side):           # never a new token file under an old file's sidecar
    os.remove(side)
  os.replace(tmp, dst)
  meta = {"dtype": "uint16", "vocab_size": 256, "eos_id": None, "count": count,
          "tokenizer": tokenizer}
  with open(side + ".tmp", "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  os.replace(side + ".tmp", side)
  return meta
