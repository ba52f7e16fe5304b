"""The tiny comparison run the training tests share: a data x sp mesh, zigzag layout, gradient
accumulation, a hybrid (one linear and one softmax layer); tiny everywhere."""

from lasp_jax.train import load_config

COMMON = ["steps=6", "checkpoint.every=100", "log.eval_every=0", "model.preset=tiny_hybrid",
          "model.d_model=32",
          "model.num_layers=2", "model.layer_pattern=LN", "model.layout=zigzag", "mesh.data=2",
          "mesh.sp=4", "model.chunk_size=8", "data.seq_len=64", "data.batch_size=2",
          "data.mqar.num_kv_pairs=4", "optim.grad_accum=2", "optim.warmup_steps=2"]
QUIET = ["log.progress=false", "log.tensorboard=false"]


def config(run_dir, *args):
  """The default config with ``COMMON`` applied, writing to ``run_dir``."""
  return load_config(None, [f"run_dir={run_dir}", *QUIET, *COMMON, *args])
