"""Linear-probe protocol for a frozen extractor: the same for every extractor and method.

Features are standardised with the probe's *training* features' mean and std (so the probe sees
no feature scale: supervised features with norm ~15 and SSL features with norm ~1 compete on
direction alone), then a multinomial logistic regression (scikit-learn, L-BFGS, C = 1, up to
1000 iterations, tol 1e-4, one BLAS thread) is fitted to convergence and scored on the test
features.
"""

from __future__ import annotations

import numpy as np
import torch

PROBE_C = 1.0
PROBE_MAX_ITER = 1000
PROBE_TOL = 1e-4
MIN_STD = 1e-6  # a constant (dead) feature is centred and left unscaled


def _numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def standardise(train_feats: np.ndarray, test_feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets standardised with the training set's per-feature mean and std."""
    mean = train_feats.mean(axis=0, keepdims=True)
    std = train_feats.std(axis=0, keepdims=True)
    std = np.where(std < MIN_STD, 1.0, std)
    return (train_feats - mean) / std, (test_feats - mean) / std


def linear_probe(
    train_feats: torch.Tensor | np.ndarray,
    train_y: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    test_y: torch.Tensor | np.ndarray,
    *,
    c: float = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
) -> float:
    """Test accuracy of a logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    xtr, xte = (_numpy(a).astype(np.float64) for a in (train_feats, test_feats))
    ytr, yte = _numpy(train_y).astype(np.int64), _numpy(test_y).astype(np.int64)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"feature shapes {xtr.shape} and {xte.shape} do not match")
    if len(xtr) != len(ytr) or len(xte) != len(yte) or len(xtr) == 0 or len(xte) == 0:
        raise ValueError("features and labels must be non-empty and of equal length")
    if not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
        raise ValueError("non-finite features")
    xtr, xte = standardise(xtr, xte)
    if len(np.unique(ytr)) < 2:  # a single class: logistic regression cannot fit
        return float(np.mean(yte == ytr[0]))
    model = LogisticRegression(C=c, max_iter=max_iter, tol=PROBE_TOL)
    # one BLAS thread: on a shared 2-core machine OpenBLAS's spinning threads made a fit 14x
    # slower in CPU time; a ConvergenceWarning here would mean max_iter was too small
    with threadpool_limits(limits=1):
        model.fit(xtr, ytr)
    return float(np.mean(model.predict(xte) == yte))
