"""Prompt data for QAT: sources, per-process slices and deterministic batches by global step.

* Sources (:class:`PromptSource`): a text file (one prompt per line), a TFDS dataset (registered
  name or prepared directory; ``tensorflow-datasets`` is the optional ``tfds`` extra, imported
  lazily) or an in-memory list.
* Process slices: process ``p`` of ``P`` owns the contiguous prompt range
  ``[floor(p N / P), floor((p + 1) N / P))`` and reads only that range (TFDS: the split slice
  ``split[start:stop]``); its prompt embeddings come from the cached encoder (``Stack.embeds``), so
  the text encoder never runs inside training.
* Batches: the global batch of step ``s`` (0-based) is the concatenation over processes of each
  process's local batch of ``global_batch / P`` prompts. The local batch holds positions
  ``[s * B_local, (s + 1) * B_local)`` of an endless stream that visits the process's prompts in a
  fresh permutation every epoch (``numpy`` generator seeded by ``(seed, epoch, process)``). So the data
  position is a pure function of the step: resuming at step ``s`` replays exactly what an
  uninterrupted run would have read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

__all__ = ["PromptSource", "host_range", "count_prompts", "read_prompts_range", "PromptDataset",
           "check_batch_divisible"]


@dataclass(frozen=True)
class PromptSource:
    """Where prompts come from (exactly one of ``prompts_file``, ``tfds`` or ``prompts``).

    ``tfds``: a registered dataset name (``"my_captions"``, with ``tfds_data_dir``) or a directory made
    by ``tfds build`` (``builder_from_directory``); ``tfds_key`` is the text feature.
    ``max_prompts`` > 0 keeps only the first ``max_prompts`` prompts.
    """

    prompts_file: str | None = None
    tfds: str | None = None
    tfds_split: str = "train"
    tfds_key: str = "caption"
    tfds_data_dir: str | None = None
    prompts: tuple[str, ...] = ()
    max_prompts: int = 0

    def __post_init__(self):
        given = [n for n in ("prompts_file", "tfds", "prompts") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(f"PromptSource needs exactly one of prompts_file, tfds, prompts; got {given or 'none'}")
        object.__setattr__(self, "prompts", tuple(self.prompts))


def host_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """``[start, stop)`` of the prompts owned by ``process_index`` (contiguous, sizes differ by <= 1)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if n < process_count:
        raise ValueError(f"{n} prompts cannot be split over {process_count} processes (need >= 1 each)")
    return (process_index * n) // process_count, ((process_index + 1) * n) // process_count


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("reading prompts from TFDS needs tensorflow-datasets: pip install 'qarvd-jax[tfds]' "
                          "(or use --prompts FILE)") from e
    return tfds


def _tfds_builder(src: PromptSource):
    tfds = _tfds()
    if os.path.isdir(src.tfds):
        return tfds.builder_from_directory(src.tfds)
    return tfds.builder(src.tfds, data_dir=src.tfds_data_dir)


def _file_prompts(path: str) -> list[str]:
    from qarvd_jax.pipeline.text_to_video import read_prompts

    return read_prompts(path)


def count_prompts(src: PromptSource) -> int:
    """Number of prompts in the source (after ``max_prompts``)."""
    if src.prompts_file:
        n = len(_file_prompts(src.prompts_file))
    elif src.prompts:
        n = len(src.prompts)
    else:
        info = _tfds_builder(src).info
        if src.tfds_split not in info.splits:
            raise ValueError(f"TFDS {src.tfds}: no split {src.tfds_split!r} (has {sorted(info.splits)})")
        n = int(info.splits[src.tfds_split].num_examples)
    n = min(n, src.max_prompts) if src.max_prompts else n
    if n < 1:
        raise ValueError("the prompt source is empty")
    return n


def read_prompts_range(src: PromptSource, start: int, stop: int) -> list[str]:
    """Prompts ``[start, stop)`` of the source; TFDS reads only that slice of the split."""
    if src.prompts_file:
        return _file_prompts(src.prompts_file)[start:stop]
    if src.prompts:
        return list(src.prompts[start:stop])
    tfds = _tfds()
    ds = _tfds_builder(src).as_dataset(split=f"{src.tfds_split}[{start}:{stop}]", shuffle_files=False)
    out = []
    for ex in tfds.as_numpy(ds):
        if src.tfds_key not in ex:
            raise ValueError(f"TFDS {src.tfds}: no feature {src.tfds_key!r} (has {sorted(ex)}); set --tfds-key")
        v = ex[src.tfds_key]
        out.append((v.decode("utf-8") if isinstance(v, bytes) else str(v)).strip())
    return out


class PromptDataset:
    """One process's prompts and their embeddings, batched deterministically by global step.

    Args:
      ids: [n_local] global prompt indices owned by this process.
      embeds: [n_local, L, text_dim] their prompt embeddings (host numpy, held in memory), or None
        with ``prompts`` and ``embed_fn``: look each batch's embeddings up with ``embed_fn`` (e.g. the
        on-disk embedding cache, already filled) instead of holding them all.
      global_batch: videos per step over all processes (divisible by ``process_count``).
      seed: data-order seed.
    """

    def __init__(self, ids: np.ndarray, embeds: np.ndarray | None = None, *, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, prompts: Sequence[str] | None = None,
                 embed_fn: Callable[[list[str]], np.ndarray] | None = None):
        ids = np.asarray(ids, np.int32)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"need ids [n] with n >= 1, got shape {ids.shape}")
        if embeds is not None:
            embeds = np.asarray(embeds, np.float32)
            if embeds.ndim != 3 or embeds.shape[0] != len(ids):
                raise ValueError(f"need embeds [n={len(ids)}, L, D], got {embeds.shape}")
        elif prompts is None or embed_fn is None or len(prompts) != len(ids):
            raise ValueError("without embeds, give the prompts (one per id) and embed_fn")
        if global_batch % process_count:
            raise ValueError(f"batch_size={global_batch} is not divisible by the {process_count} processes")
        self.ids, self.embeds = ids, embeds
        self.prompts = None if prompts is None else list(prompts)
        self.embed_fn = embed_fn
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count

    @classmethod
    def from_source(cls, src: PromptSource, embed_fn: Callable[[list[str]], np.ndarray], *, global_batch: int,
                    seed: int, process_index: int | None = None, process_count: int | None = None,
                    preload: bool = True, warm_chunk: int = 64) -> "PromptDataset":
        """Read this process's slice of ``src`` and embed it with ``embed_fn`` (the cached encoder).

        ``preload``: keep every embedding in memory. Otherwise embed in chunks of ``warm_chunk`` now
        (filling the on-disk cache, so the encoder never runs during training) and look batches up
        with ``embed_fn`` each step.
        """
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        start, stop = host_range(count_prompts(src), pi, pc)
        prompts = read_prompts_range(src, start, stop)
        ids = np.arange(start, stop)
        if preload:
            return cls(ids, embed_fn(prompts), global_batch=global_batch, seed=seed, process_index=pi,
                       process_count=pc)
        for i in range(0, len(prompts), warm_chunk):
            embed_fn(prompts[i:i + warm_chunk])
        return cls(ids, None, global_batch=global_batch, seed=seed, process_index=pi, process_count=pc,
                   prompts=prompts, embed_fn=embed_fn)

    def __len__(self) -> int:
        return len(self.ids)

    def _perm(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, self.process_index])
        return rng.permutation(len(self.ids))

    def local_indices(self, step: int) -> np.ndarray:
        """Row indices into ``ids``/``embeds`` of this process's batch at 0-based ``step``."""
        n = len(self.ids)
        pos = step * self.local_batch + np.arange(self.local_batch)
        epochs, within = pos // n, pos % n
        perms = {int(e): self._perm(int(e)) for e in np.unique(epochs)}
        return np.asarray([perms[int(e)][w] for e, w in zip(epochs, within)], np.int64)

    def data_position(self, step: int) -> int:
        """Samples consumed by all processes before 0-based ``step``."""
        return step * self.global_batch

    def local_batch_arrays(self, step: int) -> dict[str, np.ndarray]:
        """``{"embeds": [B_local, L, D] float32, "prompt_id": [B_local] int32}``."""
        rows = self.local_indices(step)
        if self.embeds is not None:
            embeds = self.embeds[rows]
        else:
            embeds = np.asarray(self.embed_fn([self.prompts[r] for r in rows]), np.float32)
        return {"embeds": embeds, "prompt_id": self.ids[rows]}

    def global_batch_arrays(self, step: int, shardings: dict) -> dict[str, jax.Array]:
        """The step's global batch as arrays sharded by ``shardings`` (same keys), built from each
        process's local batch (``jax.make_array_from_process_local_data``)."""
        local = self.local_batch_arrays(step)
        out = {}
        for k, v in local.items():
            gshape = (self.global_batch, *v.shape[1:])
            out[k] = jax.make_array_from_process_local_data(shardings[k], v, gshape)
        return out


def check_batch_divisible(global_batch: int, mesh, batch_axes: Sequence[str]) -> None:
    """The global batch must split evenly over the batch mesh axes."""
    n = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
    if global_batch % n:
        up = -(-global_batch // n) * n
        raise ValueError(f"batch_size={global_batch} is not divisible by the {n} batch shards "
                         f"({' x '.join(f'{a}={mesh.shape[a]}' for a in batch_axes)}): use batch_size={up} "
                         f"(or another multiple of {n})")
