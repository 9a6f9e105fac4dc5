"""Task score of a testbed video, with no learned weights: does it show the caption?

Per frame, the background colour is the median of the 2-pixel border; the object is the largest
connected region that differs from it (first by a fixed RGB distance, then at half the region's own
contrast, so anti-aliased edges count half). Three parts, each in [0, 1]:

* ``colour``: fraction of frames whose object colour (median of the region, one pixel eroded) is, of
  the palette :data:`~qarvd_jax.testbed.data.COLOURS`, nearest to the caption's colour;
* ``shape``: fraction of frames whose fill ratio (area / bounding-box area) is nearest to the caption
  shape's (square 1, circle pi/4, triangle 1/2);
* ``direction``: 1 if the centroid's net displacement (median of the last quarter minus the first
  quarter of the frames where the object is found) points along the caption's direction by at least
  ``min_travel`` pixels and more than across it, else 0.

``task_score`` is their mean. Frames without an object count as wrong for colour and shape;
``presence`` (the fraction of frames with an object) is reported beside them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from qarvd_jax.testbed.data import COLOURS, DIRECTIONS, FILL_RATIO, Caption

__all__ = ["PARTS", "score_video", "score_videos", "score_folder", "is_testbed_folder"]

PARTS = ("colour", "shape", "direction")
_FIRST_THRESHOLD = 48.0  # RGB distance from the background that certainly is object (gradients stay below ~30)


def _object_mask(frame: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Largest region differing from the border colour: ``(mask [H, W] bool or None, background RGB)``."""
    f = frame.astype(np.float32)
    border = np.concatenate([f[:2].reshape(-1, 3), f[-2:].reshape(-1, 3), f[:, :2].reshape(-1, 3),
                             f[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    diff = np.linalg.norm(f - bg, axis=-1)
    mask = None
    for threshold in (_FIRST_THRESHOLD, None):
        if threshold is None:  # half of the region's own contrast: anti-aliased edges count half
            threshold = 0.5 * float(np.percentile(diff[mask], 90))
        labels, n = ndimage.label(diff > threshold)
        if n == 0:
            return None, bg
        sizes = ndimage.sum_labels(np.ones_like(diff), labels, index=np.arange(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    h, w = mask.shape
    if mask.sum() < 0.005 * h * w or mask.sum() > 0.4 * h * w:
        return None, bg
    return mask, bg


def _frame_parts(frame: np.ndarray) -> dict | None:
    mask, _ = _object_mask(frame)
    if mask is None:
        return None
    inner = ndimage.binary_erosion(mask)
    pixels = frame[inner if inner.sum() >= 4 else mask].astype(np.float32)
    rgb = np.median(pixels, axis=0)
    names = list(COLOURS)
    colour = names[int(np.argmin([np.linalg.norm(rgb - np.asarray(COLOURS[n])) for n in names]))]
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum()) / float(box)
    shape = min(FILL_RATIO, key=lambda n: abs(FILL_RATIO[n] - fill))
    return {"colour": colour, "shape": shape, "fill": fill, "centre": (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)}


def score_video(frames: np.ndarray, caption: Caption | str, *, min_travel: float = 4.0) -> dict:
    """Score uint8 frames ``[T, H, W, 3]`` against ``caption``; returns ``{"task_score", "colour",
    "shape", "direction", "presence", "detected": {...}}`` (the most common detected colour and
    shape, the net displacement in pixels)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    cap = Caption.parse(caption) if isinstance(caption, str) else caption
    per_frame = [_frame_parts(f) for f in frames]
    found = [p for p in per_frame if p is not None]
    n = len(frames)
    colour = sum(p["colour"] == cap.colour for p in found) / n
    shape = sum(p["shape"] == cap.shape for p in found) / n
    direction, displacement = 0.0, (0.0, 0.0)
    if len(found) >= max(2, n // 2):
        centres = np.asarray([p["centre"] for p in found])
        q = max(1, len(centres) // 4)
        disp = np.median(centres[-q:], axis=0) - np.median(centres[:q], axis=0)
        displacement = (float(disp[0]), float(disp[1]))
        ux, uy = DIRECTIONS[cap.direction]
        along = disp[0] * ux + disp[1] * uy
        across = abs(disp[0] * uy) + abs(disp[1] * ux)
        direction = float(along >= min_travel and along > across)

    def most_common(key):
        vals = [p[key] for p in found]
        return max(set(vals), key=vals.count) if vals else None

    parts = {"colour": colour, "shape": shape, "direction": direction}
    return {"task_score": float(np.mean(list(parts.values()))), **{k: float(v) for k, v in parts.items()},
            "presence": len(found) / n,
            "detected": {"colour": most_common("colour"), "shape": most_common("shape"),
                         "displacement": displacement}}


def score_videos(videos: Sequence[np.ndarray], captions: Sequence[Caption | str]) -> dict:
    """Mean of :func:`score_video` over videos: ``{"task_score", "colour", "shape", "direction",
    "presence", "num_videos", "per_video": [...]}``."""
    if len(videos) != len(captions) or not videos:
        raise ValueError(f"score_videos needs one caption per video and at least one video, got {len(videos)} "
                         f"videos and {len(captions)} captions")
    per = [score_video(v, c) for v, c in zip(videos, captions)]
    keys = ("task_score", *PARTS, "presence")
    return {**{k: float(np.mean([p[k] for p in per])) for k in keys}, "num_videos": len(per), "per_video": per}


def is_testbed_folder(folder: str) -> bool:
    """Was this ``qarvd generate`` folder made by the testbed (``settings.model == "testbed"``)?"""
    try:
        with open(os.path.join(folder, "generation.json")) as fh:
            return json.load(fh).get("settings", {}).get("model") == "testbed"
    except (OSError, ValueError):
        return False


def score_folder(folder: str) -> dict | None:
    """Score a ``qarvd generate`` folder (its ``generation.json`` prompts and mp4s). ``None`` when a
    prompt is not a testbed caption (the folder was not made by the testbed)."""
    from qarvd_jax.eval.report import read_video

    manifest_path = os.path.join(folder, "generation.json")
    with open(manifest_path) as fh:
        entries = json.load(fh)["videos"]
    try:
        captions = [Caption.parse(e["prompt"]) for e in entries]
    except ValueError:
        return None
    videos = [read_video(os.path.join(folder, e["video"])) for e in entries]
    result = score_videos(videos, captions)
    for entry, per in zip(entries, result["per_video"]):
        per["stem"] = entry["stem"]
    return result
