"""A PNG figure of an OPD run: loss, KL, entropy and the quadrant shares over steps (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

MISSING = ("matplotlib is needed for the run figure (pip install matplotlib, or pip install 'tipkernels[plot]'); "
           "the metrics are in metrics.jsonl either way")


def _series(history: Sequence[Dict[str, float]], key: str):
    pts = [(r["step"], r[key]) for r in history if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(history: Sequence[Dict[str, float]], path: Union[str, Path], title: Optional[str] = None,
             evals: Optional[Sequence[Dict[str, float]]] = None,
             runs: Optional[Dict[str, List[Dict[str, float]]]] = None,
             run_evals: Optional[Dict[str, List[Dict[str, float]]]] = None) -> Path:
    """Write a 2×2 (3×2 with eval metrics) figure of per-step metrics to ``path``; returns the path.

    ``history``: the list returned by :meth:`OPDTrainer.train` (dicts with "step", "loss", "reverse_kl",
    "entropy_norm", "q1_valid".., "q1_selected"..). ``evals``: ``OPDTrainer.eval_history`` (dicts with "step"
    and ``eval_fn``'s keys, including step 0). ``runs`` / ``run_evals``: several named histories (e.g. one per
    rule) drawn on the same axes instead; ``history`` and ``evals`` are then ignored.
    Raises ImportError with an install hint if matplotlib is missing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(MISSING) from e
    if not runs:
        runs, run_evals = {"": list(history)}, {"": list(evals or [])}
    run_evals = run_evals or {}
    eval_keys = sorted({k for h in run_evals.values() for r in h for k in r if k != "step"})
    rows = 3 if eval_keys else 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.2 * rows))
    ax = axes.reshape(-1)
    for name, hist in runs.items():
        lab = f"{name} " if name else ""
        ax[0].plot(*_series(hist, "loss"), label=f"{lab}loss (selected)")
        ax[1].plot(*_series(hist, "reverse_kl"), label=f"{lab}KL(p‖q) all")
        if len(runs) == 1:
            ax[1].plot(*_series(hist, "reverse_kl_selected"), label=f"{lab}KL(p‖q) selected", ls="--")
            ax[1].plot(*_series(hist, "forward_kl"), label=f"{lab}KL(q‖p) all", ls=":")
        ax[2].plot(*_series(hist, "entropy_norm"), label=f"{lab}h all")
        if len(runs) == 1:
            ax[2].plot(*_series(hist, "entropy_norm_selected"), label=f"{lab}h selected", ls="--")
            ax[2].plot(*_series(hist, "selected_fraction"), label="selected fraction", ls=":")
    colors = ("tab:red", "tab:orange", "tab:purple", "tab:green")
    if len(runs) == 1:  # quadrant shares of the selected tokens over steps, and of all valid tokens (dotted)
        first = next(iter(runs.values()))
        for i, c in zip(range(1, 5), colors):
            ax[3].plot(*_series(first, f"q{i}_selected"), color=c, label=f"Q{i} selected")
            ax[3].plot(*_series(first, f"q{i}_valid"), color=c, ls=":", alpha=0.6)
        ax[3].set_title("quadrant shares (solid: selected, dotted: all)")
    else:  # one stacked bar per run: token-weighted quadrant shares of its selected tokens over the whole run
        names = list(runs)
        bottom = [0.0] * len(names)
        for i, c in zip(range(1, 5), colors):
            shares = []
            for n in names:
                sel = sum(r.get("selected_tokens", 0.0) for r in runs[n])
                shares.append(sum(r.get(f"q{i}_selected", 0.0) * r.get("selected_tokens", 0.0)
                                  for r in runs[n]) / sel if sel else 0.0)
            ax[3].bar(names, shares, bottom=bottom, color=c, label=f"Q{i}")
            bottom = [b + v for b, v in zip(bottom, shares)]
        ax[3].set_title("quadrants of the selected tokens, whole run")
    ax[0].set_title("loss (mean divergence over selected tokens)")
    ax[1].set_title("teacher–student KL per token")
    ax[2].set_title("student entropy h = H / log V")
    if eval_keys:
        for name, hist in run_evals.items():
            for k in eval_keys:
                ax[4].plot(*_series(hist, k), marker="o", ms=3, label=f"{name} {k}".strip())
        ax[4].set_title("evaluation")
        ax[5].axis("off")
    for j, a in enumerate(ax[: 5 if eval_keys else 4]):
        if not (j == 3 and len(runs) > 1):
            a.set_xlabel("step")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    return save_figure(fig, path, title, dpi=110)


def save_figure(fig, path: Union[str, Path], title: Optional[str] = None, *, dpi: int = 110,
                title_size: Optional[int] = None) -> Path:
    """Title ``fig``, lay it out, write it to ``path`` (parents created) and close it; returns the path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
