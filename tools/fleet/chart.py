"""``--chart FILE``: Ready nodes over time, one line per scenario of the run.

The model's chart (``ipam.nau.launch_chart``) drawn from the real agents' results;
matplotlib is the ``chart`` extra, imported only when a chart is asked for; without it,
a one-line message before the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipam.errors import ConfigError
from ipam.nau.chart import pyplot_for
from ipam.nau.launch_chart import write_launch_chart


def check_chart_path(path: str) -> str | None:
    """Why ``path`` cannot be written as a chart, before a run spends minutes; or None."""
    try:
        pyplot_for(Path(path))
    except ConfigError as err:
        return str(err)
    return None


def write_chart(results: dict[str, dict[str, Any]], path: str) -> None:
    """The model's chart (``ultranet-nau launch --chart``), drawn from the real agents'
    results: the same JSON keys, so the two can be laid side by side."""
    write_launch_chart(results, Path(path), source="real agents")
