"""Bring your own corpus and tokenizer (issue 24): ``train.py prepare`` with a trained byte-level
BPE, a tokenizer.json, JSONL, folders; vocabulary from the data; the run's tokenizer for ``sample``;
``train.py eval`` against a hand computation.

The token ids are checked against the ``tokenizers`` library's own ``encode`` of each document."""

import json
import os
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import train
from lasp_jax.train import evaluate as eval_lib
from lasp_jax.train import loop
from lasp_jax.train import prepare as prepare_lib
from lasp_jax.train.config import REPO_ROOT, load_config
from tests.train.runs import config

# The corpus (100 KB of it); else the 20 KB head shipped in tests/data/.
_CANDIDATES = (os.path.join(REPO_ROOT, "..", "shared", "data", "tinyshakespeare.txt"),
               os.path.join(REPO_ROOT, "tests", "data", "tinyshakespeare_head.txt"))
SHAKESPEARE = next((p for p in _CANDIDATES if os.path.isfile(p)), None)
pytestmark = pytest.mark.skipif(SHAKESPEARE is None, reason="no Tiny Shakespeare text")


def _head(n):
  raw = open(SHAKESPEARE, "rb").read(n)
  return raw[:raw.rindex(b"\n") + 1].decode("utf-8")


def _paragraphs(text):
  """Paragraphs as prepare --split-blank-lines defines them, computed independently: runs of
  non-blank lines, each keeping its lines' newlines."""
  out, cur = [], []
  for line in text.splitlines(keepends=True):
    if line.strip():
      cur.append(line)
    elif cur:
      out.append("".join(cur))
      cur = []
  if cur:
    out.append("".join(cur))
  return out


def _expected(tok, docs, eos):
  ids = []
  for i, d in enumerate(docs):
    if i:
      ids.append(eos)
    ids += tok.encode(d, add_special_tokens=False).ids
  return np.asarray(ids)


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory):
  """A 500-token BPE trained on the first 100 KB of Shakespeare, paragraphs as documents."""
  d = tmp_path_factory.mktemp("bpe")
  text = _head(100_000)
  (d / "s.txt").write_text(text, encoding="utf-8")
  assert train.main(["prepare", str(d / "s.txt"), str(d / "s.bin"), "--train-bpe", "500",
                     "--split-blank-lines", "--no-progress"]) == 0
  return d, text


def test_trained_bpe_corpus_matches_the_library_encode(bpe_corpus, monkeypatch, tmp_path):
  d, text = bpe_corpus
  meta = json.loads((d / "s.bin.json").read_text())
  tok_path = d / meta["tokenizer_file"]
  tok = Tokenizer.from_file(str(tok_path))
  assert meta["tokenizer"] == "huggingface" and meta["vocab_size"] == 500 == tok.get_vocab_size()
  assert meta["eos_id"] == tok.token_to_id("<|endoftext|>") == 0 and meta["dtype"] == "uint16"
  import hashlib
  assert meta["tokenizer_sha256"] == hashlib.sha256(tok_path.read_bytes()).hexdigest()
  ids = np.fromfile(d / "s.bin", np.uint16)
  assert meta["count"] == len(ids)
  want = _expected(tok, _paragraphs(text), 0)
  np.testing.assert_array_equal(ids, want)
  # Streaming in small pieces (cut at line starts) and small batches gives the same ids.
  monkeypatch.setattr(prepare_lib, "_PIECE_CHARS", 64)
  monkeypatch.setattr(prepare_lib, "_BATCH_CHARS", 500)
  assert prepare_lib.main([str(d / "s.txt"), str(tmp_path / "t.bin"), "--tokenizer",
                           str(tok_path), "--split-blank-lines", "--no-progress"]) == 0
  np.testing.assert_array_equal(np.fromfile(tmp_path / "t.bin", np.uint16), want)
  # The decode of the token file gives back the text with blank-line runs as EOS.
  assert tok.decode(want.tolist(), skip_special_tokens=False).replace("<|endoftext|>", "\n") == \
      re.sub(r"\n\n+", "\n\n", text.strip("\n") + "\n").rstrip("\n") + "\n"


def test_jsonl_and_folders_are_documents(bpe_corpus, tmp_path):
  d, text = bpe_corpus
  tok_path = str(d / "s.bin.tokenizer.json")
  tok = Tokenizer.from_file(tok_path)
  docs = _paragraphs(text)[:40]
  jl = tmp_path / "c.jsonl"
  jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)) + "\n")
  assert train.main(["prepare", str(jl), str(tmp_path / "j.bin"), "--tokenizer", tok_path,
                     "--jsonl-key", "text", "--no-progress"]) == 0
  np.testing.assert_array_equal(np.fromfile(tmp_path / "j.bin", np.uint16),
                                _expected(tok, docs, 0))
  # The tokenizer travels with the corpus.
  meta = json.loads((tmp_path / "j.bin.json").read_text())
  assert (tmp_path / meta["tokenizer_file"]).read_bytes() == open(tok_path, "rb").read()
  # A folder: each file a document, in sorted order; bytes with EOS 256.
  folder = tmp_path / "docs"
  (folder / "sub").mkdir(parents=True)
  (folder / "b.txt").write_text(docs[1])
  (folder / "a.txt").write_text(docs[0])
  (folder / "sub" / "c.txt").write_text(docs[2])
  assert train.main(["prepare", str(folder), str(tmp_path / "f.bin"), "--no-progress"]) == 0
  ids = np.fromfile(tmp_path / "f.bin", np.uint16)
  want = list(docs[0].encode()) + [256] + list(docs[1].encode()) + [256] + list(docs[2].encode())
  np.testing.assert_array_equal(ids, want)
  assert json.loads((tmp_path / "f.bin.json").read_text())["vocab_size"] == 257


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
  vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(str(tmp_path / "big.json"))
  (tmp_path / "a.txt").write_text("w69999 w5 w3\n")
  (tmp_path / "b.txt").write_text("w1 zz\n")
  assert prepare_lib.main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                           str(tmp_path / "o.bin"), "--tokenizer", str(tmp_path / "big.json"),
                           "--no-progress"]) == 0
  meta = json.loads((tmp_path / "o.bin.json").read_text())
  assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002 and meta["eos_id"] == 1
  np.testing.assert_array_equal(np.fromfile(tmp_path / "o.bin", np.uint32),
                                [70_001, 7, 5, 1, 3, 0])


def test_bad_input_is_one_line_and_leaves_nothing(bpe_corpus, tmp_path, capsys):
  d, _ = bpe_corpus
  tok_path = str(d / "s.bin.tokenizer.json")
  good = tmp_path / "good.jsonl"
  good.write_text('{"text": "a"}\n')

  def fails(*argv, match):
    out = tmp_path / "out.bin"
    assert prepare_lib.main([*map(str, argv), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == sorted(
        p for p in os.listdir(tmp_path) if not p.startswith("out.bin")), os.listdir(tmp_path)

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "a"}\n{"text": "b"\n')
  fails(bad, "--tokenizer", tok_path, "--jsonl-key", "text", match=f"{bad}:2: not a JSON line")
  fails(good, "--tokenizer", tok_path, "--jsonl-key", "body", match="no key 'body'")
  fails(good, "--tokenizer", str(tmp_path / "nope.json"), "--jsonl-key", "text",
        match="nope.json")
  fails(good, "--tokenizer", tok_path, "--jsonl-key", "text", "--eos-id", "900",
        match="--eos-id 900 is outside the vocabulary")
  fails(tmp_path / "missing.txt", match="missing.txt' does not exist")
  fails(good, "--train-bpe", "100", "--jsonl-key", "text", match="--train-bpe 100")
  assert not any(p.startswith("out.bin") for p in os.listdir(tmp_path))


def _cfg(*args):
  return load_config(None, ["log.progress=false", "log.tensorboard=false", *args])


def test_vocabulary_from_the_data(bpe_corpus):
  d, _ = bpe_corpus
  path = str(d / "s.bin")
  assert loop.resolve_vocab_size(_cfg("data.source=tokens", f"data.path={path}"), 256) == 500
  assert loop.resolve_vocab_size(_cfg("data.source=text", f"data.path={path}"), 128256) == 256
  assert loop.resolve_vocab_size(_cfg("data.source=tokens", f"data.path={path}",
                                      "model.vocab_size=512"), 256) == 512
  with pytest.raises(ValueError, match=r"model.vocab_size=300 is smaller than the data's "
                                       r"vocab_size 500 \(.*s.bin.json\)"):
    loop.resolve_vocab_size(_cfg("data.source=tokens", f"data.path={path}",
                                 "model.vocab_size=300"), 256)
  # Synthetic sources keep the preset's vocabulary unless the task needs more.
  assert loop.resolve_vocab_size(_cfg(), 256) == 256                    # tiny.yaml: MQAR 64
  assert loop.resolve_vocab_size(_cfg("data.mqar.vocab_size=1000"), 256) == 1000
  assert loop.resolve_vocab_size(_cfg("data.source=parity", "data.mqar.vocab_size=null"), 1) == 2
  with pytest.raises(ValueError, match="model.vocab_size=32 is smaller than the data's vocab_size "
                                       "64 .data.mqar.vocab_size=64."):
    loop.resolve_vocab_size(_cfg("model.vocab_size=32"), 256)


def test_train_py_reports_a_too_small_vocabulary_in_one_line(bpe_corpus, capsys, tmp_path):
  d, _ = bpe_corpus
  code = train.main([f"run_dir={tmp_path / 'r'}", "data.source=tokens", f"data.path={d / 's.bin'}",
                     "model.vocab_size=256", "log.progress=false"])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1
  assert "model.vocab_size=256 is smaller than the data's vocab_size 500" in err
  assert not (tmp_path / "r").exists()


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow
def test_bpe_end_to_end_train_sample_eval(bpe_corpus, tmp_path, capsys):
  """Train a few steps on the BPE corpus without setting vocab_size; sample from a text prompt;
  eval equals the training loop's eval and a per-document hand computation."""
  d, text = bpe_corpus
  run_dir = tmp_path / "run"
  summary = loop.run(config(run_dir, "data.source=tokens", f"data.path={d / 's.bin'}",
                            "log.eval_every=6", "log.eval_batches=2"))
  assert summary["model"]["vocab_size"] == 500
  assert (run_dir / "tokenizer.json").read_bytes() == (d / "s.bin.tokenizer.json").read_bytes()
  tok = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
  capsys.readouterr()
  assert train.main(["sample", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "8"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("ROMEO:") and len(out) > len("ROMEO:\n")
  # The same, ended at the first EOS: the longest prefix of the full sample that ends with one.
  assert train.main(["sample", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "40",
                     "--stop-at-eos"]) == 0
  short = capsys.readouterr().out.rstrip("\n")
  assert train.main(["sample", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "40"]) == 0
  full = capsys.readouterr().out.rstrip("\n")
  if "<|endoftext|>" in full:
    assert short == full[:full.index("<|endoftext|>") + len("<|endoftext|>")]
  else:
    assert short == full
  # eval --batches eval_batches: the training loop's last eval.
  res = eval_lib.evaluate(str(run_dir), batches=2)
  assert res["loss"] == pytest.approx(summary["evals"][-1]["loss"], rel=1e-5)
  assert res["perplexity"] == pytest.approx(np.exp(res["loss"]))
  # By hand: every document of every window run alone through the model (no segment_ids).
  from lasp_jax.train.sample import load_model
  model, cfg = load_model(str(run_dir))
  ids = np.fromfile(d / "s.bin", np.uint16).astype(np.int64)
  L, B = cfg.data.seq_len, cfg.data.batch_size
  nw = (len(ids) - 1) // L
  ne = max(int(round(nw * cfg.data.eval_fraction)), 1)
  first = nw - ne
  nll = count = nbytes = 0.0
  for e in range(2 * B):
    w = first + e % ne
    x = ids[w * L:w * L + L + 1]
    inputs, targets = x[:-1], x[1:]
    bounds = [0] + [i + 1 for i in np.flatnonzero(inputs == 0)] + [L]
    for a, b in zip(bounds[:-1], bounds[1:]):
      if a == b:
        continue
      doc = np.full(L, 1, np.int32)         # padded after the document: causal, no effect
      doc[:b - a] = inputs[a:b]
      logits = np.asarray(model(doc[None]), np.float64)[0]
      lp = _log_softmax(logits)
      for i in range(a, b):
        if inputs[i] != 0:
          nll -= lp[i - a, targets[i]]
          count += 1
          nbytes += len(tok.decode([int(targets[i])], skip_special_tokens=True).encode())
  assert res["tokens"] == count
  assert res["loss"] == pytest.approx(nll / count, rel=1e-4)
  # bits per byte: decoded bytes of the counted targets (a BPE's tokens are whole byte strings).
  assert res["bytes"] == pytest.approx(nbytes, rel=0.02)
  assert res["bits_per_byte"] == pytest.approx(nll / np.log(2) / res["bytes"], rel=1e-4)
  # The command line: a JSON line on stdout, the file beside it.
  assert train.main(["eval", str(run_dir), "--batches", "2", "--no-progress"]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert line["loss"] == pytest.approx(res["loss"], rel=1e-6)
  assert json.loads((run_dir / "eval_step6.json").read_text())["loss"] == line["loss"]


@pytest.mark.slow
def test_packed_byte_corpus_trains_and_samples_without_overrides(tmp_path, capsys):
  """Issue 24's first failure: prepare --split-blank-lines (vocab 257), train, sample --prompt."""
  (tmp_path / "s.txt").write_text(_head(20_000))
  assert train.main(["prepare", str(tmp_path / "s.txt"), str(tmp_path / "s.bin"),
                     "--split-blank-lines"]) == 0
  run_dir = tmp_path / "run"
  summary = loop.run(config(run_dir, "data.source=tokens", f"data.path={tmp_path / 's.bin'}"))
  assert summary["model"]["vocab_size"] == 257
  capsys.readouterr()
  assert train.main(["sample", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "10"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("ROMEO:")
  res = eval_lib.evaluate(str(run_dir))
  assert res["bytes"] == res["tokens"] and res["bits_per_byte"] == pytest.approx(
      res["loss"] / np.log(2))


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
  """README "Your own data": the bash block, with /tmp/ -> a temporary folder and the corpus from
  ../shared/data; the loss falls, eval prints perplexity, sample prints text."""
  import subprocess
  import sys
  text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
  section = text[text.index("### Your own data"):text.index("### Many hosts")]
  block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
  block = block.replace("data/tinyshakespeare.txt", SHAKESPEARE).replace("/tmp/", f"{tmp_path}/")
  script = os.path.join(REPO_ROOT, "train.py")
  block = block.replace("python train.py", f"{sys.executable} {script}")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "shakes_run" / "metrics.jsonl")
            if json.loads(l)["kind"] == "train"]
  assert losses[-1] < losses[0] - 0.5
  res = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
  assert res["perplexity"] == pytest.approx(np.exp(res["loss"])) and res["bits_per_byte"] > 0
  assert "ROMEO:" in r.stdout


def test_eval_data_must_match_the_runs_tokenizer(bpe_corpus, tmp_path):
  """``train.py eval --data``: a token file whose sidecar disagrees with the run is an error naming
  the sidecar and both values; a text file is encoded with the run's tokenizer."""
  from lasp_jax.train.tokenizer import ByteTokenizer, HFTokenizer
  d, text = bpe_corpus
  cfg = _cfg()
  with pytest.raises(ValueError, match=r"s.bin.json says vocab_size 500, but 'run' trained with a "
                                       r"tokenizer of vocab_size 257"):
    eval_lib.eval_tokens("run", cfg, ByteTokenizer(257, 256), str(d / "s.bin"))
  hf = HFTokenizer(str(d / "s.bin.tokenizer.json"), 3)
  with pytest.raises(ValueError, match="s.bin.json says eos_id 0, but 'run' trained with eos_id 3"):
    eval_lib.eval_tokens("run", cfg, hf, str(d / "s.bin"))
  (tmp_path / "t.txt").write_text("ROMEO: hi\n")
  ids, split, _ = eval_lib.eval_tokens("run", cfg, hf, str(tmp_path / "t.txt"))
  assert split == "all" and list(ids) == hf.tok.encode("ROMEO: hi\n").ids
  with pytest.raises(ValueError, match="--data 'nope' is not a file"):
    eval_lib.eval_tokens("run", cfg, hf, "nope")
