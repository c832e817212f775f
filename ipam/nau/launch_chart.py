"""``ultranet-nau launch --chart FILE``: Ready nodes over the wave, per scenario.

Like the planner's chart (:mod:`ipam.nau.chart`): matplotlib is the ``chart`` extra,
imported only when a chart is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ipam.errors import ConfigError
from ipam.nau.chart import pyplot_for


def write_launch_chart(
    results: Mapping[str, Mapping[str, Any]], path: Path, *, source: str = "model"
) -> None:
    """Nodes Ready over the wave, one line per scenario; ``source`` says in the title
    whether the model or real agents (tools/fleet, same JSON) made ``results``."""
    plt, fmt = pyplot_for(path)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    first = next(iter(results.values()))
    nodes, rate = first["nodes"], first["rate_per_min"]
    launch_minutes = nodes / rate
    ax.plot([0, launch_minutes], [0, nodes], color="grey", linestyle=":", label="launched")
    for name, result in results.items():
        curve = [(0.0, 0), *((t / 60, n) for t, n in result["ready_curve"])]
        label = (
            f"{name} ({result['prefixes_at_launch']} at launch, "
            f"{result['ec2_calls_per_node']} EC2 calls/node, "
            f"{result['throttled_calls']:,} throttled)"
        )
        ax.step([t for t, _ in curve], [n for _, n in curve], where="post", label=label)
    ax.set_xlabel("minutes since the first launch")
    ax.set_ylabel("nodes Ready")
    ax.set_title(
        f"{nodes:,} x {first['instance_type']} at {rate:,.0f}/min, "
        f"{first['pods_per_node']} pods each ({source})",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        fig.savefig(path, format=fmt)
    except OSError as err:
        raise ConfigError("--chart", str(path), err.strerror or str(err)) from None
    finally:
        plt.close(fig)
