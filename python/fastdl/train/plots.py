"""``curves.png`` (loss and accuracy per epoch, or loss curves against the step) and
``predictions.png`` (test images with their predicted and true labels, wrong ones in red),
drawn on matplotlib's Agg canvas: no display, and pyplot's global backend is left alone."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from torch import Tensor

__all__ = ["have_matplotlib", "plot_curves", "plot_loss_curves", "plot_predictions", "save_epoch_figure"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Train and test loss (left) and accuracy (right) against the epoch."""
    epochs = [entry["epoch"] for entry in history]
    figure = _figure(10, 4)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for split, style in (("train", "-o"), ("test", "-s")):
        loss_axes.plot(epochs, [entry[f"{split}_loss"] for entry in history], style, label=split, markersize=3)
        accuracy_axes.plot(epochs, [100 * entry[f"{split}_acc"] for entry in history], style, label=split, markersize=3)
    # log scale: an early test loss can be thousands of times the final one (BatchNorm's
    # running statistics lag the first epochs), which flattens a linear plot
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss", yscale="log")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    save_epoch_figure(figure, (loss_axes, accuracy_axes), path)


def save_epoch_figure(figure, axes_list, path: str | os.PathLike) -> None:
    """Whole epochs on every x axis, a light grid and a legend on each axes, then ``path``."""
    from matplotlib.ticker import MaxNLocator

    for axes in axes_list:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_loss_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str = "step",
    ylabel: str = "cross-entropy loss",
) -> None:
    """One line per ``label -> (x, y)`` of ``curves`` on one axes (e.g. the training loss of
    every step and the validation loss of every evaluation); curves of at most 100 points get
    markers, so a few evaluations stand out against a dense training curve."""
    figure = _figure(7, 4.5)
    axes = figure.subplots()
    for label, (x, y) in curves.items():
        axes.plot(x, y, "-o" if len(x) <= 100 else "-", label=label, markersize=3, linewidth=1)
    axes.set(xlabel=xlabel, ylabel=ylabel, title="loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_predictions(
    images: Tensor,
    predicted: Sequence[int],
    truth: Sequence[int],
    classes: Sequence[str],
    path: str | os.PathLike,
    columns: int = 8,
) -> None:
    """A grid of uint8 ``images [N, C, H, W]`` titled "predicted / true", red where they differ."""
    n = images.size(0)
    rows = max(1, math.ceil(n / columns))
    figure = _figure(1.6 * columns, 1.8 * rows)
    grid = figure.subplots(rows, columns, squeeze=False)

    def name(label: int) -> str:
        text = str(classes[label]) if 0 <= label < len(classes) else str(label)
        return text if len(text) <= 10 else text[:9] + "."

    for index, axes in enumerate(grid.flat):
        axes.axis("off")
        if index >= n:
            continue
        image = images[index].permute(1, 2, 0).cpu().numpy()
        if image.shape[2] == 1:
            axes.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            axes.imshow(image)
        right = predicted[index] == truth[index]
        axes.set_title(
            f"{name(predicted[index])} / {name(truth[index])}", fontsize=7, color="black" if right else "red"
        )
    figure.suptitle("predicted / true (red: wrong)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
