"""Teacher trajectories and the student's distillation loss on the KV-cache inference path.

Why ``forward_chunk`` and not the training-path ``__call__``: the deployed quantized model runs
``forward_chunk`` against a KV cache written by its *own* context passes (clean x0 at
``context_noise``), with RoPE at absolute frame positions. Training that exact path (a) sees the
quantization error that accumulates in the KV cache over chunks, and (b) conditions every chunk on
clean context, as inference does. ``__call__`` with the block-causal mask on one noisy sequence
conditions chunk k on *noisy* earlier chunks, a different distribution, and reproducing inference
with it needs a doubled clean+noisy sequence whose RoPE offsets the model does not expose.

Per video (all arrays batched over B; K chunks of Fc frames, S denoising steps):

* :meth:`Distiller.teacher_rollout`: the full-precision model generates the video exactly as
  ``CausalInferencePipeline`` does (pass 0 from noise, pass s re-noises the previous x0 to tau_s,
  pass S is the context pass), recording each pass's input ``x_t`` and flow: ``inputs``/``flows``
  [K, S+1, B, Fc, C, H, W]. No gradient.
* :meth:`Distiller.student_loss`: the quantized model replays the teacher's inputs chunk by chunk
  with its own cross-attention K/V and KV cache (its context pass consumes the teacher's clean x0),
  so gradients flow through the cache into earlier chunks. Loss::

      L = 1/(K S) * sum_k omega_k * sum_{s<S} mean((y_student[k,s] - y_teacher[k,s])^2)

  with y the flow (``target="flow"``) or x0 (``target="x0"``) and omega the chunk weights (mean 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.pipeline import scheduler as sch
from qarvd_jax.pipeline.causal_inference import InferenceConfig

__all__ = ["Trajectory", "Distiller"]


@jax.tree_util.register_dataclass
@dataclass
class Trajectory:
    """Teacher data of a batch: ``inputs``/``flows`` [K, S+1, B, Fc, C, H, W] (compute dtype)."""

    inputs: jax.Array
    flows: jax.Array


class Distiller:
    """The rollout and loss functions of one model structure and geometry (pure; jit them).

    Args:
      graphdef: the quantized model's graph (from ``nnx.split``); states are passed per call as a
        tuple merged with it (teacher: flags off; student: flags on).
      model_config: its ``WanDiTConfig`` (compute dtype, chunk size, patch size).
      latent_shape: (F, C, h, w) of one video.
      sampler: the pipeline's :class:`InferenceConfig` (timesteps, shift, context noise).
      omega: [K] chunk weights (mean 1), or None for ones.
      target: "flow" or "x0"; remat: rematerialise each student model call in the backward pass.
      batch_constraint: optional ``NamedSharding``-producing ``ndim -> sharding`` for batch-leading
        arrays (noise, caches); None: no constraints.
    """

    def __init__(self, graphdef, model_config, latent_shape, sampler: InferenceConfig, *, omega=None,
                 target: str = "flow", remat: bool = True, batch_constraint=None):
        cfg = model_config
        self.graphdef = graphdef
        self.model_config = cfg
        self.latent_shape = tuple(int(s) for s in latent_shape)
        f, _, h, w = self.latent_shape
        self.chunk_frames = cfg.num_frame_per_block
        if f % self.chunk_frames:
            raise ValueError(f"{f} latent frames is not a multiple of the chunk size {self.chunk_frames}")
        self.num_chunks = f // self.chunk_frames
        self.frame_seq_length = cfg.frame_seq_length(h, w)
        self.dtype = jnp.dtype(cfg.dtype)
        self.tables = sampler.tables()
        self.timesteps = np.asarray(sampler.timesteps(), np.float32)
        self.context_noise = float(sampler.context_noise)
        self.num_steps = int(self.timesteps.shape[0])
        if omega is None:
            omega = np.ones(self.num_chunks, np.float32)
        omega = np.asarray(omega, np.float32)
        if omega.shape != (self.num_chunks,):
            raise ValueError(f"{omega.shape[0]} chunk weights for {self.num_chunks} chunks: the sensitivity file "
                             f"was measured with another number of frames")
        self.omega = omega
        if target not in ("flow", "x0"):
            raise ValueError(f"target must be 'flow' or 'x0', got {target!r}")
        self.target = target
        self.remat = remat
        self.batch_constraint = batch_constraint

    # ------------------------------------------------------------------------------ helpers
    def _constrain(self, tree, batch: int):
        if self.batch_constraint is None:
            return tree

        def one(x):
            if x.ndim >= 1 and x.shape[0] == batch:
                return jax.lax.with_sharding_constraint(x, self.batch_constraint(x.ndim))
            return x

        return jax.tree.map(one, tree)

    def _call(self, states, x, t, cross, cache, start):
        """One ``forward_chunk``: x [B, Fc, C, H, W], t [B, Fc] -> (flow, cache)."""
        model = nnx.merge(self.graphdef, *states)
        return model.forward_chunk(x, t, cross, cache, start)

    def _cross(self, states, embeds):
        return nnx.merge(self.graphdef, *states).cross_kv(embeds)

    def _init_cache(self, states, batch: int):
        model = nnx.merge(self.graphdef, *states)
        cache = model.init_cache(batch, self.latent_shape[0], self.frame_seq_length, dtype=self.dtype)
        return self._constrain(cache, batch)

    def _taus(self) -> jax.Array:
        return jnp.concatenate([jnp.asarray(self.timesteps), jnp.full((1,), self.context_noise, jnp.float32)])

    def _x0(self, flow, x_in, tau):
        t = jnp.full(x_in.shape[:2], tau, jnp.float32)
        return sch.flow_to_x0(flow, x_in, t, self.tables)

    # ------------------------------------------------------------------------------ noise
    def sample_noise(self, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-video standard-normal draws from typed keys [B] (one ``normal`` call per video, split):
        initial noise [B, F, C, H, W] and the re-noising draws [K, S-1, B, Fc, C, H, W]."""
        f, c, h, w = self.latent_shape
        fc, s1, k = self.chunk_frames, self.num_steps - 1, self.num_chunks
        n0, n1 = f * c * h * w, k * s1 * fc * c * h * w

        def one(key):
            flat = jax.random.normal(key, (n0 + n1,), self.dtype)
            return flat[:n0].reshape(f, c, h, w), flat[n0:].reshape(k, s1, fc, c, h, w)

        noise, draws = jax.vmap(one)(keys)  # [B, F, ...], [B, K, S-1, Fc, ...]
        b = noise.shape[0]
        return self._constrain(noise, b), jnp.moveaxis(draws, 0, 2)

    # ------------------------------------------------------------------------------ teacher
    def teacher_rollout(self, states, embeds: jax.Array, noise: jax.Array, renoise: jax.Array) -> Trajectory:
        """Generate with ``states`` (full precision) and record every pass. embeds [B, Lc, text_dim];
        noise [B, F, C, H, W]; renoise [K, S-1, B, Fc, C, H, W]."""
        b = noise.shape[0]
        fc, steps = self.chunk_frames, self.num_steps
        taus = self._taus()
        cross = self._cross(states, embeds)
        chunks = jnp.moveaxis(noise.reshape(b, self.num_chunks, fc, *noise.shape[2:]), 1, 0)  # [K, B, Fc, ...]

        def chunk(cache, xs):
            ci, chunk_noise, draws = xs
            start = (ci * fc * self.frame_seq_length).astype(jnp.int32)
            eps = jnp.concatenate([jnp.zeros_like(chunk_noise)[None], draws, jnp.zeros_like(chunk_noise)[None]])

            def one_pass(carry, inp):
                x0_prev, cache = carry
                s, tau, eps_s = inp
                renoised = sch.add_noise(x0_prev, eps_s, tau, self.tables)
                x_in = jnp.where(s == 0, chunk_noise, jnp.where(s == steps, x0_prev, renoised)).astype(self.dtype)
                t = jnp.full((b, fc), tau, jnp.float32)
                flow, cache = self._call(states, x_in, t, cross, cache, start)
                x0 = sch.flow_to_x0(flow, x_in, t, self.tables).astype(self.dtype)
                return (jnp.where(s == steps, x0_prev, x0), cache), (x_in, flow)

            (_, cache), (inputs, flows) = jax.lax.scan(one_pass, (jnp.zeros_like(chunk_noise), cache),
                                                       (jnp.arange(steps + 1), taus, eps))
            return cache, (inputs, flows)

        _, (inputs, flows) = jax.lax.scan(chunk, self._init_cache(states, b),
                                          (jnp.arange(self.num_chunks), chunks, renoise))
        return jax.lax.stop_gradient(Trajectory(inputs, flows))

    # ------------------------------------------------------------------------------ student
    def student_loss(self, trainable, frozen, embeds: jax.Array, traj: Trajectory):
        """Chunk-weighted distillation loss of the quantized model on the teacher's trajectory.

        Returns ``(loss [], aux)`` with aux ``{"chunk_loss": [K] unweighted per-chunk MSE}``.
        """
        states = (trainable, frozen)
        b = embeds.shape[0]
        fc, steps = self.chunk_frames, self.num_steps
        taus = self._taus()
        cross = self._cross(states, embeds)
        call = jax.checkpoint(self._call) if self.remat else self._call

        def chunk(cache, xs):
            ci, inputs, flows = xs
            start = (ci * fc * self.frame_seq_length).astype(jnp.int32)

            def one_pass(cache, inp):
                x_in, tau, y_flow = inp
                t = jnp.full((b, fc), tau, jnp.float32)
                flow, cache = call(states, x_in, t, cross, cache, start)
                pred, ref = flow.astype(jnp.float32), y_flow.astype(jnp.float32)
                if self.target == "x0":
                    pred, ref = self._x0(pred, x_in, tau), self._x0(ref, x_in, tau)
                return cache, jnp.mean(jnp.square(pred - ref))

            cache, errs = jax.lax.scan(one_pass, cache, (inputs, taus, flows))
            return cache, jnp.mean(errs[:steps])  # the context pass only feeds the cache

        _, chunk_loss = jax.lax.scan(chunk, self._init_cache(states, b),
                                     (jnp.arange(self.num_chunks), traj.inputs, traj.flows))
        loss = jnp.sum(jnp.asarray(self.omega) * chunk_loss) / self.num_chunks
        return loss, {"chunk_loss": chunk_loss}

