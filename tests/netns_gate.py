"""Who runs the namespace tests: skipped without root, and never skipped when required.

Tests marked ``netns`` need root and iproute2; elsewhere they are skipped, so that a
developer without root still runs the rest. CI runs as root and must run every one of
them: with ``ULTRANET_REQUIRE_NETNS=1`` (``.ci/run`` sets it when root) a skipped ``netns``
test, whatever skipped it (no root, a missing tool, ``pytest.skip`` in a fixture), is
reported as a failure naming the reason. ``tests/conftest.py`` installs these hooks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator

import pytest

REQUIRE_NETNS = "ULTRANET_REQUIRE_NETNS"


def netns_capable() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if netns_capable():
        return
    skip = pytest.mark.skip(reason="needs root and iproute2 for network namespaces")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and "netns" in item.keywords
        and os.environ.get(REQUIRE_NETNS) == "1"
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"a netns test was skipped while {REQUIRE_NETNS}=1 "
            f"(every namespace test must run here): {reason}"
        )
