"""``--chart FILE``: Ready nodes over time, one line per scenario of the run.

As the planner's chart (``ipam.nau.chart``): matplotlib is the ``chart`` extra, imported
only here and only when a chart is asked for; without it, a one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipam.errors import ConfigError
from ipam.nau.chart import FORMATS, MATPLOTLIB_EXTRA


def check_chart_path(path: str) -> str | None:
    """Why ``path`` cannot be written as a chart, before a run spends minutes; or None."""
    if Path(path).suffix.lower() not in FORMATS:
        return f"--chart {path}: must end in .png or .svg"
    try:
        import matplotlib  # noqa: F401 - only whether it is there
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise  # matplotlib is there but broken: its own traceback says why
        return f"--chart {path}: needs matplotlib: pip install '{MATPLOTLIB_EXTRA}'"
    return None


def write_chart(results: dict[str, dict[str, Any]], path: str) -> None:
    problem = check_chart_path(path)
    if problem is not None:
        raise ConfigError("--chart", path, problem.split(": ", 1)[1])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, result in results.items():
        curve = result.get("ready_curve") or []
        xs = [0.0] + [t for t, _ in curve]
        ys = [0] + [n for _, n in curve]
        label = (
            f"{name} ({result['prefixes_at_launch']} at launch): {result['nodes_ready']}/"
            f"{result['nodes']} Ready, p99 {result['ready_p99_s']} s, "
            f"{result['ec2_calls_per_node']} EC2 calls/node"
        )
        ax.step(xs, ys, where="post", label=label)
    first = next(iter(results.values()), {})
    ax.set_xlabel("seconds from the first launch")
    ax.set_ylabel("nodes Ready")
    ax.set_title(
        f"{first.get('nodes', '?')} x {first.get('instance_type', '?')}, "
        f"{first.get('launch', '')}, {first.get('pods_per_node', '?')} pods each"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format=FORMATS[Path(path).suffix.lower()])
    plt.close(fig)
