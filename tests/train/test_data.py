"""Data: MQAR structure, determinism and resumable position, layouts, text and token files."""

import json
import os

import jax
import numpy as np
import pytest

import lasp_jax
from lasp_jax.train.config import DataConfig, MqarConfig
from lasp_jax.train.data import Batches, mqar_example, natural_order

from tests.data import SHAKESPEARE, SHAKESPEARE_REL  # noqa: E402  (shipped in tests/data/)


def test_mqar_answers_are_the_context_values():
  rng = np.random.default_rng(3)
  n, L, V = 6, 64, 40
  ex = mqar_example(rng, L, V, n)
  x = np.concatenate([ex["inputs"], ex["targets"][-1:]])
  keys, values = x[0:2 * n:2], x[1:2 * n:2]
  assert len(set(keys.tolist())) == n and keys.max() < values.min()
  table = dict(zip(keys.tolist(), values.tolist()))
  where = np.nonzero(ex["mask"])[0]
  assert len(where) == (L - 2 * n + 1) // 2 and where.min() == 2 * n
  for t in where:                  # the target at every counted position is the queried key's value
    assert ex["targets"][t] == table[int(ex["inputs"][t])]
  assert np.all(ex["mask"][: 2 * n] == 0)


def test_mqar_rejects_small_vocab_and_short_sequence():
  with pytest.raises(ValueError, match="num_kv_pairs=8"):
    mqar_example(np.random.default_rng(0), 64, 16, 8)
  with pytest.raises(ValueError, match="seq_len=10"):
    mqar_example(np.random.default_rng(0), 10, 64, 8)


def _mesh(data, sp):
  return jax.make_mesh((data, sp), ("data", "sp"))


def test_batches_deterministic_resumable_and_sharded():
  cfg = DataConfig(seq_len=64, batch_size=4, mqar=MqarConfig(num_kv_pairs=4))
  mesh = _mesh(2, 4)
  b = Batches(cfg, vocab_size=64, mesh=mesh, layout="contiguous", micro_batches=2)
  x0, x0_again, x1 = b.get(0)["inputs"], b.get(0)["inputs"], b.get(8)["inputs"]
  assert x0.shape == (2, 4, 64)
  assert x0.sharding.spec == jax.sharding.PartitionSpec(None, "data", "sp")
  np.testing.assert_array_equal(np.asarray(x0), np.asarray(x0_again))
  assert not np.array_equal(np.asarray(x0), np.asarray(x1))
  # A fresh pipeline (a resumed run) gives the same batch for the same data position.
  b2 = Batches(cfg, vocab_size=64, mesh=mesh, layout="contiguous", micro_batches=2)
  np.testing.assert_array_equal(np.asarray(b2.get(8)["inputs"]), np.asarray(x1))
  # Eval data never equals train data.
  e = Batches(cfg, vocab_size=64, mesh=mesh, layout="contiguous", split="eval")
  assert not np.array_equal(np.asarray(e.get(0)["inputs"])[0], np.asarray(x0)[0])


def test_zigzag_batches_are_the_contiguous_ones_permuted():
  cfg = DataConfig(seq_len=64, batch_size=2, mqar=MqarConfig(num_kv_pairs=4))
  mesh = _mesh(1, 8)
  c = Batches(cfg, vocab_size=64, mesh=mesh, layout="contiguous").get(4)
  z = Batches(cfg, vocab_size=64, mesh=mesh, layout="zigzag").get(4)
  for k in ("inputs", "targets", "mask"):
    expect = np.asarray(lasp_jax.zigzag(np.asarray(c[k]), 8, axis=2))
    np.testing.assert_array_equal(np.asarray(z[k]), expect)
  perm = np.asarray(lasp_jax.zigzag(np.arange(64)[None], 8, axis=1))[0]
  np.testing.assert_array_equal(natural_order(np.asarray(z["inputs"]), perm),
                                np.asarray(c["inputs"]))
  with pytest.raises(ValueError, match="seq_len=40"):
    Batches(DataConfig(seq_len=40, batch_size=2), vocab_size=64, mesh=mesh, layout="zigzag")
  with pytest.raises(ValueError, match="batch_size=3"):
    Batches(DataConfig(seq_len=64, batch_size=3), vocab_size=64, mesh=_mesh(2, 4),
            layout="contiguous")


def test_text_bytes_and_token_files(tmp_path):
  cfg = DataConfig(source="text", path=SHAKESPEARE, seq_len=32, batch_size=2)
  mesh = _mesh(1, 8)
  b = Batches(cfg, vocab_size=256, mesh=mesh, layout="contiguous")
  batch = b.get(0)
  x, y = np.asarray(batch["inputs"])[0], np.asarray(batch["targets"])[0]
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])          # targets are the next bytes
  text = open(SHAKESPEARE, "rb").read()
  assert bytes(x[0].astype(np.uint8)) in text
  assert np.all(np.asarray(batch["mask"]) == 1)
  # Relative to the repository root works too (how configs name it).
  rel = Batches(DataConfig(source="text", path=SHAKESPEARE_REL, seq_len=32,
                           batch_size=2), vocab_size=256, mesh=mesh, layout="contiguous")
  np.testing.assert_array_equal(np.asarray(rel.get(0)["inputs"]), np.asarray(batch["inputs"]))
  for dtype, top in (("uint16", 60000), ("uint32", 100000)):
    ids = (np.arange(2000) * 7919 % top).astype(dtype)
    path = tmp_path / f"tok.{dtype}.bin"
    ids.tofile(path)
    t = Batches(DataConfig(source="tokens", path=str(path), token_dtype=dtype, seq_len=32,
                           batch_size=2, eval_fraction=0.1), vocab_size=top, mesh=mesh,
                layout="zigzag")
    got = natural_order(np.asarray(t.get(6)["inputs"])[0], t.perm)
    for row in got:                 # every row is a window of the file at a multiple of seq_len
      start = int(np.nonzero(ids == row[0])[0][0])
      assert start % 32 == 0
      np.testing.assert_array_equal(row, ids[start:start + 32])
    with pytest.raises(ValueError, match="vocab_size 1000"):
      Batches(t.cfg, vocab_size=1000, mesh=mesh, layout="zigzag").get(0)
  with pytest.raises(ValueError, match="nope.bin"):
    Batches(DataConfig(source="tokens", path="nope.bin", seq_len=32, batch_size=2),
            vocab_size=256, mesh=mesh, layout="contiguous")
  odd = tmp_path / "odd.bin"
  odd.write_bytes(b"abc")
  with pytest.raises(ValueError, match="whole number of uint16"):
    Batches(DataConfig(source="tokens", path=str(odd), token_dtype="uint16", seq_len=32,
                       batch_size=2), vocab_size=256, mesh=mesh, layout="contiguous")


def test_token_dtype_comes_from_a_sidecar_or_is_required(tmp_path):
  mesh = _mesh(1, 8)
  ids = (np.arange(4000) * 7919 % 50000).astype(np.uint32)
  path = tmp_path / "corpus.bin"
  ids.tofile(path)

  def batches(vocab_size=50000, **kw):
    return Batches(DataConfig(source="tokens", path=str(path), seq_len=32, batch_size=2, **kw),
                   vocab_size=vocab_size, mesh=mesh, layout="contiguous")

  with pytest.raises(ValueError, match="corpus.bin.*no sidecar.*data.token_dtype=uint16 or uint32"
                                       ".*prepare"):
    batches()
  with pytest.warns(UserWarning, match="corpus.bin.*looks like a uint32 file"):
    batches(token_dtype="uint16")
  path.with_name("corpus.bin.json").write_text(json.dumps(
      {"dtype": "uint32", "vocab_size": 50000, "eos_id": None, "count": len(ids)}))
  b = batches()                                 # the sidecar says uint32
  assert b.get(0)["inputs"].dtype == np.int32 and int(np.asarray(b.get(0)["inputs"]).max()) > 256
  with pytest.raises(ValueError, match="data.token_dtype=uint16 but .*corpus.bin.json says dtype "
                                       "uint32"):
    batches(token_dtype="uint16")
  with pytest.raises(ValueError, match="vocab_size 50000, more than the model's vocab_size 256"):
    batches(vocab_size=256)
  path.with_name("corpus.bin.json").write_text(json.dumps({"dtype": "uint32", "count": 3}))
  with pytest.raises(ValueError, match="says 3 uint32 tokens"):
    batches()
  empty = tmp_path / "empty.bin"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty.bin.*empty file"):
    Batches(DataConfig(source="tokens", path=str(empty), token_dtype="uint16", seq_len=32,
                       batch_size=2), vocab_size=256, mesh=mesh, layout="contiguous")


def test_prepare_writes_tokens_and_sidecar(tmp_path, capsys):
  import train  # the top-level script
  text = "héllo, wörld\n" * 40
  src, dst = tmp_path / "in.txt", tmp_path / "out.bin"
  src.write_text(text, encoding="utf-8")
  assert train.main(["prepare", str(src), str(dst), "--tokenizer", "byte"]) == 0
  assert "out.bin" in capsys.readouterr().out
  raw = text.encode("utf-8")
  meta = json.loads((tmp_path / "out.bin.json").read_text())
  assert meta == {"dtype": "uint16", "vocab_size": 256, "eos_id": None, "count": len(raw),
                  "tokenizer": "byte"}
  np.testing.assert_array_equal(np.fromfile(dst, np.uint16), np.frombuffer(raw, np.uint8))
  b = Batches(DataConfig(source="tokens", path=str(dst), seq_len=32, batch_size=2,
                         eval_fraction=0.0), vocab_size=256, mesh=_mesh(1, 8), layout="contiguous")
  assert bytes(np.asarray(b.get(0)["inputs"])[0, 0].astype(np.uint8)) in raw
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"ok \xff\xfe")
  assert train.main(["prepare", str(bad), str(tmp_path / "bad.bin")]) == 2
  assert "not UTF-8 text: byte 3" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "bad.bin")


def test_mqar_vocab_error_names_the_key_it_came_from():
  cfg = DataConfig(seq_len=64, batch_size=2, mqar=MqarConfig(num_kv_pairs=8, vocab_size=12))
  with pytest.raises(ValueError, match="at least 17 tokens; data.mqar.vocab_size is 12"):
    Batches(cfg, vocab_size=256, mesh=_mesh(1, 8), layout="contiguous")
  with pytest.raises(ValueError, match="the model's vocab_size is 12"):
    Batches(DataConfig(seq_len=64, batch_size=2, mqar=MqarConfig(num_kv_pairs=8)),
            vocab_size=12, mesh=_mesh(1, 8), layout="contiguous")
