"""PNG pictures written into a run's workdir (matplotlib, headless)."""

import matplotlib

matplotlib.use("Agg")  # no display on servers and TPU VMs

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix(path: str, matrix_KxK: np.ndarray, title: str = "") -> None:
    """A confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    matrix_KxK = np.asarray(matrix_KxK)
    k = matrix_KxK.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * k, 1.0 + 0.5 * k), dpi=100)
    ax.imshow(matrix_KxK, cmap="Blues")
    threshold = matrix_KxK.max() / 2 if matrix_KxK.size else 0
    for t in range(k):
        for p in range(k):
            ax.text(p, t, f"{int(round(matrix_KxK[t, p]))}", ha="center", va="center", fontsize=8,
                    color="white" if matrix_KxK[t, p] > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
