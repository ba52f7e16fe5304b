"""What the install puts on the import path: only ``lasp_jax`` (issue: a top-level ``kernels``
package shadowed the Hugging Face ``kernels`` package that transformers probes for)."""

import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_the_project_namespace_is_installed(tmp_path):
  cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert cfg["tool"]["setuptools"]["packages"]["find"]["include"] == ["lasp_jax*"]
  assert not (ROOT / "kernels").exists(), "the kernels live in lasp_jax/kernels"
  # What a fresh interpreter outside the repository finds: this process's sys.path may hold test
  # additions (benchmarks/, whose kernels.py is a script, not an installed package).
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  origin = subprocess.run(
      [sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
       "print(s.origin if s and s.origin else '')"],
      cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
  if origin:   # someone else's `kernels` (e.g. Hugging Face's) is fine
    assert ROOT not in pathlib.Path(origin).resolve().parents, origin


def test_transformers_imports_qwen3_5_beside_lasp_jax():
  transformers = pytest.importorskip("transformers")
  import lasp_jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  if not hasattr(transformers, "Qwen3_5ForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5")
  from transformers import Qwen3_5ForCausalLM  # noqa: F401  pylint: disable=import-outside-toplevel
