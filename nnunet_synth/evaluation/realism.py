"""How well real and synthetic tumours can be told apart: a cross-validated classifier and a one-class SVM.

* :func:`realism_auc`: a scikit-learn classifier on per-tumour features, cross-validated with folds grouped by
  case (crops of one case never sit on both sides of a split), repeated with reshuffled folds. The AUC of its
  out-of-fold probabilities is 0.5 when the synthetic tumours cannot be told from the real ones and 1.0 when
  they always can.
* :func:`one_class_svm_scores`: the liver-MRI paper's model selection. A one-class SVM is fitted on feature
  vectors of real tumours only and scores the synthetic ones; real tumours are scored by SVMs fitted without
  their own case, so both scores are out-of-sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scikit-learn is imported where it is used: nnUNetv2_synth_quality --help stays instant
    from sklearn.pipeline import Pipeline

CLASSIFIERS = ("forest", "logistic")
FOREST_TREES = 100


def make_classifier(name: str, seed: int = 0) -> Pipeline:
    """The classifier of :func:`realism_auc`: missing features imputed with the median, then

    * ``forest``: a random forest (:data:`FOREST_TREES` trees, leaves of at least 2 samples), or
    * ``logistic``: standardised features and an L2 logistic regression (C = 1).
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    impute = SimpleImputer(strategy="median", keep_empty_features=True)
    if name == "forest":
        forest = RandomForestClassifier(n_estimators=FOREST_TREES, min_samples_leaf=2, random_state=seed, n_jobs=1)
        return make_pipeline(impute, forest)
    if name == "logistic":
        return make_pipeline(impute, StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    raise ValueError(f"unknown classifier {name!r}; expected one of {', '.join(CLASSIFIERS)}")


def _splitter(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> tuple[object, bool, int]:
    """Stratified folds grouped by case where both classes span at least two cases, else stratified folds."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    per_class_groups = min(len(np.unique(groups[y == k])) for k in (0, 1))
    k = min(n_splits, per_class_groups)
    if k >= 2:
        return StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed), True, k
    k = min(n_splits, int((y == 0).sum()), int((y == 1).sum()))
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed), False, k


def _importances(model: Pipeline, names: Sequence[str], top: int) -> list[dict]:
    last = model[-1]
    values = last.feature_importances_ if hasattr(last, "feature_importances_") else np.abs(last.coef_[0])
    order = np.argsort(values)[::-1][:top]
    return [{"feature": names[i], "importance": float(values[i])} for i in order]


def realism_auc(features: np.ndarray, is_synthetic: np.ndarray, groups: Sequence[str],
                feature_names: Sequence[str], classifier: str = "forest", n_splits: int = 5, n_repeats: int = 5,
                seed: int = 0, top_features: int = 8) -> dict:
    """Cross-validated AUC of a classifier telling synthetic from real tumours.

    Args:
        features: (n, f) feature matrix; NaN marks a feature that could not be measured.
        is_synthetic: (n,) bool, True for synthetic tumours.
        groups: (n,) case identifier of every tumour; folds never split a case.
        feature_names: f names, for the importances.
        classifier: one of :data:`CLASSIFIERS`.
        n_splits: folds (fewer when fewer cases or tumours exist).
        n_repeats: repetitions with reshuffled folds.
        seed: seed of the folds and the forest.
        top_features: how many of the most important features (classifier fitted on all tumours) to report.

    Returns:
        ``auc`` (mean over repeats of the AUC of the pooled out-of-fold probabilities), ``auc_std``,
        ``auc_per_repeat``, ``fold_auc_mean`` (mean AUC of single folds that hold both classes), ``n_splits``,
        ``grouped_by_case``, ``classifier``, ``n_repeats``, ``p_synthetic`` (per tumour, the mean out-of-fold
        probability of being synthetic) and ``top_features``.

    Raises:
        ValueError: with fewer than two real or two synthetic tumours.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(is_synthetic, dtype=bool).astype(int)
    groups = np.asarray(groups)
    if x.ndim != 2 or len(x) != len(y) or len(y) != len(groups) or x.shape[1] != len(feature_names):
        raise ValueError(f"features {x.shape}, labels {y.shape}, groups {groups.shape} and "
                         f"{len(feature_names)} feature names do not match")
    n_real, n_syn = int((y == 0).sum()), int((y == 1).sum())
    if min(n_real, n_syn) < 2:
        raise ValueError(f"the realism classifier needs at least two real and two synthetic tumours, got {n_real} "
                         f"real and {n_syn} synthetic")
    from sklearn.metrics import roc_auc_score

    aucs, fold_aucs, probabilities = [], [], []
    grouped, k = False, 0
    for repeat in range(n_repeats):
        splitter, grouped, k = _splitter(y, groups, n_splits, seed + repeat)
        oof = np.full(len(y), np.nan)
        for train, test in splitter.split(x, y, groups):
            if len(np.unique(y[train])) < 2:
                continue  # a fold without one class cannot be trained; its tumours stay unscored this repeat
            model = make_classifier(classifier, seed + repeat).fit(x[train], y[train])
            oof[test] = model.predict_proba(x[test])[:, 1]
            if len(np.unique(y[test])) == 2:
                fold_aucs.append(roc_auc_score(y[test], oof[test]))
        scored = ~np.isnan(oof)
        if len(np.unique(y[scored])) == 2:
            aucs.append(roc_auc_score(y[scored], oof[scored]))
        probabilities.append(oof)
    if not aucs:
        raise ValueError("no cross-validation repeat scored both real and synthetic tumours")
    with warnings.catch_warnings():  # a tumour unscored in every repeat stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        p_synthetic = np.nanmean(np.stack(probabilities), axis=0)
    full = make_classifier(classifier, seed).fit(x, y)
    return {
        "auc": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs)),
        "auc_per_repeat": [float(a) for a in aucs],
        "fold_auc_mean": float(np.mean(fold_aucs)) if fold_aucs else float("nan"),
        "classifier": classifier,
        "n_splits": k,
        "n_repeats": n_repeats,
        "grouped_by_case": grouped,
        "n_real": n_real,
        "n_synthetic": n_syn,
        "p_synthetic": [float(p) for p in p_synthetic],
        "top_features": _importances(full, list(feature_names), top_features),
    }


def one_class_svm_scores(real: np.ndarray, synthetic: np.ndarray, real_groups: Sequence[str], nu: float = 0.1,
                         n_splits: int = 5, seed: int = 0) -> dict:
    """One-class SVM (RBF kernel, ``gamma="scale"``, standardised features) fitted on real tumours.

    The decision score is positive inside the learnt support of the real tumours and negative outside; its
    mean over the synthetic tumours is the paper's model-selection score (higher is more realistic). Real
    tumours get held-out scores from SVMs fitted on the other cases (grouped folds; plain folds when all
    real tumours come from one case), the reference a good generator should reach; synthetic tumours are
    spread over the same fold SVMs in the proportions the real ones are held out in, so both kinds are scored
    alike (by SVMs that never saw them, fitted on equally many real tumours).

    Args:
        real: (n_real, f) feature vectors of real tumours.
        synthetic: (n_synthetic, f) feature vectors of synthetic tumours.
        real_groups: case identifier of every real tumour.
        nu: the SVM's bound on the share of training outliers.
        n_splits: folds for the held-out real scores.
        seed: seed of the plain folds.

    Returns:
        Mean scores and inlier shares of held-out real and of synthetic tumours, the AUC of the scores (real
        vs synthetic, 0.5: indistinguishable), and the scores themselves.

    Raises:
        ValueError: with fewer than two real tumours or no synthetic one.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import OneClassSVM

    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    groups = np.asarray(real_groups)
    if len(real) < 2 or len(synthetic) < 1:
        raise ValueError(f"the one-class SVM needs at least two real and one synthetic tumour, got {len(real)} "
                         f"real and {len(synthetic)} synthetic")
    if not 0 < nu <= 1:
        raise ValueError(f"nu must be in (0, 1], got {nu}")

    def model() -> Pipeline:
        return make_pipeline(StandardScaler(), OneClassSVM(kernel="rbf", gamma="scale", nu=nu))

    n_groups = len(np.unique(groups))
    if n_groups >= 2:
        splitter, grouped = GroupKFold(n_splits=min(n_splits, n_groups)), True
    else:
        splitter, grouped = KFold(n_splits=min(n_splits, len(real)), shuffle=True, random_state=seed), False
    real_scores, synthetic_scores = np.empty(len(real)), np.empty(len(synthetic))
    folds = list(splitter.split(real, groups=groups))
    # synthetic tumours are spread over the fold SVMs in the proportions the real tumours are held out in
    real_fold = np.concatenate([np.full(len(test), k) for k, (_, test) in enumerate(folds)])
    synthetic_fold = real_fold[np.arange(len(synthetic)) * len(real_fold) // len(synthetic)]
    for k, (train, test) in enumerate(folds):
        svm = model().fit(real[train])
        real_scores[test] = svm.decision_function(real[test])
        mine = synthetic_fold == k
        if mine.any():
            synthetic_scores[mine] = svm.decision_function(synthetic[mine])
    labels = np.r_[np.zeros(len(real)), np.ones(len(synthetic))]
    return {
        "nu": nu,
        "n_real": len(real),
        "n_synthetic": len(synthetic),
        "grouped_by_case": grouped,
        "real_heldout_mean_score": float(real_scores.mean()),
        "real_heldout_inlier_share": float((real_scores >= 0).mean()),
        "synthetic_mean_score": float(synthetic_scores.mean()),
        "synthetic_inlier_share": float((synthetic_scores >= 0).mean()),
        # higher score = more real-like, so the AUC of "synthetic" is computed on the negated score
        "auc": float(roc_auc_score(labels, -np.r_[real_scores, synthetic_scores])),
        "real_heldout_scores": [float(s) for s in real_scores],
        "synthetic_scores": [float(s) for s in synthetic_scores],
    }
