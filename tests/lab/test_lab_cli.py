"""``ultranet-lab down``: which labs it stops. Every lab on the machine has a record (the
tests' in-process labs too), so stopping is driven here through fakes of the records, the
stop and the leftover sweep: a wrong answer must not stop anyone's real lab."""

from __future__ import annotations

import os

import pytest

from tools.lab import cli
from tools.lab.lab import LabRecord

LABS = [LabRecord(lab_id, 100 + n, "1", [f"ul-{lab_id}-node"]) for n, lab_id in enumerate("abc")]


@pytest.fixture
def stopped(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the labs ``down`` stops (nothing real is stopped or removed)."""
    stops: list[str] = []

    def stop(record: LabRecord) -> str:
        stops.append(record.lab_id)
        return f"lab {record.lab_id} down"

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cli, "read_records", lambda: list(LABS))
    monkeypatch.setattr(cli, "_stop", stop)
    monkeypatch.setattr(cli, "remove_leftovers", lambda: [])
    return stops


def test_down_without_an_id_refuses_and_stops_nothing(
    stopped: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["down"]) == 2
    assert stopped == []
    err = capsys.readouterr().err
    assert "down needs a lab id (labs: a, b, c), or --all to stop every lab" in err


def test_down_all_stops_every_lab(stopped: list[str]) -> None:
    assert cli.main(["down", "--all"]) == 0
    assert stopped == ["a", "b", "c"]


def test_down_with_an_id_stops_only_that_lab(stopped: list[str]) -> None:
    assert cli.main(["down", "b"]) == 0
    assert stopped == ["b"]


def test_down_with_an_unknown_id_or_an_id_and_all_stops_nothing(
    stopped: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["down", "z"]) == 2
    assert "no lab z" in capsys.readouterr().err
    assert cli.main(["down", "b", "--all"]) == 2
    assert "a lab id or --all, not both" in capsys.readouterr().err
    assert stopped == []
