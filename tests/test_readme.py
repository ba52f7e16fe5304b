"""Every ```python block of README.md runs as written (issue 23: the API section did not).

The convention (stated in the README): a ```python block is a complete script; a sketch that is
not meant to run is fenced otherwise (```text, ```bash). Each block runs in a fresh process from an
empty directory, without the test suite's device settings (a block that needs 8 simulated CPU
devices must set them itself, as a reader's script would), on CPU.
"""

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
# Blocks that take long (they compile many programs): in the slow run only, by their heading.
SLOW = {"Generate"}


def python_blocks():
  """``(heading of its section, code)`` of every ```python block, in README order."""
  text = open(README, encoding="utf-8").read()
  out = []
  for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
    headings = re.findall(r"^#+ (.+)$", text[:m.start()], flags=re.M)
    out.append((headings[-1] if headings else "top", m.group(1)))
  return out


def test_the_readme_has_the_runnable_blocks():
  assert [h for h, _ in python_blocks()] == ["The API on one page", "Generate"]


@pytest.mark.parametrize("heading,code", [
    pytest.param(h, c, id=h, marks=[pytest.mark.slow] if h in SLOW else [])
    for h, c in python_blocks()])
def test_readme_python_block_runs_verbatim(heading, code, tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, f"README block under {heading!r} failed:\n{p.stderr[-6000:]}"
