"""Outlier input-channel detection (MAD z-score, IQR), alignment, cap, report and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qarvd_jax.quant import (align_count, column_norms, count_outliers, detect_outliers, layer_type, outlier_report,
                             plot_outliers, top_k_channels)


def _planted(out=256, inp=512, planted=(3, 70, 200, 401, 511), factor=4.0, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.02, size=(out, inp)).astype(np.float32)
    w[:, list(planted)] *= factor
    return w


def test_column_norms_layouts():
    w = _planted()
    ref = np.sqrt((w.astype(np.float64) ** 2).sum(axis=0))
    np.testing.assert_allclose(column_norms(w), ref, rtol=1e-12)
    np.testing.assert_allclose(column_norms(w.T, in_axis=0), ref, rtol=1e-12)  # Flax [in, out]
    with pytest.raises(ValueError, match="2-D weight"):
        column_norms(np.zeros((2, 3, 4)))


def test_mad_rule_hand_example():
    norms = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 3.0, 1.02])
    # median 1.02, |n - m| = [.02 .08 .12 .03 .07 1.98 0] -> MAD 0.07; z(3.0) = 0.6745·1.98/0.07 ≈ 19.1
    n, thr = count_outliers(norms, "mad_zscore")
    assert n == 1
    assert thr == pytest.approx(max(1.02 + 3.5 * 0.07 / 0.6745, 1.2 * 1.02))


def test_mad_rule_needs_both_zscore_and_ratio_to_median():
    # tight cluster (MAD tiny) so z is huge, but 1.1·median < 1.2·median: not an outlier
    norms = np.concatenate([1.0 + 1e-4 * np.arange(-50, 51) / 50, [1.1]])
    assert 0.6745 * (1.1 - np.median(norms)) / np.median(np.abs(norms - np.median(norms))) > 3.5
    assert count_outliers(norms, "mad_zscore")[0] == 0
    assert count_outliers(np.append(norms, 1.3), "mad_zscore")[0] == 1


def test_mad_below_eps_means_no_outliers():
    w = np.ones((8, 64), np.float32)
    w[:, 5] = 50.0  # a huge column, but MAD = 0 because more than half the norms are equal
    res = detect_outliers(w)
    assert (res.count, res.n_flagged, res.threshold) == (0, 0, None)
    assert res.channels.shape == (0,)


def test_planted_outliers_mad_align_to_32():
    w = _planted()
    res = detect_outliers(w)
    assert res.n_flagged == 5 and res.count == 32 and res.in_features == 512
    assert set([3, 70, 200, 401, 511]) <= set(res.channels.tolist())
    norms = column_norms(w)
    np.testing.assert_array_equal(res.channels, np.sort(np.argsort(-norms)[:32]))  # top-K by norm, ascending
    res1 = detect_outliers(w, align=1)
    np.testing.assert_array_equal(res1.channels, [3, 70, 200, 401, 511])
    assert res1.threshold is not None and np.all(norms[res1.channels] > res1.threshold)


def test_planted_outliers_iqr_against_numpy():
    w = _planted(factor=3.0)
    norms = column_norms(w)
    q1, q3 = np.percentile(norms, [25, 75])
    thr = max(q3 + 1.5 * (q3 - q1), 1.2 * np.median(norms))
    res = detect_outliers(w, "iqr", align=1)
    assert res.threshold == pytest.approx(thr)
    assert res.n_flagged == int(np.sum(norms > thr)) >= 5
    assert set([3, 70, 200, 401, 511]) <= set(res.channels.tolist())


def test_align_rounding_and_half_cap():
    assert align_count(0, 512) == 0
    assert align_count(1, 512) == 32
    assert align_count(32, 512) == 32
    assert align_count(33, 512) == 64
    assert align_count(40, 64) == 32  # 40 -> 64, capped at floor(64/2)
    assert align_count(3, 61, align=32) == 30  # cap floor(61/2) = 30 even below one alignment unit
    assert align_count(5, 512, align=1) == 5
    with pytest.raises(ValueError):
        align_count(3, 10, align=0)
    # end to end: 3 planted outlier columns in 40 -> 32 after alignment -> capped at 20 (top-20 by norm)
    w = _planted(out=64, inp=40, planted=(0, 17, 39), seed=1)
    res = detect_outliers(w)
    assert (res.n_flagged, res.count) == (3, 20)
    np.testing.assert_array_equal(res.channels, np.sort(np.argsort(-column_norms(w))[:20]))
    assert {0, 17, 39} <= set(res.channels.tolist())


def test_top_k_ties_and_errors():
    np.testing.assert_array_equal(top_k_channels([1.0, 3.0, 3.0, 2.0], 2), [1, 2])
    np.testing.assert_array_equal(top_k_channels([3.0, 1.0, 3.0, 3.0], 2), [0, 2])
    with pytest.raises(ValueError):
        top_k_channels([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="unknown outlier method"):
        count_outliers([1.0, 2.0], "zscore")


def test_layer_type():
    assert layer_type("blocks.3.self_attn.q") == "self_attn.q"
    assert layer_type("blocks.12.ffn.2") == "ffn.2"
    assert layer_type("model.blocks.0.cross_attn.o") == "cross_attn.o"
    assert layer_type("text_embedding.0") == "text_embedding.0"


def test_outlier_report_and_plot(tmp_path):
    rng = np.random.default_rng(2)
    weights = {}
    for b in range(3):
        weights[f"blocks.{b}.self_attn.q"] = rng.normal(size=(32, 96)).astype(np.float32)
        weights[f"blocks.{b}.ffn.0"] = _planted(out=48, inp=96, planted=(1, 50), seed=b)
    weights["text_embedding.0"] = _planted(out=32, inp=96, planted=(7,))
    rep = outlier_report(weights, "mad_zscore", align=32)
    json.dumps(rep)  # JSON-serialisable
    assert rep["skipped"] == ["text_embedding.0"]  # Q-ARVD filters on "block"
    layer = rep["layers"]["blocks.1.ffn.0"]
    assert layer["n_outlier"] == 32 and layer["n_flagged"] == 2 and {1, 50} <= set(layer["channels"])
    assert layer["threshold"] == pytest.approx(detect_outliers(weights["blocks.1.ffn.0"]).threshold)
    assert rep["layer_types"]["ffn.0"]["n_layers"] == 3
    assert rep["layer_types"]["ffn.0"]["share"] == 1.0
    q_share = rep["layer_types"]["self_attn.q"]["share"]
    n_q = sum(rep["layers"][f"blocks.{b}.self_attn.q"]["n_outlier"] > 0 for b in range(3))
    assert q_share == pytest.approx(n_q / 3)
    assert rep["overall"]["n_layers"] == 6
    assert rep["overall"]["share"] == pytest.approx((3 + n_q) / 6)
    png = plot_outliers(weights, rep, tmp_path / "outliers.png")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
