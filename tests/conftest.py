"""Shared fixtures: the node lab, built and always torn down."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from tools.lab.lab import Lab, LabConfig


def netns_capable() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if netns_capable():
        return
    skip = pytest.mark.skip(reason="needs root and iproute2 for network namespaces")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


LabFactory = Callable[..., Lab]


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """Start labs on demand; every one is closed at the end, even when the test fails."""
    labs: list[Lab] = []

    def start(config: LabConfig | None = None, **overrides: object) -> Lab:
        base = replace(config or LabConfig(instance_type="m5.large"), **overrides)
        lab = Lab(base)
        labs.append(lab)
        lab.start()
        return lab

    try:
        yield start
    finally:
        for lab in reversed(labs):
            lab.close()


@pytest.fixture
def lab(lab_factory: LabFactory) -> Lab:
    """A small lab: an m5.large (one card, three ENIs) launched with one prefix."""
    return lab_factory()
