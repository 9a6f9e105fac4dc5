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
  ``CausalInferencePipeline`` does (pass 0 from noise, pass s re-noises the previous x0 to tau_s with
  the sampler's noise, fresh draws or the implied noise of ``euler``; pass S is the context pass; with
  ``guidance_scale`` != 1 the trajectory follows the classifier-free-guided flow), recording each pass's
  input ``x_t`` and (conditional) flow: ``inputs``/``flows`` [K, S+1, B, Fc, C, H, W]. No gradient.
* The student replays the teacher's inputs chunk by chunk with its own cross-attention K/V and KV
  cache (its context pass consumes the teacher's clean x0). Loss::

      L = 1/(K S) * sum_k omega_k * sum_{s<S} mean((y_student[k,s] - y_teacher[k,s])^2)

  with y the flow (``target="flow"``) or x0 (``target="x0"``) and omega the chunk weights (mean 1).

Two gradients of that loss (``rollout_gradient``):

* ``per_call`` (default, :meth:`Distiller.student_loss_and_grad`): the gradient goes through one model
  call at a time. The KV cache each call reads enters with ``stop_gradient`` (the context pass runs
  forward only and just refreshes the cache), as in Self-Forcing's and QVGen's training. Each of the
  K x S denoising calls is differentiated inside the scans and its gradient accumulated, so memory is
  that of one call (with per-block rematerialisation: the 30 block inputs plus one block's
  recompute), not of the rollout. The cross-attention K/V gradient is accumulated over calls and
  pulled back through the text projections once.
* ``full`` (:meth:`Distiller.student_loss`): backpropagation through the whole rollout; gradients also
  flow through the student's cache into later chunks. Memory grows with every call (about 6 GB per
  call at the real 1.3B geometry); for small models and cache-error studies.

In ``per_call`` mode the transformer blocks run from stacked per-block states under ``lax.scan``
(``scan_layers``; :class:`qarvd_jax.models.wan.model.BlockStack`), which also keeps the compiled
program small; the model's parameter tree (``blocks.<i>``) is unchanged. The train step keeps the
gradient stacked and runs the optimiser update on the stacked leaves too (:meth:`Distiller.stack_state`,
:meth:`Distiller.stacked_loss_and_grad`; one update per leaf *type*, not per layer and leaf), so the
compiled step barely grows with the number of layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.models.wan import kv_cache as kvc
from qarvd_jax.models.wan.model import BlockStack
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
      target: "flow" or "x0"; remat: rematerialise in the backward pass (``per_call``: each block,
        with ``remat_policy``; ``full``: each whole model call).
      batch_constraint: optional ``NamedSharding``-producing ``ndim -> sharding`` for batch-leading
        arrays (noise, caches); None: no constraints.
      rollout_gradient: ``"per_call"`` or ``"full"`` (module docstring).
      block_plan: :func:`qarvd_jax.models.wan.model.block_stack_plan` of the model (required for
        ``per_call``); one graphdef: blocks stacked and scanned (unless ``scan_layers`` is false).
      remat_policy: name of a ``jax.checkpoint_policies`` entry (default ``nothing_saveable``).
      activation_sharding: optional ``(logical axes, shape) -> NamedSharding``
        (:func:`qarvd_jax.train.sharding.activation_sharding`): block activations, q/k/v, the FFN hidden
        and the stacked KV caches are constrained to ``batch`` / ``context`` / ``heads`` / ``mlp``.
      step_context: (``per_call``) write the pass and chunk index into every ``step_index`` /
        ``chunk_index`` leaf of the frozen state before each student call, as the pipeline does
        (per-timestep quantizers of :mod:`qarvd_jax.quant.methods`); cross-attention K/V: step 0.
    """

    def __init__(self, graphdef, model_config, latent_shape, sampler: InferenceConfig, *, omega=None,
                 target: str = "flow", remat: bool = True, batch_constraint=None, rollout_gradient: str = "full",
                 block_plan=None, scan_layers: bool = True, remat_policy: str = "nothing_saveable",
                 activation_sharding=None, step_context: bool = False):
        cfg = model_config
        self.step_context = step_context
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
        self.euler = sampler.sampler == "euler"  # the teacher re-noises with its implied noise (pipeline's euler)
        self.guidance_scale = float(sampler.guidance_scale)  # teacher steps with the guided flow
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
        if rollout_gradient not in ("per_call", "full"):
            raise ValueError(f"rollout_gradient must be 'per_call' or 'full', got {rollout_gradient!r}")
        self.rollout_gradient = rollout_gradient
        if rollout_gradient == "per_call" and block_plan is None:
            raise ValueError("rollout_gradient='per_call' needs the model's block_plan")
        self.num_layers = cfg.num_layers
        if block_plan is not None and len(block_plan) == 1 and not scan_layers:
            block_plan = tuple(block_plan) * cfg.num_layers  # same graph, Python loop
        self.block_plan = None if block_plan is None else tuple(block_plan)
        if not hasattr(jax.checkpoint_policies, remat_policy):
            raise ValueError(f"unknown remat_policy {remat_policy!r} (a name in jax.checkpoint_policies)")
        self.remat_policy = getattr(jax.checkpoint_policies, remat_policy) if remat else None
        self.activation_sharding = activation_sharding

    # ------------------------------------------------------------------------------ helpers
    def _constrain(self, tree, batch: int):
        if self.batch_constraint is None:
            return tree

        def one(x):
            if x.ndim >= 1 and x.shape[0] == batch:
                return jax.lax.with_sharding_constraint(x, self.batch_constraint(x.ndim))
            return x

        return jax.tree.map(one, tree)

    _LOGICAL = {"hidden": ("batch", None, "context", "embed"), "heads": ("batch", "context", "heads", None),
                "mlp": ("batch", "context", "mlp")}

    def _constrain_activation(self, kind: str, x):
        return jax.lax.with_sharding_constraint(x, self.activation_sharding(self._LOGICAL[kind], x.shape))

    def _constrain_stacked(self, cache: kvc.KVCache, batch: int) -> kvc.KVCache:
        """Batch (and heads) sharding of stacked [L, B, T, H, D] cache arrays."""
        if self.activation_sharding is not None:
            one = lambda x: jax.lax.with_sharding_constraint(
                x, self.activation_sharding((None, "batch", None, "heads", None), x.shape))
            return kvc.KVCache(k=one(cache.k), v=one(cache.v), global_end=cache.global_end,
                               local_end=cache.local_end)
        if self.batch_constraint is None:
            return cache
        from jax.sharding import NamedSharding, PartitionSpec

        def one(x):
            base = self.batch_constraint(x.ndim - 1)
            return jax.lax.with_sharding_constraint(x, NamedSharding(base.mesh, PartitionSpec(None, *base.spec)))

        return kvc.KVCache(k=one(cache.k), v=one(cache.v), global_end=cache.global_end, local_end=cache.local_end)

    # -------------------------------------------------------------------- stacked blocks (per_call)
    @property
    def scanned(self) -> bool:
        return self.block_plan is not None and len(self.block_plan) == 1

    def _split_blocks(self, state):
        """``nnx.State`` -> (the state without ``blocks``, per-block states stacked or as a list)."""
        rest = nnx.State({k: v for k, v in state.items() if k != "blocks"})
        if "blocks" not in state:
            return rest, None
        blocks = [state["blocks"][i] for i in range(self.num_layers)]
        if self.scanned:
            blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
        return rest, blocks

    def _block_list(self, blocks, placeholders: bool = False):
        """Stacked blocks -> per-layer states; ``placeholders``: layer 0's slice in every slot (for a model
        whose own blocks are never called: one slice per leaf to trace, not one per layer)."""
        if blocks is None or not self.scanned:
            return blocks
        if placeholders:
            first = jax.tree.map(lambda x: jax.lax.index_in_dim(x, 0, keepdims=False), blocks)
            return [jax.tree.map(lambda x: x, first) for _ in range(self.num_layers)]
        return [jax.tree.map(lambda x, i=i: jax.lax.index_in_dim(x, i, keepdims=False), blocks)
                for i in range(self.num_layers)]

    def _join_blocks(self, rest, blocks, placeholders: bool = False):
        """Inverse of :meth:`_split_blocks` (stacked blocks are sliced per layer)."""
        d = dict(rest.items())
        if blocks is not None:
            d["blocks"] = nnx.State(dict(enumerate(self._block_list(blocks, placeholders))))
        return nnx.State(d)

    def stack_state(self, state):
        """(scanned blocks) ``state`` with ``blocks`` as one state of stacked [L, ...] leaves instead of
        ``blocks.<i>``: the layout of the train step's optimiser update (one update per stacked leaf
        instead of one per layer keeps the compiled step's size independent of the number of layers)."""
        if not self.scanned:
            raise ValueError("stack_state needs stacked (scanned) blocks")
        rest, blocks = self._split_blocks(state)
        return nnx.State({**dict(rest.items()), **({} if blocks is None else {"blocks": blocks})})

    def unstack_state(self, state, like=None):
        """Inverse of :meth:`stack_state`; ``like``: a per-layer tree whose exact structure to return."""
        rest = nnx.State({k: v for k, v in state.items() if k != "blocks"})
        out = self._join_blocks(rest, state["blocks"] if "blocks" in state else None)
        return out if like is None else jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(out))

    def _bind(self, rests, stacks, remat: bool):
        """(model, BlockStack) from split states; the model's own blocks are unused placeholders."""
        model = nnx.merge(self.graphdef, *(self._join_blocks(r, b, placeholders=True) for r, b in zip(rests, stacks)))
        states = tuple(b if b is not None else (nnx.State({}) if self.scanned else [nnx.State({})] * self.num_layers)
                       for b in stacks)
        cons = self._constrain_activation if self.activation_sharding is not None else None
        return model, BlockStack(self.block_plan, states, self.remat_policy if remat else None, cons)

    def _init_stacked_cache(self, batch: int) -> kvc.KVCache:
        cfg = self.model_config
        length = kvc.cache_len_tokens(cfg.local_attn_size, self.latent_shape[0], self.frame_seq_length)
        shape = (cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim)
        cache = kvc.KVCache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                            global_end=jnp.zeros((), jnp.int32), local_end=jnp.zeros((), jnp.int32))
        return self._constrain_stacked(cache, batch)

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
        guided = self.guidance_scale != 1.0  # [conditional; unconditional (zeros)] batch of 2B, as the pipeline
        both = jnp.concatenate([embeds, jnp.zeros_like(embeds)]) if guided else embeds
        nb = both.shape[0]
        if self.block_plan is not None:  # blocks from stacked states (scan), stacked cache
            rests, stacks = zip(*(self._split_blocks(st) for st in states))
            model, blocks = self._bind(rests, stacks, remat=False)
            cross = model.cross_kv(both, blocks=blocks)
            call = lambda _s, x, t, cr, cache, start: model.forward_chunk(x, t, cr, cache, start, blocks=blocks)
            cache0 = self._init_stacked_cache(nb)
        else:
            cross = self._cross(states, both)
            call, cache0 = self._call, self._init_cache(states, nb)
        chunks = jnp.moveaxis(noise.reshape(b, self.num_chunks, fc, *noise.shape[2:]), 1, 0)  # [K, B, Fc, ...]

        def chunk(cache, xs):
            ci, chunk_noise, draws = xs
            start = (ci * fc * self.frame_seq_length).astype(jnp.int32)
            eps = jnp.concatenate([jnp.zeros_like(chunk_noise)[None], draws, jnp.zeros_like(chunk_noise)[None]])

            def one_pass(carry, inp):
                x0_prev, eps_prev, cache = carry
                s, tau, eps_s = inp
                if self.euler:  # the noise the previous pass implies: an Euler step of the flow ODE
                    eps_s = eps_prev
                renoised = sch.add_noise(x0_prev, eps_s, tau, self.tables)
                x_in = jnp.where(s == 0, chunk_noise, jnp.where(s == steps, x0_prev, renoised)).astype(self.dtype)
                t = jnp.full((b, fc), tau, jnp.float32)
                if guided:  # the student's target is the conditional flow; the trajectory follows the guided one
                    out, cache = call(states, jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t]), cross, cache,
                                      start)
                    flow = out[:b]
                    step_flow = sch.guided_flow(flow, out[b:], self.guidance_scale)
                else:
                    flow, cache = call(states, x_in, t, cross, cache, start)
                    step_flow = flow
                x0 = sch.flow_to_x0(step_flow, x_in, t, self.tables).astype(self.dtype)
                eps_next = ((x0.astype(jnp.float32) + step_flow.astype(jnp.float32)).astype(self.dtype)
                            if self.euler else eps_prev)  # self_forcing: unused, not computed
                return (jnp.where(s == steps, x0_prev, x0), eps_next, cache), (x_in, flow)

            init = (jnp.zeros_like(chunk_noise), jnp.zeros_like(chunk_noise), cache)
            (_, _, cache), (inputs, flows) = jax.lax.scan(one_pass, init, (jnp.arange(steps + 1), taus, eps))
            return cache, (inputs, flows)

        _, (inputs, flows) = jax.lax.scan(chunk, cache0, (jnp.arange(self.num_chunks), chunks, renoise))
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


    def student_loss_and_grad(self, trainable, frozen, embeds: jax.Array, traj: Trajectory):
        """The ``per_call`` objective: loss, aux and its gradient w.r.t. ``trainable``.

        Same loss as :meth:`student_loss`; the gradient treats the KV cache each call reads as a
        constant (``stop_gradient``) and is accumulated call by call inside the scans (no
        backpropagation through the rollout). The context pass runs forward only.

        Returns ``((loss [], aux), grads)`` with aux ``{"chunk_loss": [K]}`` and grads like ``trainable``.
        """
        (loss, aux), g_diff = self._loss_and_grad(self._split_blocks(trainable), frozen, embeds, traj)
        leaves = jax.tree.leaves(self._join_blocks(*g_diff))  # same key order as trainable
        grads = jax.tree.unflatten(jax.tree.structure(trainable),
                                   [g.astype(x.dtype) for g, x in zip(leaves, jax.tree.leaves(trainable), strict=True)])
        return (loss, aux), grads

    def stacked_loss_and_grad(self, stacked, frozen, embeds: jax.Array, traj: Trajectory):
        """:meth:`student_loss_and_grad` of a :meth:`stack_state` trainable; grads stacked the same way."""
        rest = nnx.State({k: v for k, v in stacked.items() if k != "blocks"})
        (loss, aux), g_diff = self._loss_and_grad((rest, stacked["blocks"] if "blocks" in stacked else None),
                                                  frozen, embeds, traj)
        g_rest, g_blocks = g_diff
        g = nnx.State({**dict(g_rest.items()), **({} if g_blocks is None else {"blocks": g_blocks})})
        grads = jax.tree.unflatten(jax.tree.structure(stacked), [x.astype(p.dtype) for x, p in zip(
            jax.tree.leaves(g), jax.tree.leaves(stacked), strict=True)])
        return (loss, aux), grads

    def _loss_and_grad(self, diff, frozen, embeds: jax.Array, traj: Trajectory):
        """The per-call objective of split trainable states ``diff = (rest, blocks)``: ``((loss, aux),
        float32 gradients of diff)``."""
        b = embeds.shape[0]
        fc, steps = self.chunk_frames, self.num_steps
        taus = self._taus()
        fr_rest, fr_blocks = self._split_blocks(frozen)

        def bind(d, remat, ctx=None):
            fr = (fr_rest, fr_blocks)
            if ctx is not None and self.step_context:
                from qarvd_jax.pipeline.causal_inference import with_step_context

                fr = with_step_context(fr, *ctx)
            return self._bind((d[0], fr[0]), (d[1], fr[1]), remat)

        def cross_fn(d):
            model, blocks = bind(d, False)
            return model.cross_kv(embeds, blocks=blocks)

        cross, cross_vjp = jax.vjp(cross_fn, diff)

        def call_loss(d, cross, cache, x_in, tau, y_flow, start, weight, ctx):
            model, blocks = bind(d, True, ctx)
            t = jnp.full((b, fc), tau, jnp.float32)
            flow, new_cache = model.forward_chunk(x_in, t, cross, cache, start, blocks=blocks)
            pred, ref = flow.astype(jnp.float32), y_flow.astype(jnp.float32)
            if self.target == "x0":
                pred, ref = self._x0(pred, x_in, tau), self._x0(ref, x_in, tau)
            mse = jnp.mean(jnp.square(pred - ref))
            return weight * mse, (mse, jax.lax.stop_gradient(new_cache))

        grad_call = jax.value_and_grad(call_loss, argnums=(0, 1), has_aux=True)

        def context_call(cache, x_in, tau, start, ctx):
            model, blocks = bind(diff, False, ctx)
            t = jnp.full((b, fc), tau, jnp.float32)
            return model.forward_chunk(x_in, t, cross, cache, start, blocks=blocks)[1]

        f32 = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
        add = lambda acc, g: jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)
        omega = jnp.asarray(self.omega)
        scale = 1.0 / (self.num_chunks * steps)

        def chunk(carry, xs):
            ci, inputs, flows = xs
            start = (ci * fc * self.frame_seq_length).astype(jnp.int32)
            weight = omega[ci] * scale

            def one_pass(carry, inp):
                cache, g_diff, g_cross = carry
                x_in, tau, y_flow, s = inp
                (_, (mse, cache)), (gd, gc) = grad_call(diff, cross, jax.lax.stop_gradient(cache), x_in, tau, y_flow,
                                                        start, weight, (s, ci))
                return (cache, add(g_diff, gd), add(g_cross, gc)), mse

            carry, errs = jax.lax.scan(one_pass, carry, (inputs[:steps], taus[:steps], flows[:steps],
                                                         jnp.arange(steps)))
            cache, g_diff, g_cross = carry
            cache = context_call(cache, inputs[steps], taus[steps], start, (steps, ci))  # forward only: refresh
            return (cache, g_diff, g_cross), jnp.mean(errs)

        init = (self._init_stacked_cache(b), f32(diff), f32(cross))
        (_, g_diff, g_cross), chunk_loss = jax.lax.scan(chunk, init, (jnp.arange(self.num_chunks), traj.inputs,
                                                                        traj.flows))
        (g_from_cross,) = cross_vjp(jax.tree.map(lambda g, c: g.astype(c.dtype), g_cross, cross))
        loss = jnp.sum(omega * chunk_loss) / self.num_chunks
        return (loss, {"chunk_loss": chunk_loss}), add(g_diff, g_from_cross)
