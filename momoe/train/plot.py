"""Loss curves as PNG with matplotlib (the optional extra `momoe[plot]`); without it, plots are skipped."""
import importlib.util
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

MISSING = "matplotlib is not installed (pip install 'momoe[plot]'), so no plot was written"

# name -> [(x, {modality: loss})]
Curves = Mapping[str, Sequence[Tuple[float, Mapping[str, float]]]]


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_curves(curves: Curves, path: str, xlabel: str = "step", title: str = "",
                log_x: bool = False) -> Optional[str]:
    """One panel per modality, one line per run: curves = {run: [(x, {modality: loss}), ...]}.
    Writes `path` and returns it, or returns None when matplotlib is missing."""
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities: List[str] = []
    for points in curves.values():
        for _, losses in points:
            modalities += [m for m in losses if m not in modalities]
    fig, axes = plt.subplots(1, max(1, len(modalities)), figsize=(4.2 * max(1, len(modalities)), 3.4),
                             squeeze=False)
    for ax, modality in zip(axes[0], modalities):
        for run, points in curves.items():
            xy = [(x, losses[modality]) for x, losses in points if modality in losses]
            if xy:
                ax.plot(*zip(*xy), label=run)
        ax.set_title(f"{modality} loss")
        ax.set_xlabel(xlabel)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    axes[0][-1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_curves(records: Sequence[Mapping], key: str = "loss_per_modality") -> List[Tuple[float, Dict[str, float]]]:
    """Training-log records -> [(step, {modality: loss})]."""
    return [(r["step"], dict(r[key])) for r in records if key in r]
