"""Shared fixtures: the node lab, built and always torn down."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

# Hooks: netns tests skip without root, and fail when skipped under ULTRANET_REQUIRE_NETNS=1.
from tests.netns_gate import (  # noqa: F401
    netns_capable,
    pytest_collection_modifyitems,
    pytest_runtest_makereport,
)
from tools.lab.lab import Lab, LabConfig

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
