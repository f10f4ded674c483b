"""The arms as a figure: CIDEr and VQA accuracy per arm with their 95% intervals (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

PLOT_HINT = "pip install 'rsmoe[plot]' (matplotlib==3.11.2)"


def plot_arms(table: Mapping[str, Any], path: Path) -> tuple[Path | None, str | None]:
    """Write the plot; (path, None), or (None, a note saying why not) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on compute nodes
        import matplotlib.pyplot as plt
    except ImportError:
        return None, f"No plot: matplotlib is not installed ({PLOT_HINT})."
    rows = [r for r in table["rows"] if "missing" not in r]
    panels = [("CIDEr", lambda r: r["caption"].get("CIDEr")), ("VQA overall accuracy", lambda r: r["vqa"].get("overall"))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.6 * len(rows) + 1.5), squeeze=False)
    for ax, (title, get) in zip(axes[0], panels):
        cells = [get(r) for r in rows]
        y = list(range(len(rows)))
        vals = [c["value"] * 100 if c else 0.0 for c in cells]
        err = [[(c["value"] - c["low"]) * 100 if c and c.get("low") is not None else 0.0 for c in cells],
               [(c["high"] - c["value"]) * 100 if c and c.get("high") is not None else 0.0 for c in cells]]
        colors = ["#444444" if r["arm"] == table["reference"] else "#3b7dd8" for r in rows]
        ax.barh(y, vals, xerr=err, color=colors, capsize=3)
        ax.set_yticks(y, [r["arm"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(f"{title} (x100, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Ablation ({table.get('config') or ''}); reference in grey")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, None
