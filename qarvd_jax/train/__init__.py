"""Quantization-aware training at scale: sharded, multi-host, resumable (``qarvd quantize --method qat``).

Modules: :mod:`~qarvd_jax.train.config` (``QATConfig``), :mod:`~qarvd_jax.train.sharding` (mesh and
logical-axis rules), :mod:`~qarvd_jax.train.data` (prompt sources, per-process batches),
:mod:`~qarvd_jax.train.state` (train state, optimiser, Orbax checkpoints),
:mod:`~qarvd_jax.train.rollout` (teacher trajectories, distillation loss), :mod:`~qarvd_jax.train.qat`
(the train step and :func:`run_qat`).
"""

from qarvd_jax.train.config import QATConfig
from qarvd_jax.train.data import PromptDataset, PromptSource
from qarvd_jax.train.qat import QATResult, QATTrainer, initialize_distributed, run_qat
from qarvd_jax.train.sharding import make_mesh, parse_mesh_spec

__all__ = ["QATConfig", "PromptSource", "PromptDataset", "QATTrainer", "QATResult", "run_qat",
           "initialize_distributed", "make_mesh", "parse_mesh_spec"]
