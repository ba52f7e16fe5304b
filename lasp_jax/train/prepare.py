"""``python train.py prepare INPUT.txt OUTPUT.bin [--tokenizer byte] [--split-blank-lines |
--eos-id ID]``: token file plus sidecar.

Tokenises a UTF-8 text file into a flat binary of token ids (``data.source=tokens``) and writes the
sidecar ``OUTPUT.bin.json``: ``{"dtype", "vocab_size", "eos_id", "count", "tokenizer"}``, which the
data pipeline reads instead of trusting ``data.token_dtype``. The byte tokenizer maps each byte to
its value (vocabulary 256); it is the only one, as no maintained BPE library is a dependency of this
project.

Documents (the sidecar's ``eos_id``, which the pipeline turns into segment ids):

- default: none, the file is one document (``eos_id`` null);
- ``--split-blank-lines``: paragraphs are documents. Each run of blank lines (empty or only
  whitespace) between two paragraphs becomes one EOS, id 256, so the vocabulary is 257; the
  paragraphs keep their bytes, each with its last newline; blank lines before the first paragraph
  and after the last are dropped, and no EOS ends the file;
- ``--eos-id ID``: the bytes are unchanged and byte ``ID`` already ends each document (10: every
  line is one).
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys

import numpy as np

from lasp_jax.train.data import sidecar_path

TOKENIZERS = ("byte",)
BYTE_VOCAB = 256
PARAGRAPH_EOS = BYTE_VOCAB           # the first id after the bytes: it never collides with text
_CHUNK = 1 << 24                     # bytes read at a time: a corpus need not fit in memory


class _Paragraphs:
  """Streaming byte ids with ``eos`` between paragraphs (see ``--split-blank-lines``).

  A line can straddle two chunks, so the tail after the chunk's last newline waits for the next.
  """

  def __init__(self, eos: int):
    self.eos, self.carry = eos, b""
    self.started = False             # a paragraph has been written: the next one needs an EOS
    self.pending = False             # blank lines seen since the last paragraph line

  def feed(self, chunk: bytes, final: bool = False) -> np.ndarray:
    """The ids (uint16) of the complete lines in ``carry + chunk``; ``final``: the rest too."""
    lines = (self.carry + chunk).split(b"\n")
    self.carry = b"" if final else lines.pop()
    kept, eos_at, size = [], [], 0
    for i, line in enumerate(lines):
      if not line.strip():
        self.pending = self.started
        continue
      if self.pending:
        eos_at.append(size)
        self.pending = False
      piece = line if final and i == len(lines) - 1 else line + b"\n"   # the file's own last byte
      kept.append(piece)
      size += len(piece)
      self.started = True
    ids = np.frombuffer(b"".join(kept), np.uint8).astype(np.uint16)
    return np.insert(ids, eos_at, self.eos) if eos_at else ids


def prepare(src: str, dst: str, tokenizer: str = "byte", *, split_blank_lines: bool = False,
            eos_id: int | None = None) -> dict:
  """Writes ``dst`` (uint16 ids) and ``dst.json``; returns the sidecar's contents.

  ``split_blank_lines``: paragraphs become documents ended by id 256; ``eos_id``: the byte that
  already ends documents (recorded, the bytes unchanged). At most one of the two.

  Both files appear whole or not at all (written aside, then renamed), the sidecar last, so that a
  crash never leaves a token file described by a stale sidecar.
  """
  if tokenizer not in TOKENIZERS:
    raise ValueError(f"--tokenizer {tokenizer!r}: the tokenizers are {list(TOKENIZERS)}")
  if split_blank_lines and eos_id is not None:
    raise ValueError(f"--eos-id {eos_id} and --split-blank-lines: choose one (--split-blank-lines "
                     f"writes its own EOS, id {PARAGRAPH_EOS})")
  if eos_id is not None and not 0 <= eos_id < BYTE_VOCAB:
    raise ValueError(f"--eos-id {eos_id}: the byte tokenizer's ids are 0 .. {BYTE_VOCAB - 1}")
  if not os.path.isfile(src):
    raise ValueError(f"{src!r} is not a file")
  decoder = codecs.getincrementaldecoder("utf-8")()
  paragraphs = _Paragraphs(PARAGRAPH_EOS) if split_blank_lines else None
  read = count = 0
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  tmp = dst + ".tmp"
  try:
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
      while chunk := fin.read(_CHUNK):
        try:
          decoder.decode(chunk)
        except UnicodeDecodeError as e:
          raise ValueError(f"{src!r} is not UTF-8 text: byte {read + e.start} ({e.reason})"
                           ) from None
        read += len(chunk)
        ids = (paragraphs.feed(chunk) if paragraphs
               else np.frombuffer(chunk, np.uint8).astype(np.uint16))
        ids.tofile(fout)
        count += len(ids)
      if paragraphs:
        ids = paragraphs.feed(b"", final=True)
        ids.tofile(fout)
        count += len(ids)
    try:
      decoder.decode(b"", final=True)
    except UnicodeDecodeError:
      raise ValueError(f"{src!r} is not UTF-8 text: it ends inside a character") from None
    if count == 0:
      raise ValueError(f"{src!r} is empty" + (" (only blank lines)" if read else ""))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  side = sidecar_path(dst)
  if os.path.exists(side):           # never a new token file under an old file's sidecar
    os.remove(side)
  os.replace(tmp, dst)
  meta = {"dtype": "uint16", "vocab_size": BYTE_VOCAB + 1 if split_blank_lines else BYTE_VOCAB,
          "eos_id": PARAGRAPH_EOS if split_blank_lines else eos_id, "count": count,
          "tokenizer": tokenizer}
  with open(side + ".tmp", "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  os.replace(side + ".tmp", side)
  return meta


def main(argv) -> int:
  """The ``train.py prepare`` command line: 0 on success, 2 (a message on stderr) on bad input."""
  ap = argparse.ArgumentParser(prog="python train.py prepare",
                               description="UTF-8 text -> a token file and its .json sidecar")
  ap.add_argument("input")
  ap.add_argument("output")
  ap.add_argument("--tokenizer", default="byte", help="byte (the only one)")
  docs = ap.add_mutually_exclusive_group()
  docs.add_argument("--split-blank-lines", action="store_true",
                    help=f"paragraphs (separated by blank lines) are documents, each ended by EOS "
                         f"id {PARAGRAPH_EOS} (vocab_size {BYTE_VOCAB + 1})")
  docs.add_argument("--eos-id", type=int, default=None,
                    help="the byte that ends each document, e.g. 10: each line is one")
  args = ap.parse_args(argv)
  try:
    meta = prepare(args.input, args.output, args.tokenizer,
                   split_blank_lines=args.split_blank_lines, eos_id=args.eos_id)
  except ValueError as e:
    print(f"prepare: {e}", file=sys.stderr)
    return 2
  eos = "" if meta["eos_id"] is None else f", eos_id {meta['eos_id']}"
  print(f"{args.output}: {meta['count']} {meta['dtype']} tokens, vocab_size {meta['vocab_size']}"
        f"{eos} ({meta['tokenizer']}); use data.source=tokens data.path={args.output}")
  return 0
