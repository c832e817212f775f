"""The durable datastore: journal, group commit, torn tails, corruption, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni.keys import IpamKey, PodRef
from ipam.datastore import (
    Datastore,
    DatastoreWriteError,
    Journal,
    JournalCorrupt,
    _add_line,
    _del_line,
    _parse_line,
    _record_to_json,
)
from ipam.pool import AddressPool, EniInfo
from ipam.records import AllocationRecord, RecordedAddress

SUBNET = IPv4Network("100.64.0.0/18")
POD = PodRef("default", "web")


def key(n: int) -> IpamKey:
    return IpamKey("ultranet", f"c{n:05d}", "eth0")


def make_pool(prefixes: int = 4, *, cooldown_s: float = 30.0) -> AddressPool:
    pool = AddressPool([0], cooldown_s=cooldown_s)
    info = EniInfo("eni-0001", 0, 0, SUBNET, IPv4Address("100.64.0.10"), 49)
    pool.card(0).add_eni(info)
    for n in range(prefixes):
        pool.card(0).add_prefix(
            info.eni_id, IPv4Network((int(SUBNET.network_address) + 256 + 16 * n, 28))
        )
    return pool


def open_store(directory: Path, prefixes: int = 4, **kwargs: object) -> Datastore:
    store = Datastore(make_pool(prefixes), Journal(directory), **kwargs)  # type: ignore[arg-type]
    store.restore()
    return store


def test_committed_allocations_survive_a_restart(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    held = {n: store.allocate(key(n), POD, float(n)).leases[0].address for n in range(10)}
    store.commit(10.0)
    store.release(key(3), 11.0)
    store.commit(11.0)
    store.close()

    again = open_store(tmp_path)
    restored = {a.key: a.leases[0].address for a in again.pool.allocations()}
    assert restored == {key(n): held[n] for n in range(10) if n != 3}
    fresh = again.allocate(key(50), POD, 12.0).leases[0].address
    assert fresh not in restored.values()


def test_uncommitted_changes_are_not_persisted(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.allocate(key(1), POD, 0.0)
    store.commit(0.0)
    store.allocate(key(2), POD, 1.0)  # never committed: never acknowledged
    store.close()
    again = open_store(tmp_path)
    assert [a.key for a in again.pool.allocations()] == [key(1)]


def test_one_commit_covers_a_batch(tmp_path: Path) -> None:
    store = open_store(tmp_path, prefixes=8)
    for n in range(100):
        store.allocate(key(n), POD, 0.0)
    assert store.journal.staged == 100
    store.commit(0.0)
    assert store.journal.staged == 0
    lines = (tmp_path / "allocations.journal").read_bytes().splitlines()
    assert len(lines) == 100


def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.allocate(key(1), POD, 0.0)
    store.allocate(key(2), POD, 0.0)
    store.commit(0.0)
    store.close()
    journal = tmp_path / "allocations.journal"
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) - 7])  # the crash cut the second line short
    again = open_store(tmp_path)
    assert [a.key for a in again.pool.allocations()] == [key(1)]


def test_damage_before_the_end_refuses_to_guess(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for n in range(3):
        store.allocate(key(n), POD, 0.0)
    store.commit(0.0)
    store.close()
    journal = tmp_path / "allocations.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"c00001", b"c00009")  # checksum no longer matches
    journal.write_bytes(b"".join(lines))
    with pytest.raises(JournalCorrupt, match="line 2"):
        open_store(tmp_path)


def test_snapshot_compacts_the_journal(tmp_path: Path) -> None:
    store = open_store(tmp_path, snapshot_every=50)
    for n in range(60):
        store.allocate(key(n), POD, 0.0)
        store.commit(0.0)
    assert store.journal.lines_since_snapshot < 50
    snapshot = json.loads((tmp_path / "allocations.json").read_text())
    assert snapshot["version"] == "ultranet-ipam/1"
    assert len(snapshot["allocations"]) >= 50
    store.close()
    assert len(list(open_store(tmp_path).pool.allocations())) == 60


def test_records_whose_prefix_is_gone_are_dropped_durably(tmp_path: Path) -> None:
    store = open_store(tmp_path, prefixes=2)
    for n in range(20):  # 16 on the first prefix, 4 on the second
        store.allocate(key(n), POD, 0.0)
    store.commit(0.0)
    store.close()
    smaller = Datastore(make_pool(1), Journal(tmp_path))
    report = smaller.restore()
    assert report.restored == 16 and len(report.dropped) == 4
    smaller.close()
    assert len(list(open_store(tmp_path).pool.allocations())) == 16


def test_a_failed_commit_undoes_the_allocations_it_covered(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.allocate(key(1), POD, 0.0)
    store.commit(0.0)
    store.allocate(key(2), POD, 1.0)
    store.release(key(1), 1.0)
    store.journal.close()
    read_only = os.open(tmp_path / "allocations.journal", os.O_RDONLY)
    store.journal._fd = read_only  # the next write fails as on a full or broken disk
    with pytest.raises(DatastoreWriteError):
        store.commit(1.0)
    assert store.pool.get(key(2)) is None  # never acknowledged, so not kept
    assert store.pool.get(key(1)) is None  # the release stays, and is retried
    assert store.journal.staged == 2  # both keys released in the journal on the next commit
    os.close(read_only)
    store.journal._fd = None
    store.commit(2.0)
    store.close()
    assert list(open_store(tmp_path).pool.allocations()) == []


WRITER = """
import sys
from pathlib import Path
from ipaddress import IPv4Address, IPv4Network
from ipam.datastore import Datastore, Journal
from cni.keys import IpamKey, PodRef
from ipam.pool import AddressPool, EniInfo

directory = Path(sys.argv[1])
pool = AddressPool([0], cooldown_s=0)
info = EniInfo("eni-0001", 0, 0, IPv4Network("100.64.0.0/18"), IPv4Address("100.64.0.10"), 49)
pool.card(0).add_eni(info)
for n in range(16):
    pool.card(0).add_prefix(info.eni_id, IPv4Network((int(IPv4Address("100.64.1.0")) + 16 * n, 28)))
store = Datastore(pool, Journal(directory), snapshot_every=64)
store.restore()
live = sorted(a.key.container_id for a in store.pool.allocations())
n = int(sys.argv[2])
out = sys.stdout


def release(container, batch):
    # Said before it happens: a release may be durable before it is acknowledged.
    out.write(f"intent {container}\\n")
    out.flush()
    store.release(IpamKey("ultranet", container, "eth0"), 0.0)
    batch.append(f"del {container}")

while True:
    batch = []
    for _ in range(8):
        n += 1
        k = IpamKey("ultranet", f"k{n:07d}", "eth0")
        allocation = store.allocate(k, PodRef("d", "p"), 0.0)
        batch.append(f"add {k.container_id} {allocation.leases[0].address}")
        if n % 3 == 0 and live:
            release(live.pop(0), batch)
        live.append(k.container_id)
    while len(live) > 150:
        release(live.pop(0), batch)
    store.commit(0.0)
    out.write("\\n".join(batch) + "\\n")  # acknowledged only after the commit
    out.flush()
"""


def test_kill_9_mid_burst_loses_nothing_acknowledged_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    acknowledged: dict[str, str] = {}  # acknowledged adds, minus acknowledged releases
    maybe_released: set[str] = set()  # releases begun, perhaps durable, not acknowledged

    def take(raw: str) -> None:
        line = raw.split()
        if len(line) == 3 and line[0] == "add":
            acknowledged[line[1]] = line[2]
        elif len(line) == 2 and line[0] == "intent":
            maybe_released.add(line[1])
        elif len(line) == 2 and line[0] == "del":
            acknowledged.pop(line[1], None)
            maybe_released.discard(line[1])

    counter = 0
    for trial in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(counter)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None and child.stderr is not None
            for _ in range(60 + 41 * trial):  # a different instant each trial
                raw = child.stdout.readline().decode()
                assert raw, child.stderr.read().decode()
                take(raw)
            child.send_signal(signal.SIGKILL)
            child.wait()
            for raw in child.stdout.read().decode().splitlines():
                take(raw)  # written before the kill, still in the pipe
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()
        counter += 100_000
        records, _ = Journal(tmp_path).load()
        durable = {r.key.container_id: str(r.addresses[0].address) for r in records}
        for container, address in acknowledged.items():
            if container not in maybe_released:
                assert durable.get(container) == address, (trial, container)
        addresses = list(durable.values())
        assert len(addresses) == len(set(addresses)), f"duplicate address after trial {trial}"
        # The next incarnation starts from what is durable.
        acknowledged = dict(durable)
        maybe_released.clear()


_names = st.text(min_size=1).filter(lambda s: "/" not in s and not any(c.isspace() for c in s))
_container_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,40}", fullmatch=True)


@st.composite
def _records(draw: st.DrawFn) -> AllocationRecord:
    addresses = tuple(
        RecordedAddress(card, IPv4Address(draw(st.integers(0, (1 << 32) - 1))))
        for card in range(draw(st.integers(1, 4)))
    )
    return AllocationRecord(
        IpamKey(draw(_names), draw(_container_ids), draw(st.sampled_from(["eth0", "net1"]))),
        PodRef(draw(st.text(min_size=1)), draw(st.text(min_size=1))),
        addresses,
        draw(st.floats(0, 1e10)),
        draw(st.sampled_from(["cni", "api"])),
    )


@given(_records())
def test_journal_lines_say_what_the_generic_encoding_says(record: AllocationRecord) -> None:
    # The lines are formatted by hand for speed; what they parse to must be exactly the
    # generic encoding, for any name the validation lets through (quotes, backslashes,
    # control and non-ASCII characters included).
    added = _parse_line(_add_line(record))
    assert added == {"op": "add", **_record_to_json(record)}
    deleted = _parse_line(_del_line(record.key))
    assert deleted == {
        "op": "del",
        "network": record.key.network,
        "containerID": record.key.container_id,
        "ifName": record.key.ifname,
    }
