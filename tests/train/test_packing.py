"""Packed documents: prepare's paragraph split, segment ids and masks, layouts, resume, validation."""

import json
import os

import jax
import numpy as np
import pytest

import lasp_jax
from lasp_jax.train import prepare as prepare_lib
from lasp_jax.train.config import DataConfig, MqarConfig, TrainConfig
from lasp_jax.train.data import Batches, natural_order

from tests.data import SHAKESPEARE  # noqa: E402  (the first 20 KB, shipped in tests/data/)
EOS = prepare_lib.PARAGRAPH_EOS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The first ~20 KB of Shakespeare (whole lines), paragraphs split at blank lines:
  ``(token path, source bytes)``."""
  d = tmp_path_factory.mktemp("packed")
  raw = open(SHAKESPEARE, "rb").read(20_000)
  raw = raw[:raw.rindex(b"\n") + 1]
  src, dst = d / "shakespeare.txt", d / "shakespeare.bin"
  src.write_bytes(raw)
  assert prepare_lib.main([str(src), str(dst), "--split-blank-lines"]) == 0
  return str(dst), raw


def _mesh(data=1, sp=8):
  return jax.make_mesh((data, sp), ("data", "sp"))


def _batches(path, layout="contiguous", micro_batches=1, vocab_size=EOS + 1, mesh=None, **kw):
  cfg = DataConfig(source="tokens", path=path, seq_len=64, batch_size=4, **kw)
  return Batches(cfg, vocab_size=vocab_size, mesh=mesh or _mesh(), layout=layout,
                 micro_batches=micro_batches)


def _host(batch, perm=None):
  return {k: natural_order(np.asarray(v), perm) for k, v in batch.items()}


def test_prepare_split_blank_lines_writes_eos_between_paragraphs(corpus):
  path, raw = corpus
  ids = np.fromfile(path, np.uint16)
  meta = json.loads(open(path + ".json").read())
  assert meta == {"dtype": "uint16", "vocab_size": 257, "eos_id": 256, "count": len(ids),
                  "tokenizer": "byte"}
  # This text separates paragraphs by exactly one blank line: each "\n\n" became "\n" + EOS.
  assert raw.count(b"\n\n") == int(np.sum(ids == EOS)) > 100
  expect = raw.replace(b"\n\n", b"\n\x00")
  np.testing.assert_array_equal(np.where(ids == EOS, 0, ids), np.frombuffer(expect, np.uint8))


def test_prepare_paragraph_rules_hold_across_chunk_boundaries(tmp_path, monkeypatch):
  """Leading/trailing blank lines dropped, a run of blank (or whitespace, CRLF) lines is one EOS,
  the last line keeps its missing newline; the same for any chunk size."""
  text = b"\n\n a\nb\n\n \t\n\r\nc\r\n\r\nd\n\n\ne"
  expect = [32, 97, 10, 98, 10, EOS, 99, 13, 10, EOS, 100, 10, EOS, 101]
  src = tmp_path / "in.txt"
  src.write_bytes(text)
  for chunk in (1, 2, 3, 5, 1 << 24):
    monkeypatch.setattr(prepare_lib, "_CHUNK", chunk)
    meta = prepare_lib.prepare(str(src), str(tmp_path / "out.bin"), split_blank_lines=True)
    assert np.fromfile(tmp_path / "out.bin", np.uint16).tolist() == expect, chunk
    assert meta["count"] == len(expect)
  blank = tmp_path / "blank.txt"
  blank.write_bytes(b"\n \n\n")
  with pytest.raises(ValueError, match="empty .only blank lines"):
    prepare_lib.prepare(str(blank), str(tmp_path / "blank.bin"), split_blank_lines=True)
  assert not os.path.exists(tmp_path / "blank.bin.tmp")


def test_prepare_eos_id_records_a_byte_and_rejects_bad_ones(tmp_path, capsys):
  src = tmp_path / "in.txt"
  src.write_bytes(b"one\ntwo\n")
  assert prepare_lib.main([str(src), str(tmp_path / "o.bin"), "--eos-id", "10"]) == 0
  assert "eos_id 10" in capsys.readouterr().out
  meta = json.loads((tmp_path / "o.bin.json").read_text())
  assert meta["eos_id"] == 10 and meta["vocab_size"] == 256
  assert np.fromfile(tmp_path / "o.bin", np.uint16).tobytes()[::2] == b"one\ntwo\n"
  assert prepare_lib.main([str(src), str(tmp_path / "o.bin"), "--eos-id", "300"]) == 2
  assert "--eos-id 300" in capsys.readouterr().err
  with pytest.raises(ValueError, match="--eos-id 10 and --split-blank-lines"):
    prepare_lib.prepare(str(src), str(tmp_path / "o.bin"), eos_id=10, split_blank_lines=True)
  capsys.readouterr()
  assert prepare_lib.main([str(src), str(tmp_path / "o.bin"), "--eos-id", "10",
                           "--split-blank-lines"]) == 2     # bytes: not together
  assert "--eos-id 10 and --split-blank-lines" in capsys.readouterr().err


def test_segment_ids_change_exactly_after_eos_and_mask_the_next_target(corpus):
  path, _ = corpus
  b = _batches(path, micro_batches=2)
  assert b.eos_id == EOS                         # from the sidecar
  batch = b.get(0)
  assert set(batch) == {"inputs", "targets", "mask", "segment_ids"}
  seg = batch["segment_ids"]
  assert seg.shape == (2, 4, 64) and seg.dtype == np.int32
  assert seg.sharding == batch["inputs"].sharding
  h = _host(batch)
  x, y, m, s = h["inputs"], h["targets"], h["mask"], h["segment_ids"]
  is_eos = x == EOS
  assert is_eos.any() and (~is_eos).any()
  assert np.all(s[..., 0] == 0)                  # every window numbers its documents from 0
  np.testing.assert_array_equal(np.diff(s, axis=-1), is_eos[..., :-1].astype(np.int32))
  np.testing.assert_array_equal(m, (~is_eos).astype(np.float32))
  assert np.all(y[is_eos] != EOS)                # the masked targets open the next paragraph
  np.testing.assert_array_equal(x[..., 1:], y[..., :-1])


def test_zigzag_permutes_segment_ids_like_inputs(corpus):
  path, _ = corpus
  c = _batches(path, micro_batches=2).get(8)
  z = _batches(path, layout="zigzag", micro_batches=2).get(8)
  assert z["segment_ids"].sharding.spec == z["inputs"].sharding.spec
  # The check means something only where a document starts inside a window.
  assert not np.array_equal(np.asarray(z["segment_ids"]), np.asarray(c["segment_ids"]))
  for k in ("inputs", "targets", "mask", "segment_ids"):
    expect = np.asarray(lasp_jax.zigzag(np.asarray(c[k]), 8, axis=2))
    np.testing.assert_array_equal(np.asarray(z[k]), expect)


def test_resume_at_a_start_index_equals_the_uninterrupted_batches(corpus):
  path, _ = corpus
  mesh = _mesh(2, 4)
  straight = _batches(path, layout="zigzag", micro_batches=2, mesh=mesh)
  steps = [_host(straight.get(s * 8)) for s in range(4)]
  resumed = _batches(path, layout="zigzag", micro_batches=2, mesh=mesh)
  for s in (2, 3):
    got = _host(resumed.get(s * 8))
    for k in steps[s]:
      np.testing.assert_array_equal(got[k], steps[s][k])
  assert not np.array_equal(steps[2]["segment_ids"], steps[3]["segment_ids"])


def test_text_eos_newline_makes_lines_documents_and_no_eos_means_no_segment_ids(corpus):
  path, _ = corpus
  mesh = _mesh()
  text = Batches(DataConfig(source="text", path=SHAKESPEARE, seq_len=64, batch_size=2, eos_id=10),
                 vocab_size=256, mesh=mesh, layout="contiguous").get(0)
  x, s = np.asarray(text["inputs"]), np.asarray(text["segment_ids"])
  np.testing.assert_array_equal(s[..., -1], np.sum(x[..., :-1] == 10, axis=-1))
  assert s.max() > 0
  plain = Batches(DataConfig(source="text", path=SHAKESPEARE, seq_len=64, batch_size=2),
                  vocab_size=256, mesh=mesh, layout="contiguous")
  assert plain.eos_id is None and set(plain.get(0)) == {"inputs", "targets", "mask"}
  mqar = Batches(DataConfig(seq_len=64, batch_size=2, mqar=MqarConfig(num_kv_pairs=4)),
                 vocab_size=64, mesh=mesh, layout="contiguous")
  assert set(mqar.get(0)) == {"inputs", "targets", "mask"}
  # data.eos_id wins over the sidecar's: newlines end documents instead of paragraph breaks.
  lines = _batches(path, eos_id=10)
  assert lines.eos_id == 10
  h = _host(lines.get(0))
  np.testing.assert_array_equal(h["mask"], (h["inputs"] != 10).astype(np.float32))


def test_eos_id_errors_name_the_key_and_value(corpus, tmp_path):
  path, _ = corpus
  for data, match in (
      (DataConfig(source="text", path="x.txt", eos_id=-1), r"data.eos_id must .*>= 0, got -1"),
      (DataConfig(source="text", path="x.txt", eos_id=256), r"data.eos_id=256 is not a byte"),
      (DataConfig(eos_id=3), r"data.eos_id=3: the mqar source has no documents")):
    with pytest.raises(ValueError, match=match):
      TrainConfig(data=data)
  with pytest.raises(ValueError, match=r"data.eos_id=3: the mqar source"):
    Batches(DataConfig(seq_len=64, batch_size=2, eos_id=3), vocab_size=64, mesh=_mesh(),
            layout="contiguous")
  with pytest.raises(ValueError, match=r"data.eos_id=300 is not below the vocab_size of "
                                       r".*shakespeare.bin.json 257"):
    _batches(path, eos_id=300, vocab_size=512)
  with pytest.raises(ValueError, match=r"data.eos_id=200 is not below the model's vocab_size 128"):
    Batches(DataConfig(source="text", path=SHAKESPEARE, seq_len=64, batch_size=2, eos_id=200),
            vocab_size=128, mesh=_mesh(), layout="contiguous")
  bad = tmp_path / "bad.bin"
  np.arange(200, dtype=np.uint16).tofile(bad)
  (tmp_path / "bad.bin.json").write_text(json.dumps({"dtype": "uint16", "eos_id": "\n"}))
  with pytest.raises(ValueError, match=r"bad.bin.json: eos_id '\\n': an EOS id must be a "
                                       r"non-negative integer"):
    _batches(str(bad))
