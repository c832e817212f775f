"""The durable datastore: the address pool plus a journal, so no acknowledged
allocation is ever lost and no address is ever handed out twice across a crash.

The VPC CNI rewrites its whole checkpoint file (temp file, fsync, rename) on every assign
and unassign (``aws/amazon-vpc-cni-k8s``, ``pkg/ipamd/datastore/checkpoint.go``). That
costs a full rewrite per pod; at hundreds of pods per node and bursts of pod starts it is
the throughput ceiling. ultranet appends one checksummed line per change to a journal
instead and makes it durable with one ``fsync`` per *batch* of changes (group commit):
``allocate``/``release`` change the pool at once and stage a journal entry, ``commit``
writes and syncs everything staged, and the caller acknowledges a request only after the
commit that covers it. A snapshot of all allocations is written from time to time (temp
file, fsync, rename, directory fsync) and the journal restarts empty.

Why this is crash-safe:

* an allocation reaches a client only after its journal line is on disk;
* journal order is the order changes were applied, under one lock (the caller's
  event loop), so a durable allocation of an address implies the durable release of
  whoever held it before;
* a crash mid-write leaves a torn last line, which never reached a client (its commit
  did not return): ``load`` drops it. A bad line *before* the end is corruption, and
  loading refuses rather than guess;
* a snapshot holds only durable changes (lines still staged are written first), so
  replaying the journal it replaces over it gives the same state (each line sets or
  deletes one key), and a crash between the snapshot's rename and the journal's
  truncation is harmless. (A snapshot that also held staged changes was not: an old
  ``add`` replayed over a newer, not yet durable release and re-allocation of the same
  address gave two records one address, and the next start refused to restore.)

Only allocations are persisted; ENIs and prefixes come back from IMDS and EC2. An
address is written under ``"ipv4"`` or ``"ipv6"`` by its family (an ``ENABLE_IPv6`` node's
/128s), so one format serves both modes and the datastore does not care which it holds.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path
from typing import Any, Protocol

from cni.backend import Allocation, PodAddress
from cni.keys import IpamKey, PodRef
from cni.pausepoint import pause_point
from ipam.datastore_errors import DatastoreError
from ipam.records import AllocationRecord, RecordedAddress

log = logging.getLogger("ultranet.ipamd.datastore")

FORMAT = "ultranet-ipam/1"
SNAPSHOT_NAME = "allocations.json"
JOURNAL_NAME = "allocations.journal"


class JournalCorrupt(DatastoreError):
    """The journal or snapshot cannot be read back without guessing."""


class DatastoreWriteError(DatastoreError):
    """A commit failed; the changes it covered were not acknowledged."""


def _family_key(address: PodAddress) -> str:
    return "ipv4" if address.version == 4 else "ipv6"


def _address_from_json(raw: dict[str, Any]) -> RecordedAddress:
    address: PodAddress = IPv6Address(raw["ipv6"]) if "ipv6" in raw else IPv4Address(raw["ipv4"])
    return RecordedAddress(int(raw["card"]), address)


def _record_to_json(record: AllocationRecord) -> dict[str, Any]:
    return {
        "network": record.key.network,
        "containerID": record.key.container_id,
        "ifName": record.key.ifname,
        "k8sPodNamespace": record.pod.namespace,
        "k8sPodName": record.pod.name,
        "addresses": [
            {"card": a.card, _family_key(a.address): str(a.address)} for a in record.addresses
        ],
        "allocatedAt": record.allocated_at,
        "origin": record.origin,
        **({"egressV4": str(record.egress_v4)} if record.egress_v4 is not None else {}),
    }


def _key_from_json(raw: dict[str, Any]) -> IpamKey:
    return IpamKey(str(raw["network"]), str(raw["containerID"]), str(raw["ifName"]))


def _record_from_json(raw: dict[str, Any]) -> AllocationRecord:
    return AllocationRecord(
        key=_key_from_json(raw),
        pod=PodRef(str(raw["k8sPodNamespace"]), str(raw["k8sPodName"])),
        addresses=tuple(_address_from_json(a) for a in raw["addresses"]),
        allocated_at=float(raw["allocatedAt"]),
        origin=str(raw.get("origin", "api")),
        egress_v4=IPv4Address(raw["egressV4"]) if "egressV4" in raw else None,
    )


def _checksummed(body: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _add_line(record: AllocationRecord) -> bytes:
    """The journal line of ``{"op": "add", **_record_to_json(record)}``, formatted
    directly: one is written for every allocation, and a generic dump of the dict cost
    four times this."""
    key, pod = record.key, record.pod
    addresses = ",".join(
        f'{{"card":{a.card},"{_family_key(a.address)}":"{a.address}"}}' for a in record.addresses
    )
    egress = "" if record.egress_v4 is None else f',"egressV4":"{record.egress_v4}"'
    return _checksummed(
        (
            f'{{"op":"add","network":{_json_str(key.network)},'
            f'"containerID":{_json_str(key.container_id)},"ifName":{_json_str(key.ifname)},'
            f'"k8sPodNamespace":{_json_str(pod.namespace)},"k8sPodName":{_json_str(pod.name)},'
            f'"addresses":[{addresses}],"allocatedAt":{float(record.allocated_at)!r},'
            f'"origin":{_json_str(record.origin)}{egress}}}'
        ).encode()
    )


def _del_line(key: IpamKey) -> bytes:
    return _checksummed(
        (
            f'{{"op":"del","network":{_json_str(key.network)},'
            f'"containerID":{_json_str(key.container_id)},"ifName":{_json_str(key.ifname)}}}'
        ).encode()
    )


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """The entry of one journal line, or None if it is torn or fails its checksum."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        entry = json.loads(body)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class LoadReport:
    records: int
    journal_lines: int
    torn_tail_bytes: int


class Journal:
    """Snapshot + append-only journal of allocation records in one directory."""

    def __init__(self, directory: Path, *, sync: bool = True) -> None:
        self.directory = directory
        self.snapshot_path = directory / SNAPSHOT_NAME
        self.journal_path = directory / JOURNAL_NAME
        self._sync = sync  # False only for tests and benchmarks that measure logic
        self._staged: list[bytes] = []
        self._fd: int | None = None
        self.lines_since_snapshot = 0

    # -- reading ---------------------------------------------------------------------

    def load(self) -> tuple[list[AllocationRecord], LoadReport]:
        """Every allocation the files hold; a torn last journal line is cut off."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state: dict[IpamKey, AllocationRecord] = {}
        if self.snapshot_path.exists():
            try:
                document = json.loads(self.snapshot_path.read_bytes())
                if document.get("version") != FORMAT:
                    raise JournalCorrupt(
                        f"{self.snapshot_path}: version {document.get('version')!r}, "
                        f"expected {FORMAT!r}"
                    )
                for raw in document["allocations"]:
                    record = _record_from_json(raw)
                    state[record.key] = record
            except (ValueError, KeyError, TypeError) as err:
                raise JournalCorrupt(f"{self.snapshot_path}: {err}") from err
        lines = 0
        torn = 0
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            offset = 0
            chunks = data.splitlines(keepends=True)
            for index, chunk in enumerate(chunks):
                entry = _parse_line(chunk)
                if entry is None:
                    if index == len(chunks) - 1:
                        torn = len(chunk)
                        break
                    raise JournalCorrupt(
                        f"{self.journal_path}: line {index + 1} (byte {offset}) is damaged "
                        "and is not the last line; refusing to guess the allocations"
                    )
                self._apply(state, entry, index + 1)
                offset += len(chunk)
                lines += 1
            if torn:
                log.warning(
                    "datastore: dropped a torn last journal line (%d bytes): a change that "
                    "was never acknowledged",
                    torn,
                )
                with open(self.journal_path, "r+b") as handle:
                    handle.truncate(offset)
                    if self._sync:
                        os.fsync(handle.fileno())
        self.lines_since_snapshot = lines
        return list(state.values()), LoadReport(len(state), lines, torn)

    def _apply(self, state: dict[IpamKey, AllocationRecord], entry: dict[str, Any], n: int) -> None:
        try:
            if entry["op"] == "add":
                record = _record_from_json(entry)
                state[record.key] = record
            elif entry["op"] == "del":
                state.pop(_key_from_json(entry), None)
            else:
                raise JournalCorrupt(f"{self.journal_path}: line {n}: unknown op {entry['op']!r}")
        except (KeyError, ValueError, TypeError) as err:
            raise JournalCorrupt(f"{self.journal_path}: line {n}: {err}") from err

    # -- writing ---------------------------------------------------------------------

    def stage_add(self, record: AllocationRecord) -> None:
        self._staged.append(_add_line(record))

    def stage_del(self, key: IpamKey) -> None:
        self._staged.append(_del_line(key))

    @property
    def staged(self) -> int:
        return len(self._staged)

    def commit(self) -> int:
        """Write and sync everything staged, in one write; returns the lines written.

        On failure the file is cut back to where it was, so no partial line is left for
        later appends to follow, and the staged lines stay staged.
        """
        if not self._staged:
            return 0
        self.write(self._staged)
        count = len(self._staged)
        self._staged.clear()
        return count

    def take_staged(self) -> list[bytes]:
        staged, self._staged = self._staged, []
        return staged

    def restage_first(self, lines: list[bytes]) -> None:
        """Put lines back ahead of what was staged since: journal order is apply order."""
        self._staged[:0] = lines

    def write(self, lines: list[bytes]) -> None:
        """Append ``lines`` and make them durable. Safe on a worker thread, provided no
        other journal method runs meanwhile (the datastore keeps one batch in flight)."""
        fd = self._open()
        start = os.lseek(fd, 0, os.SEEK_END)
        payload = b"".join(lines)
        try:
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            if self._sync:
                os.fdatasync(fd)
        except OSError as err:
            try:
                os.ftruncate(fd, start)
            except OSError as cut:
                log.error("datastore: cannot cut the journal back after a failed write: %s", cut)
            raise DatastoreWriteError(f"journal {self.journal_path}: write failed: {err}") from err
        self.lines_since_snapshot += len(lines)

    def snapshot(self, records: Iterable[AllocationRecord]) -> None:
        """Write every allocation to the snapshot atomically, then empty the journal."""
        if self._staged:
            raise DatastoreError("commit staged changes before a snapshot")
        document = {"version": FORMAT, "allocations": [_record_to_json(r) for r in records]}
        tmp = self.snapshot_path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            handle.write(json.dumps(document, indent=1, sort_keys=True).encode())
            if self._sync:
                handle.flush()
                os.fsync(handle.fileno())
        pause_point("snapshot-written")
        os.replace(tmp, self.snapshot_path)
        if self._sync:
            _fsync_directory(self.directory)
        pause_point("snapshot-renamed")
        fd = self._open()
        os.ftruncate(fd, 0)
        if self._sync:
            os.fsync(fd)
        self.lines_since_snapshot = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(
                self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
            if self._sync:
                _fsync_directory(self.directory)
        return self._fd


@dataclass(frozen=True, slots=True)
class Batch:
    """Journal lines on their way to disk, and the changes they carry."""

    lines: list[bytes]
    adds: list[IpamKey]
    dels: list[IpamKey]


@dataclass(frozen=True, slots=True)
class RestoreReport:
    restored: int
    dropped: tuple[tuple[AllocationRecord, str], ...]
    torn_tail_bytes: int


class AllocationPool(Protocol):
    """What the datastore needs of a pool: ``ipam.pool.AddressPool`` (/28 prefixes) or
    ``ipam.pool6.Ipv6PrefixPool`` (/128s of a /80)."""

    def get(self, key: IpamKey) -> Allocation | None: ...

    def allocations(self) -> Iterable[Allocation]: ...

    def allocate(
        self, key: IpamKey, pod: PodRef, now: float, *, cards: Sequence[int], origin: str
    ) -> Allocation: ...

    def release(self, key: IpamKey, now: float, *, cooldown: bool = True) -> Allocation | None: ...

    def restore(
        self, records: Iterable[AllocationRecord]
    ) -> list[tuple[AllocationRecord, str]]: ...


class Datastore:
    """The pool and its journal. Not thread-safe: one event loop drives it."""

    def __init__(
        self, pool: AllocationPool, journal: Journal, *, snapshot_every: int = 5000
    ) -> None:
        self.pool = pool
        self.journal = journal
        self.snapshot_every = snapshot_every
        self._pending_adds: list[IpamKey] = []
        self._pending_dels: list[IpamKey] = []

    def restore(self) -> RestoreReport:
        """Load the journal into the pool (ENIs and prefixes must be in it already).

        Records whose address is on no known prefix are dropped and the drop is made
        durable; what remains is written as a fresh snapshot.
        """
        records, report = self.journal.load()
        dropped = self.pool.restore(records)
        for record, reason in dropped:
            log.warning("datastore: dropped allocation %s: %s", record.key, reason)
        self.journal.snapshot(AllocationRecord.of(a) for a in self.pool.allocations())
        return RestoreReport(len(records) - len(dropped), tuple(dropped), report.torn_tail_bytes)

    def allocate(
        self,
        key: IpamKey,
        pod: PodRef,
        now: float,
        *,
        cards: Sequence[int] = (0,),
        origin: str = "api",
    ) -> Allocation:
        """Allocate in memory and stage its journal line; durable after ``commit``."""
        existing = self.pool.get(key)
        if existing is not None:
            return existing
        allocation = self.pool.allocate(key, pod, now, cards=cards, origin=origin)
        self.journal.stage_add(AllocationRecord.of(allocation))
        self._pending_adds.append(key)
        return allocation

    def release(self, key: IpamKey, now: float, *, cooldown: bool = True) -> Allocation | None:
        allocation = self.pool.release(key, now, cooldown=cooldown)
        if allocation is not None:
            self.journal.stage_del(key)
            self._pending_dels.append(key)
        return allocation

    def drop(self, allocations: Iterable[Allocation]) -> None:
        """Stage the removal of allocations the pool already lost (force-removed ENI)."""
        for allocation in allocations:
            self.journal.stage_del(allocation.key)
            self._pending_dels.append(allocation.key)

    def commit(self, now: float) -> None:
        """Make every staged change durable, or undo the staged allocations and raise."""
        batch = self.take_batch()
        error: DatastoreWriteError | None = None
        try:
            self.write_batch(batch)
        except DatastoreWriteError as err:
            error = err
        self.finish_batch(batch, error, now)
        if error is not None:
            raise error

    # A commit in three steps, so the daemon can sync on a worker thread while its event
    # loop goes on applying and staging the next batch: take (loop), write (thread),
    # finish (loop). One batch is in flight at a time.

    def take_batch(self) -> Batch:
        batch = Batch(self.journal.take_staged(), self._pending_adds, self._pending_dels)
        self._pending_adds, self._pending_dels = [], []
        return batch

    def write_batch(self, batch: Batch) -> None:
        if batch.lines:
            self.journal.write(batch.lines)

    def finish_batch(self, batch: Batch, error: DatastoreWriteError | None, now: float) -> None:
        """After a failed write: undo its allocations (never acknowledged) and put a
        release of every key it touched in front of the queue. The releases are retried
        by the next commit (a runtime also retries DEL until it succeeds); releasing the
        undone allocations too keeps the journal right even if a snapshot caught them.

        A snapshot must hold only durable changes (see the module's docstring), so lines
        staged meanwhile (commits on a worker thread) are written before it; their batch
        then finds nothing left to write. If that write fails, the snapshot waits.
        """
        if error is not None:
            for key in batch.adds:
                self.pool.release(key, now)
            retried = [*batch.dels, *batch.adds]
            self.journal.restage_first([_del_line(k) for k in retried])
            self._pending_dels[:0] = retried
            return
        if self.journal.lines_since_snapshot >= self.snapshot_every:
            staged = self.journal.take_staged()
            if staged:
                try:
                    self.journal.write(staged)
                except DatastoreWriteError as err:
                    self.journal.restage_first(staged)  # their own commit fails and says so
                    log.warning("datastore: snapshot postponed: %s", err)
                    return
            self.journal.snapshot(AllocationRecord.of(a) for a in self.pool.allocations())

    def close(self) -> None:
        self.journal.close()
