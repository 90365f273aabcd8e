"""IQA metrics on the full set of predictions: rank correlations are not sums over batches, so the
evaluator gathers every (masked) prediction first and computes them once, with scipy."""
import math
import warnings

import numpy as np
from scipy import optimize, stats

METRICS = ("srcc", "plcc", "plcc_logistic", "krcc", "rmse", "rmse_logistic")


def logistic4(x, b1, b2, b3, b4):
    """The 4-parameter logistic of VQEG: maps predictions onto the MOS scale before PLCC/RMSE."""
    with np.errstate(over="ignore"):  # exp overflow -> inf -> the curve's lower asymptote, as meant
        return (b1 - b2) / (1.0 + np.exp(-(x - b3) / np.abs(b4))) + b2


def fit_logistic(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Predictions mapped by the least-squares 4-parameter logistic; unchanged when the fit fails.

    The fit sees the pairs sorted and the predictions standardised: the result is then a function
    of the set of pairs alone (not of the order in which devices and hosts gathered them), and the
    problem is equally well conditioned on any score scale."""
    order = np.lexsort((target, pred))
    pred_sorted, y = pred[order], target[order]
    center, scale = np.mean(pred_sorted), np.std(pred_sorted) or 1.0
    x = (pred_sorted - center) / scale
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(logistic4, x, y, p0=[y.max(), y.min(), 0.0, 1.0], maxfev=20000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return pred
    fitted = logistic4((pred - center) / scale, *params)
    return fitted if np.all(np.isfinite(fitted)) else pred


def iqa_metrics(pred, target) -> dict[str, float]:
    """SRCC, PLCC (plain and after the logistic fit), KRCC and RMSE (plain and fitted), as floats.

    Degenerate inputs (fewer than 3 images, constant or non-finite predictions) give NaN, which
    is never ranked best."""
    pred = np.asarray(pred, np.float64).reshape(-1)
    target = np.asarray(target, np.float64).reshape(-1)
    if pred.size < 3 or not np.all(np.isfinite(pred)) or np.ptp(pred) == 0 or np.ptp(target) == 0:
        return {name: math.nan for name in METRICS} | {"num_images": int(pred.size)}
    fitted = fit_logistic(pred, target)
    return {
        "srcc": float(stats.spearmanr(pred, target).statistic),
        "plcc": float(stats.pearsonr(pred, target).statistic),
        "plcc_logistic": float(stats.pearsonr(fitted, target).statistic),
        "krcc": float(stats.kendalltau(pred, target).statistic),
        "rmse": float(np.sqrt(np.mean((pred - target) ** 2))),
        "rmse_logistic": float(np.sqrt(np.mean((fitted - target) ** 2))),
        "num_images": int(pred.size),
    }


def is_better(value: float, best: float | None) -> bool:
    """Strictly better and finite: NaN never wins, ties keep the earlier checkpoint."""
    return math.isfinite(value) and (best is None or value > best)
