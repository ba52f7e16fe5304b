"""``python train.py sample``: a tiny byte-level model trained a few steps on Shakespeare (on the
shared data x sp mesh of ``tests.train.runs``), restored on one device and sampled from; greedy
output checked against the argmax of the restored model's full forward pass."""

import os
import shutil

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

import train
from lasp_jax.train import loop
from lasp_jax.train.sample import load_model, main, sample_text
from tests.train.runs import config

from tests.data import SHAKESPEARE_REL as SHAKESPEARE  # noqa: E402  (relative to the repository root)
PROMPT = "ROMEO:"
N = 12


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """The shared tiny run (6 steps, tiny hybrid LN, zigzag, 2 x 4 mesh) on Shakespeare's bytes."""
  run_dir = tmp_path_factory.mktemp("text_run")
  summary = loop.run(config(run_dir, "data.source=text", f"data.path={SHAKESPEARE}"))
  assert summary["steps"] == 6 and summary["stopped_by"] is None
  return str(run_dir)


def _sample(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def _argmax_continuation(model, ids, n):
  """``n`` greedy ids after ``ids`` from full forward passes (no cache): the prompt so far padded
  on the right to one fixed length (causal: the padding does not change earlier logits)."""
  chunk = model.config.runtime.chunk_size
  length = -(-(len(ids) + n) // chunk) * chunk
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  ids = list(ids)
  for _ in range(n):
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(ids)] = ids
    ids.append(int(np.argmax(np.asarray(forward(state, tokens))[0, len(ids) - 1])))
  return ids


def test_greedy_text_is_the_argmax_continuation(text_run, capsys):
  code, out, err = _sample(capsys, text_run, "--prompt", PROMPT, "--max-new-tokens", str(N))
  assert code == 0, err
  assert "checkpoint step 6" in err and "greedy" in err
  assert out.endswith("\n") and out.startswith(PROMPT)
  model, cfg = load_model(text_run)
  assert cfg.data.source == "text" and model.config.vocab_size == 256
  ids = _argmax_continuation(model, list(PROMPT.encode()), N)
  new = bytes(ids[len(PROMPT):])
  assert len(new) == N
  expected = new.decode("utf-8", errors="replace")
  assert out == PROMPT + expected + "\n"
  assert sample_text(model, PROMPT, N) == expected
  # Greedy is deterministic; so is the command through train.py.
  assert train.main(["sample", text_run, "--prompt", PROMPT, "--max-new-tokens", str(N)]) == 0
  assert capsys.readouterr().out == out


def test_seeded_sampling_and_prompt_ids(text_run, capsys):
  args = [text_run, "--prompt", PROMPT, "--max-new-tokens", str(N), "--temperature", "1.0",
          "--top-k", "40"]
  a = _sample(capsys, *args, "--seed", "1")
  b = _sample(capsys, *args, "--seed", "1")
  c = _sample(capsys, *args, "--seed", "2")
  assert a[0] == b[0] == c[0] == 0, (a[2], c[2])
  assert a[1] == b[1] and a[1] != c[1]
  assert a[1].startswith(PROMPT)
  # Token ids in, the prompt's ids and N generated ones out: the same tokens as the text.
  code, out, err = _sample(capsys, text_run, "--prompt-ids", ",".join(map(str, PROMPT.encode())),
                           "--max-new-tokens", str(N))
  assert code == 0, err
  ids = [int(t) for t in out.strip().split(",")]
  assert len(ids) == len(PROMPT) + N and ids[:len(PROMPT)] == list(PROMPT.encode())
  greedy = _sample(capsys, text_run, "--prompt", PROMPT, "--max-new-tokens", str(N))[1]
  assert bytes(ids).decode("utf-8", errors="replace") + "\n" == greedy


def _fake_run(tmp_path, text_run, **changes):
  """A run directory holding only ``text_run``'s config.yaml with ``changes``
  (``{section: {key: value}}``): enough for the checks made before any checkpoint is read."""
  with open(os.path.join(text_run, "config.yaml"), encoding="utf-8") as f:
    saved = yaml.safe_load(f)
  for section, values in changes.items():
    saved[section].update(values)
  run_dir = tmp_path / "_".join(changes)
  run_dir.mkdir()
  with open(run_dir / "config.yaml", "w", encoding="utf-8") as f:
    yaml.safe_dump(saved, f)
  return str(run_dir)


def test_errors_exit_2_with_a_message(text_run, tmp_path, capsys):
  def fails(*argv, match):
    code, out, err = _sample(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    assert match in err, err

  fails(str(tmp_path / "missing"), "--prompt", "a", match="does not exist")
  fails(str(tmp_path), "--prompt", "a", match="config.yaml")
  fails(text_run, "--prompt", "a", "--prompt-ids", "1", match="not allowed with")
  fails(text_run, "--max-new-tokens", "3", match="one of the arguments --prompt --prompt-ids")
  fails(text_run, "--prompt-ids", "1,256", match="token id 256 is outside")
  fails(text_run, "--prompt-ids", "1,x", match="'x' is not an integer")
  fails(text_run, "--prompt", "", match="the prompt is empty")
  fails(text_run, "--prompt", "a", "--temperature", "-1", match="--temperature")
  fails(text_run, "--prompt", "a", "--temperature", "1", "--top-k", "300", match="--top-k 300")
  fails(text_run, "--prompt", "a", "--step", "5", match="no checkpoint")
  # --prompt needs a text run whose tokenizer fits the model.
  fails(_fake_run(tmp_path, text_run, resolved_model={"vocab_size": 200}), "--prompt", "a",
        match="vocab_size 256, more than the model's vocab_size 200")
  fails(_fake_run(tmp_path, text_run, data={"source": "mqar"}), "--prompt", "a",
        match="synthetic mqar")
  # A run directory whose checkpoints are gone.
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  shutil.copy(os.path.join(text_run, "config.yaml"), no_ckpt)
  fails(str(no_ckpt), "--prompt", "a", match="no checkpoints")
  assert not (no_ckpt / "checkpoints").exists()        # looking created nothing
  (no_ckpt / "checkpoints").mkdir()
  fails(str(no_ckpt), "--prompt-ids", "1", match="no checkpoints")
  # --help exits 0 and says what is printed.
  code, out, _ = _sample(capsys, "--help")
  assert code == 0 and "prompt followed by the continuation" in " ".join(out.split())
