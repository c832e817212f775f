"""Lab namespaces carry their owner: a lab's clean-up removes only what is provably its own
or provably dead, whatever state root each lab keeps its records under."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.lab import cli, netns, owner
from tools.lab.lab import Lab, LabConfig, read_records, remove_leftovers

pytestmark = pytest.mark.netns

SMALL = LabConfig(instance_type="m5.large")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


def test_two_labs_under_different_state_roots_leave_each_other_alone(tmp_path: Path) -> None:
    with Lab(SMALL, state_root=tmp_path / "a") as first:
        pod = first.create_pod_namespace("p")
        firsts = [first.vpc_ns, first.node_ns, pod]
        with Lab(SMALL, state_root=tmp_path / "b") as second:
            seconds = [second.vpc_ns, second.node_ns]
            assert all(netns.exists(n) for n in firsts)  # the second's start took none
            assert [r.lab_id for r in read_records(tmp_path / "b")] == [second.lab_id]
            with Lab(SMALL, state_root=tmp_path / "a") as third:  # same root, own records
                assert all(netns.exists(n) for n in [*firsts, *seconds])
            assert not netns.exists(third.node_ns)
        assert all(netns.exists(n) for n in firsts)  # the second's close took only its own
        assert not any(netns.exists(n) for n in seconds)
    assert not any(netns.exists(n) for n in firsts)


@pytest.fixture
def lab_in_child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    """A lab served by another process under state root ``tmp_path/child``; killed and
    its namespaces removed at the end whatever happened."""
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-m", "tools.lab.cli", "serve", "--ready-fd", str(write_fd)]
        + ["--instance-type", "m5.large"],
        pass_fds=(write_fd,),
        env={**os.environ, "ULTRANET_LAB_STATE": str(tmp_path / "child")},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    namespaces: list[str] = []
    try:
        with os.fdopen(read_fd) as ready:
            line = ready.readline()
        assert line, "lab child failed to start"
        namespaces += json.loads(line)["namespaces"]
        yield child, namespaces
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for name in namespaces:
            netns.delete(name)


def test_another_processs_lab_is_kept_while_it_lives_and_removed_once_killed(
    lab_in_child: tuple[subprocess.Popen[bytes], list[str]], tmp_path: Path
) -> None:
    child, namespaces = lab_in_child
    assert {owner.owner_of(n) for n in namespaces} == {
        owner.Owner(child.pid, owner.process_start(child.pid), str(tmp_path / "child"))
    }
    with Lab(SMALL, state_root=tmp_path / "mine"):
        assert all(netns.exists(n) for n in namespaces)
    child.send_signal(signal.SIGKILL)  # kill -9: it removes nothing of its own
    child.wait()
    with Lab(SMALL, state_root=tmp_path / "mine"):  # another root: still a crash's leftovers
        assert not any(netns.exists(n) for n in namespaces)
    assert not [n for n in owner.marked() if n in namespaces]


def test_a_namespace_with_no_owner_mark_is_left_alone(tmp_path: Path) -> None:
    name = f"{netns.PREFIX}unmarked-{os.urandom(4).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert owner.owner_of(name) is None
        remove_leftovers(tmp_path)
        assert netns.exists(name)  # nothing proves it dead
    finally:
        netns.delete(name)


def test_a_mark_naming_a_reused_pid_is_a_dead_owner(tmp_path: Path) -> None:
    with netns.scratch("reused") as name:
        assert owner.owner_of(name) == owner.Owner.this_process()
        remove_leftovers(tmp_path)
        assert netns.exists(name)  # this process lives
        owner.mark(name, owner.Owner(os.getpid(), "1"))  # this pid, another process's start
        remove_leftovers(tmp_path)  # (or another process's lab start, meanwhile)
        assert not netns.exists(name)


def test_a_scratch_namespace_and_its_mark_go_even_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError, match="the block failed"), netns.scratch("fails") as name:
        assert netns.exists(name) and name in owner.marked()
        raise RuntimeError("the block failed")
    assert not netns.exists(name)
    assert name not in owner.marked()


def test_marks_of_gone_namespaces_are_pruned_only_when_their_owner_is_gone() -> None:
    exited = subprocess.Popen(["true"])
    exited.wait()
    dead = f"{netns.PREFIX}pruned-{os.urandom(4).hex()}"
    pending = f"{netns.PREFIX}pending-{os.urandom(4).hex()}"
    try:
        owner.mark(dead, owner.Owner(exited.pid, "1"))
        owner.mark(pending, owner.Owner.this_process())  # about to create it, say
        netns.prune_marks()  # (or another process's lab start, meanwhile)
        assert dead not in owner.marked()
        assert pending in owner.marked()
    finally:
        owner.unmark(dead)
        owner.unmark(pending)


def test_status_lists_unmarked_namespaces_and_not_a_live_owners(
    capsys: pytest.CaptureFixture[str],
) -> None:
    unmarked = f"{netns.PREFIX}unmarked-{os.urandom(4).hex()}"
    subprocess.run(["ip", "netns", "add", unmarked], check=True)
    try:
        with netns.scratch("live") as live:
            assert cli.main(["status", "--json"]) == 0
            status = json.loads(capsys.readouterr().out)
        assert unmarked in status["unowned_namespaces"]
        assert unmarked not in status["orphan_namespaces"]
        assert live not in status["unowned_namespaces"] + status["orphan_namespaces"]
    finally:
        netns.delete(unmarked)
