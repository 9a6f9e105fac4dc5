"""The testbed: a miniature Self-Forcing trained on procedural videos, so quantization results mean something
on a CPU. :mod:`~qarvd_jax.testbed.data` (clips and captions), :mod:`~qarvd_jax.testbed.score` (task score,
no learned weights), :mod:`~qarvd_jax.testbed.config` (architecture, sampler, weight loading),
:mod:`~qarvd_jax.testbed.train` (the training stages of ``scripts/train_testbed.py``). See docs/testbed.md."""
