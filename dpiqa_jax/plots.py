"""The scatter plot of an evaluation: predicted score against MOS, with the fitted 4-parameter
logistic (the curve PLCC-after-fit is computed on) and the correlations in the title."""
import numpy as np

from dpiqa_jax.train.metrics import fit_logistic


def scatter(pred: np.ndarray, target: np.ndarray, metrics: dict, title: str, path: str) -> None:
    """Writes the plot as a PNG at `path` (matplotlib's Agg canvas: no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    order = np.argsort(pred)
    figure = Figure(figsize=(5.5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(pred, target, s=8, alpha=0.5, linewidths=0, label=f"{len(pred)} images")
    axes.plot(pred[order], fit_logistic(pred, target)[order], color="tab:red", label="logistic fit")
    axes.set_xlabel("predicted score")
    axes.set_ylabel("MOS (target scale)")
    axes.set_title(f"{title}\nSRCC {metrics['srcc']:.4f}   PLCC {metrics['plcc']:.4f}   "
                   f"PLCC (fitted) {metrics['plcc_logistic']:.4f}", fontsize=9)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
