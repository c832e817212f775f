"""``--chart FILE``: NAU against node count for each IPAM mode, with the quota lines.

I/O shell over :mod:`ipam.nau.budget`; matplotlib is imported only here, and only when a
chart is asked for, so ``plan`` stays fast. It is the ``chart`` extra (``pip install
'ultranet[chart]'``), not a dependency: nothing else in the products needs it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ipam.errors import ConfigError
from ipam.nau.budget import infra_units, nau_per_node_average
from ipam.nau.errors import PlanError
from ipam.nau.maxpods import Mode
from ipam.nau.model import Plan, WarmKnobs
from ipam.nau.rules import (
    NAU_QUOTA_DEFAULT,
    NAU_QUOTA_MAX,
    PEERED_NAU_QUOTA_DEFAULT,
    PEERED_NAU_QUOTA_MAX,
    RULES_VERSION,
)

FORMATS = {".png": "png", ".svg": "svg"}
MATPLOTLIB_EXTRA = "ultranet[chart]"


def mode_variants(plan: Plan) -> list[tuple[str, Plan]]:
    no_multi = tuple(replace(g, multi_nic_cards=0, multi_nic_pods=0) for g in plan.groups)
    return [
        ("secondary-IP, WARM_ENI_TARGET=1", replace(plan, mode=Mode.SECONDARY, warm=WarmKnobs())),
        ("prefix, WARM_PREFIX_TARGET=1", replace(plan, mode=Mode.PREFIX, warm=WarmKnobs(1))),
        ("prefix, WARM_IP_TARGET=1", replace(plan, mode=Mode.PREFIX, warm=WarmKnobs(None, 1))),
        (
            "IPv6",
            replace(
                plan, mode=Mode.IPV6, warm=WarmKnobs(), custom_networking=False, groups=no_multi
            ),
        ),
    ]


def series(plan: Plan) -> list[tuple[str, float, float]]:
    """(label, NAU per node, fixed NAU) per mode; modes impossible for the mix are left out."""
    fixed = float(sum(units for _, units in infra_units(plan)))
    out = []
    for label, variant in mode_variants(plan):
        try:
            out.append((label, nau_per_node_average(variant), fixed))
        except PlanError:
            continue
    return out


def pyplot_for(path: Path) -> tuple[Any, str]:
    """matplotlib's pyplot (headless) and the file format for ``--chart path``; the one
    place the ``chart`` extra is imported, so a missing extra reads the same everywhere."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError("--chart", str(path), "must end in .png or .svg")
    try:
        import matplotlib
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise  # matplotlib is there but broken: its own traceback says why
        raise ConfigError(
            "--chart", str(path), f"needs matplotlib: pip install '{MATPLOTLIB_EXTRA}'"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, fmt


def write_chart(plan: Plan, path: Path) -> None:
    plt, fmt = pyplot_for(path)
    top = max(plan.nodes * 2, 1000)
    xs = [top * i / 200 for i in range(201)]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, slope, fixed in series(plan):
        ax.plot(xs, [fixed + slope * x for x in xs], label=f"{label} ({slope:.1f}/node)")
    quotas = [
        (NAU_QUOTA_DEFAULT, "VPC default 64K", "--"),
        (NAU_QUOTA_MAX, "VPC max 256K", "-"),
        (PEERED_NAU_QUOTA_DEFAULT, "peered default 128K", ":"),
        (PEERED_NAU_QUOTA_MAX, "peered max 512K", "-."),
    ]
    for value, label, style in quotas:
        ax.axhline(value, color="grey", linestyle=style, linewidth=1)
        ax.text(xs[-1], value, f" {label}", va="bottom", ha="right", fontsize=8, color="grey")
    ax.axvline(plan.nodes, color="black", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel(f"nodes (mix of {plan.name}, shares kept)")
    ax.set_ylabel("Network Address Usage")
    ax.set_title(f"NAU against node count per IPAM mode (rules {RULES_VERSION})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    try:
        fig.savefig(path, format=fmt)
    except OSError as err:
        raise ConfigError("--chart", str(path), err.strerror or str(err)) from None
    finally:
        plt.close(fig)
