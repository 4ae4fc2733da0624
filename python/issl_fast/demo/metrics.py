"""Detection quality against the planted truth."""

from __future__ import annotations

from typing import Any

import numpy as np


def pair_quality(rows: np.ndarray, sim: np.ndarray, truth: set[tuple[int, int]],
                 threshold: float) -> dict[str, Any]:
    """Recall / precision of ranked candidate pairs at ``threshold``, the best F1 over
    thresholds, the highest recall reached at precision >= 0.9, and average precision."""
    order = np.argsort(-sim, kind="stable")
    rows, sim = rows[order], sim[order]
    hit = np.array([tuple(r) in truth for r in rows.tolist()], dtype=bool)
    tp = np.cumsum(hit)
    n_true = max(len(truth), 1)
    precision = tp / np.arange(1, len(hit) + 1) if len(hit) else np.zeros(0)
    recall = tp / n_true
    at = int((sim >= threshold).sum())
    out: dict[str, Any] = {
        "threshold": threshold,
        "reported": at,
        "recall": float(recall[at - 1]) if at else 0.0,
        "precision": float(precision[at - 1]) if at else 1.0,
        "average_precision": float((precision * hit).sum() / n_true) if len(hit) else 0.0,
    }
    if len(hit):
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        b = int(np.argmax(f1))
        out["best_f1"] = {"f1": float(f1[b]), "threshold": float(sim[b]),
                          "recall": float(recall[b]), "precision": float(precision[b])}
        ok = precision >= 0.9
        out["recall_at_precision_0.9"] = float(recall[ok].max()) if ok.any() else 0.0
    return out


def outlier_quality(scores: np.ndarray, is_outlier: np.ndarray) -> dict[str, float]:
    """AUROC, average precision and precision@k (k = number of planted outliers)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    k = int(is_outlier.sum())
    top = np.argsort(-scores, kind="stable")[:k]
    return {"auroc": float(roc_auc_score(is_outlier, scores)),
            "average_precision": float(average_precision_score(is_outlier, scores)),
            "precision_at_k": float(is_outlier[top].mean()) if k else 0.0, "k": k}


def outlier_quality_by_kind(scores: np.ndarray, is_outlier: np.ndarray, data) -> dict[str, float]:
    """AUROC of each planted outlier kind against the clean examples."""
    from sklearn.metrics import roc_auc_score

    out = {}
    clean = ~is_outlier
    for kind in sorted(set(data.outlier_kind[is_outlier].tolist())):
        sel = clean | (data.outlier_kind == kind)
        out[kind] = float(roc_auc_score(data.outlier_kind[sel] == kind, scores[sel]))
    return out


def pair_recall_by_kind(rows: np.ndarray, sim: np.ndarray, data, threshold: float
                        ) -> dict[str, float]:
    """Recall at ``threshold`` of each planted duplicate kind (exact / noise / shift)."""
    found = {tuple(r) for r, v in zip(rows.tolist(), sim) if v >= threshold}
    out = {}
    for kind in sorted(set(data.dup_kind.tolist())):
        pairs = [tuple(p) for p, k in zip(data.dup_pairs.tolist(), data.dup_kind) if k == kind]
        out[kind] = float(np.mean([p in found for p in pairs])) if pairs else 0.0
    return out
