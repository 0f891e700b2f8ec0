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


def learning_curves(path: str, rows: list[dict]) -> None:
    """One panel per metric name (loss, accuracy, ...): train, val and eval curves over steps."""
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for row in rows:
        for key, value in row.items():
            if "/" not in key or key.startswith("perf/") or not isinstance(value, float):
                continue
            split, name = key.split("/", 1)
            xs, ys = series.setdefault(name, {}).setdefault(split, ([], []))
            xs.append(row["step"])
            ys.append(value)
    names = sorted(n for n in series if n not in ("lr", "grad_norm")) or sorted(series)
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names):
        for split, (xs, ys) in sorted(series[name].items()):
            ax.plot(xs, ys, label=split, marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_grid(path: str, images_NxHxWxC: np.ndarray, columns: int, title: str = "",
               row_labels: list[str] | None = None) -> None:
    """Images in [0, 1] tiled row by row, `columns` per row, grey for one channel."""
    images = np.clip(np.asarray(images_NxHxWxC, dtype=np.float32), 0.0, 1.0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"image_grid expects (N, H, W, 1 or 3) images, got shape {images.shape}")
    n, h, w, c = images.shape
    rows = -(-n // columns)
    pad = 1  # a one-pixel white frame keeps neighbouring digits apart
    canvas = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, col = divmod(i, columns)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    scale = max(1.0, 6.0 / max(canvas.shape[:2]) * 40)  # small images get big pixels
    fig, ax = plt.subplots(figsize=(canvas.shape[1] * scale / 40 + 1.0, canvas.shape[0] * scale / 40 + 0.6), dpi=100)
    ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    if row_labels is not None:
        ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(row_labels))])
        ax.set_yticklabels(row_labels)
    else:
        ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def roc_and_precision_recall(path: str, fpr: np.ndarray, tpr: np.ndarray, precision: np.ndarray,
                             recall: np.ndarray, auc: float, title: str = "") -> None:
    """Two panels: the ROC curve with its AUC, and the precision-recall curve."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 4.2), dpi=100)
    roc_ax.plot(fpr, tpr, lw=2, label=f"AUC {auc:.4f}")
    roc_ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    roc_ax.set_xlabel("false-positive rate")
    roc_ax.set_ylabel("true-positive rate")
    roc_ax.set_title("ROC")
    roc_ax.legend(loc="lower right")
    pr_ax.plot(recall, precision, lw=2)
    pr_ax.set_xlabel("recall")
    pr_ax.set_ylabel("precision")
    pr_ax.set_title("precision-recall")
    for ax in (roc_ax, pr_ax):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def predicted_vs_true(path: str, true_N: np.ndarray, predicted_N: np.ndarray, title: str = "") -> None:
    """Scatter of predictions against targets, with the y = x line a perfect model would sit on."""
    true_N, predicted_N = np.asarray(true_N), np.asarray(predicted_N)
    fig, ax = plt.subplots(figsize=(4.8, 4.8), dpi=100)
    ax.scatter(true_N, predicted_N, s=12, alpha=0.7)
    lo, hi = min(true_N.min(), predicted_N.min()), max(true_N.max(), predicted_N.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
