"""``python train.py prepare INPUT... OUTPUT.bin [--tokenizer byte | PATH/tokenizer.json |
--train-bpe VOCAB] [--split-blank-lines] [--jsonl-key KEY] [--eos-id ID]``: token file plus sidecar.

Tokenises UTF-8 text (one or more files, folders of files, or JSONL records) into a flat binary of
token ids (``data.source=tokens``) and writes the sidecar ``OUTPUT.bin.json``: ``{"dtype",
"vocab_size", "eos_id", "count", "tokenizer"}`` (plus ``"tokenizer_file"`` and
``"tokenizer_sha256"`` for a Hugging Face tokenizer), which the data pipeline reads instead of
trusting ``data.token_dtype``, and training takes the model's vocabulary from. The ids are uint16
when the vocabulary fits (<= 65536), else uint32.

Tokenizers:

- ``byte`` (default): each byte is its own id (vocabulary 256; 257 with the EOS id 256);
- ``--tokenizer PATH/tokenizer.json``: any Hugging Face tokenizer file (the ``tokenizers``
  library); it is copied beside the output as ``OUTPUT.bin.tokenizer.json``, and the sidecar names
  the copy and its sha256;
- ``--train-bpe VOCAB``: a byte-level BPE of ``VOCAB`` tokens (``<|endoftext|>`` is id 0) trained
  offline on the corpus itself, saved as ``OUTPUT.bin.tokenizer.json``.

Documents (the sidecar's ``eos_id``, which the pipeline turns into segment ids). With several input
files each file is a document; with ``--jsonl-key KEY`` each record's ``KEY`` string is one; with
``--split-blank-lines`` each paragraph is one (each run of blank lines, empty or only whitespace,
between two paragraphs ends a document; paragraphs keep their own last newline; blank lines
before the first paragraph and after the last are dropped). One EOS id goes between documents,
none after the last: the tokenizer's end-of-text token (``<|endoftext|>``, ``</s>``, ... ; or
``--eos-id``), 256 for bytes. A single text file without ``--split-blank-lines`` is one document
(``eos_id`` null); for bytes, ``--eos-id ID`` then records a byte that already ends each document
(10: every line is one), the bytes unchanged.

The input is streamed (read line by line, encoded in batches), so a corpus larger than memory
works; a document is encoded in pieces cut at line starts that are not whitespace, which for
byte-level BPE gives the ids of encoding it whole. Everything appears whole or not at all: the
token file, the tokenizer copy and the sidecar are written aside and renamed at the end, the
sidecar last.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import shutil
import sys

import numpy as np

from lasp_jax.train import tokenizer as tok_lib

from lasp_jax.train.data import sidecar_path

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


def _prepare_bytes(src: str, dst: str, tokenizer: str = "byte", *, split_blank_lines: bool = False,
            eos_id: int | None = None) -> dict:
  """Writes ``dst`` (uint16 ids) and ``dst.json``; returns the sidecar's contents.

  ``split_blank_lines``: paragraphs become documents ended by id 256; ``eos_id``: the byte that
  already ends documents (recorded, the bytes unchanged). At most one of the two.

  Both files appear whole or not at all (written aside, then renamed), the sidecar last, so that a
  crash never leaves a token file described by a stale sidecar.
  """
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



_PIECE_CHARS = 1 << 20               # characters of a document encoded at a time
_BATCH_CHARS = 1 << 22               # characters per encode_batch call


def input_files(inputs) -> list[str]:
  """The files of ``inputs`` (paths of files or folders; a folder: its files, recursively, sorted,
  hidden ones skipped). ValueError naming a path that does not exist or a folder without files."""
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  files = []
  for src in map(str, inputs):
    if os.path.isdir(src):
      found = sorted(os.path.join(d, f) for d, dirs, names in os.walk(src) for f in names
                     if not f.startswith("."))
      if not found:
        raise ValueError(f"folder {src!r} holds no files")
      files += found
    elif os.path.isfile(src):
      files.append(src)
    else:
      raise ValueError(f"input {src!r} does not exist")
  if not files:
    raise ValueError("no input files")
  return files


def _lines(path: str, bar=None):
  """``(line number, text)`` of a UTF-8 file, streamed; ValueError naming the file and line."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      if bar is not None:
        bar.update(len(raw))
      try:
        yield n, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line: {e.reason})"
                         ) from None


def _cut(lines, piece_chars: int):
  """Pieces of one document (an iterable of its lines), cut where a line that does not start with
  whitespace begins, once ``piece_chars`` are gathered."""
  buf, size = [], 0
  for line in lines:
    if size >= piece_chars and line[:1] and not line[:1].isspace():
      yield "".join(buf)
      buf, size = [], 0
    buf.append(line)
    size += len(line)
  if buf:
    yield "".join(buf)


def documents(files, *, split_blank_lines=False, jsonl_key=None, piece_chars=_PIECE_CHARS,
              bar=None):
  """``(starts a document, text)`` pieces of the corpus, in order, streamed. Empty documents are
  skipped."""
  for path in files:
    if jsonl_key is not None:
      for n, line in _lines(path, bar):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(rec, dict) or jsonl_key not in rec:
          keys = list(rec)[:8] if isinstance(rec, dict) else type(rec).__name__
          raise ValueError(f"{path}:{n}: no key {jsonl_key!r} (--jsonl-key) in the record "
                           f"(it has {keys})")
        text = rec[jsonl_key]
        if not isinstance(text, str):
          raise ValueError(f"{path}:{n}: {jsonl_key!r} is a {type(text).__name__}, not a string")
        first = True
        for piece in _cut(text.splitlines(keepends=True), piece_chars):
          yield first, piece
          first = False
    elif split_blank_lines:
      para, size, started = [], 0, False     # started: the paragraph has yielded a piece
      for _, line in _lines(path, bar):
        if line.strip():
          if size >= piece_chars and not line[:1].isspace():   # a huge paragraph: stream it
            yield not started, "".join(para)
            para, size, started = [], 0, True
          para.append(line)
          size += len(line)
        elif para:
          yield not started, "".join(para)
          para, size, started = [], 0, False
      if para:
        yield not started, "".join(para)
    else:
      first = True
      for piece in _cut((line for _, line in _lines(path, bar)), piece_chars):
        yield first, piece
        first = False


def train_bpe(texts, vocab_size: int, dst: str) -> str:
  """Trains a byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` id 0) on the strings
  ``texts`` and saves it to ``dst`` (tokenizer.json format); returns ``dst``."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if vocab_size < 258:
    raise ValueError(f"--train-bpe {vocab_size}: a byte-level BPE needs at least 258 tokens "
                     f"(256 bytes, <|endoftext|> and one merge)")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.save(dst)
  return dst


def prepare(src, dst: str, tokenizer: str = "byte", *, split_blank_lines: bool = False,
            eos_id: int | None = None, jsonl_key: str | None = None,
            train_bpe_vocab: int | None = None, progress: bool = False) -> dict:
  """Writes ``dst`` and ``dst.json`` (and ``dst.tokenizer.json`` for a Hugging Face tokenizer)
  from ``src`` (a path or a list of files / folders); returns the sidecar's contents. See the
  module's docstring."""
  files = input_files(src)
  if tokenizer == "byte" and train_bpe_vocab is None and len(files) == 1 and jsonl_key is None:
    return _prepare_bytes(files[0], dst, split_blank_lines=split_blank_lines, eos_id=eos_id)
  if train_bpe_vocab is not None and tokenizer != "byte":
    raise ValueError("--tokenizer and --train-bpe: choose one")
  multi = len(files) > 1 or jsonl_key is not None or split_blank_lines
  tok_dst = dst + ".tokenizer.json"
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  tmp, tok_tmp = dst + ".tmp", tok_dst + ".tmp"
  side = sidecar_path(dst)
  bar = None
  try:
    if train_bpe_vocab is not None:
      train_bpe((t for _, t in documents(files, split_blank_lines=split_blank_lines,
                                         jsonl_key=jsonl_key)), train_bpe_vocab, tok_tmp)
      tokenizer = tok_tmp
    if tokenizer == "byte":
      if eos_id is not None and not 0 <= eos_id <= BYTE_VOCAB:
        raise ValueError(f"--eos-id {eos_id}: the byte tokenizer's EOS is a byte (0 .. "
                         f"{BYTE_VOCAB - 1}) or {BYTE_VOCAB}")
      eos = PARAGRAPH_EOS if eos_id is None else eos_id
      tok = tok_lib.ByteTokenizer(BYTE_VOCAB + 1 if eos == BYTE_VOCAB else BYTE_VOCAB, eos)
    else:
      if not os.path.isfile(tokenizer):
        raise ValueError(f"--tokenizer {tokenizer!r}: no such file (give a Hugging Face "
                         f"tokenizer.json, or byte)")
      tok = tok_lib.HFTokenizer(tokenizer, eos_id)
      if tok.eos_id is not None and not 0 <= tok.eos_id < tok.vocab_size:
        raise ValueError(f"--eos-id {tok.eos_id} is outside the vocabulary of {tokenizer!r} "
                         f"(vocab_size {tok.vocab_size})")
      if multi and tok.eos_id is None:
        raise ValueError(f"{tokenizer!r} has no end-of-text token (looked for "
                         f"{', '.join(tok_lib.EOS_NAMES)}): give --eos-id ID to separate the "
                         f"documents")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    # One document: no EOS written; a given --eos-id is recorded (ids that already end documents).
    eos = tok.eos_id if multi or eos_id is not None else None
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True,
                 desc="prepare", file=sys.stderr)
    count = 0
    with open(tmp, "wb") as fout:
      batch, starts, size, docs = [], [], 0, 0

      def write():
        nonlocal count, docs
        out = []
        for ids, start in zip(tok.encode_batch(batch), starts):
          if start and docs and eos is not None:
            out.append([eos])
          docs += start
          out.append(ids)
        arr = np.fromiter((t for ids in out for t in ids), dtype=np.int64)
        if len(arr) and (arr.max() >= tok.vocab_size or arr.min() < 0):
          raise ValueError(f"the tokenizer produced id {int(arr.max())}, outside its vocab_size "
                           f"{tok.vocab_size}")
        arr.astype(dtype).tofile(fout)
        count += len(arr)
      for start, text in documents(files, split_blank_lines=split_blank_lines,
                                   jsonl_key=jsonl_key, bar=bar):
        batch.append(text)
        starts.append(start)
        size += len(text)
        if size >= _BATCH_CHARS or len(batch) >= 4096:
          write()
          batch, starts, size = [], [], 0
      if batch:
        write()
    if count == 0:
      raise ValueError(f"{', '.join(files)}: no text (empty, or only blank lines or empty records)")
    if tokenizer != "byte" and tokenizer != tok_tmp:
      shutil.copyfile(tokenizer, tok_tmp)
    if os.path.exists(side):         # never a new token file under an old file's sidecar
      os.remove(side)
    os.replace(tmp, dst)
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "eos_id": eos,
            "count": count, "tokenizer": tok.kind}
    if tok.kind == "huggingface":
      os.replace(tok_tmp, tok_dst)
      meta.update(tokenizer_file=os.path.basename(tok_dst),
                  tokenizer_sha256=tok_lib.sha256_file(tok_dst),
                  tokenizer_source=("trained: --train-bpe " + str(train_bpe_vocab)
                                    if train_bpe_vocab is not None else os.path.abspath(tokenizer)))
    with open(side + ".tmp", "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    os.replace(side + ".tmp", side)
    return meta
  except BaseException:
    for p in (tmp, tok_tmp, side + ".tmp"):
      if os.path.exists(p):
        os.remove(p)
    raise
  finally:
    if bar is not None:
      bar.close()


def main(argv) -> int:
  """The ``train.py prepare`` command line: 0 on success, 2 (a message on stderr) on bad input."""
  ap = argparse.ArgumentParser(prog="python train.py prepare",
                               description="UTF-8 text (files, folders or JSONL) -> a token file "
                                           "and its .json sidecar")
  ap.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, folders or JSONL files")
  ap.add_argument("output", metavar="OUTPUT.bin")
  tk = ap.add_mutually_exclusive_group()
  tk.add_argument("--tokenizer", default="byte",
                  help="byte (default) or a Hugging Face tokenizer.json")
  tk.add_argument("--train-bpe", type=int, default=None, metavar="VOCAB",
                  help="train a byte-level BPE of VOCAB tokens on the corpus (saved as "
                       "OUTPUT.bin.tokenizer.json)")
  ap.add_argument("--split-blank-lines", action="store_true",
                  help="paragraphs (separated by blank lines) are documents")
  ap.add_argument("--jsonl-key", default=None, metavar="KEY",
                  help="the inputs are JSONL; each record's KEY string is a document")
  ap.add_argument("--eos-id", type=int, default=None,
                  help="the EOS id between documents (default: the tokenizer's end-of-text token; "
                       f"{PARAGRAPH_EOS} for bytes). Bytes, one text file: the byte that already "
                       "ends each document, e.g. 10: each line is one")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar")
  try:
    args = ap.parse_args(argv)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 2
  try:
    meta = prepare(args.inputs, args.output, args.tokenizer,
                   split_blank_lines=args.split_blank_lines, eos_id=args.eos_id,
                   jsonl_key=args.jsonl_key, train_bpe_vocab=args.train_bpe,
                   progress=not args.no_progress)
  except (ValueError, OSError) as e:
    print(f"prepare: {e}", file=sys.stderr)
    return 2
  eos = "" if meta["eos_id"] is None else f", eos_id {meta['eos_id']}"
  name = meta.get("tokenizer_file", meta["tokenizer"])
  print(f"{args.output}: {meta['count']} {meta['dtype']} tokens, vocab_size {meta['vocab_size']}"
        f"{eos} ({name}); use data.source=tokens data.path={args.output}")
  return 0
