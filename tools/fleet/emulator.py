"""The emulated cloud of a fleet run in a process of its own.

Thousands of agents and the emulator in one Python process share one core (the GIL): a
wave that makes EC2 calls starves the IMDS thread until agents time out on it, which is
the machine's limit, not the fleet's. So the cloud, its EC2 endpoint and every
instance's IMDS (``ImdsMux``) run in a child process, on the other core; the agents
reach them over HTTP exactly as before. The runner drives the child over a pipe:
launch an instance (returns its IMDS URL), terminate, look up a link for the in-memory
host, read the VPC's usage and the request log.

Commands are plain tuples, answered in order; the pipe is locked, so any thread (the
agents' netlink threads ask for links) may call.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import resource
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ipam.nau.throttle import AccountThrottle, ThrottleTable

CNI_TAG = "kubernetes.io/role/cni"
AZ = "us-west-2a"


class EmulatorError(RuntimeError):
    """The emulator process refused a command or died; the message says which."""


@dataclass(frozen=True, slots=True)
class EmulatorInfo:
    ec2_url: str
    vpc_id: str
    subnet_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RequestSummary:
    requests: int
    throttled: int
    by_action: dict[str, int]
    carried_out_by_action: dict[str, int]  # answered without an error: EC2 changed state
    errors_by_code: dict[str, int]  # EC2's error answers, throttling and injected faults included


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One injected fault for every EC2 request (``tools.lab.ec2.faults``): ``kind`` is a
    ``FaultKind`` value, hit with ``probability``; ``latency_s`` for latency."""

    kind: str
    probability: float = 1.0
    latency_s: float = 0.0


def _serve(
    conn: multiprocessing.connection.Connection,
    seed: int,
    throttle: ThrottleTable | None,
    blocks: list[str],
    faults: tuple[FaultSpec, ...],
) -> None:
    from ipam.instance_types import lookup
    from tools.fleet.imds_mux import ImdsMux
    from tools.lab.ec2.faults import FaultKind, FaultRule
    from tools.lab.ec2.server import Ec2Server
    from tools.lab.ec2.state import Cloud, LaunchInterface
    from tools.lab.memory_host import LinkTable

    cloud = Cloud(seed=seed)
    for spec in faults:
        cloud.faults.add(
            FaultRule(FaultKind(spec.kind), probability=spec.probability, latency_s=spec.latency_s)
        )

    def fresh_account() -> None:
        """Full request buckets, as a new account has: AWS's limits are the account's, so
        each scenario of a run gets its own (the VPC and its addresses stay)."""
        if throttle is not None:
            cloud.throttle = AccountThrottle(throttle, cloud.clock)

    fresh_account()
    links = LinkTable()
    cloud.subscribe(links)
    vpc_id = cloud.create_vpc(blocks).vpc_id
    subnet_ids = tuple(
        cloud.create_subnet(vpc_id, block, AZ, {CNI_TAG: "1"}).subnet_id for block in blocks
    )
    server = Ec2Server(cloud)
    server_url = server.start()
    mux = ImdsMux(cloud)

    def launch(
        instance_type: str, subnet_id: str, prefixes: int, efa_only_cards: bool
    ) -> tuple[str, str]:
        interfaces = [LaunchInterface(0, 0, ipv4_prefix_count=prefixes)]
        if efa_only_cards:  # as a GPU launch template gives them: one per other card
            cards = lookup(instance_type).network_cards
            interfaces += [
                LaunchInterface(c.index, 0, interface_type="efa-only") for c in cards if c.index
            ]
        instance = cloud.launch_instance(instance_type, subnet_id, interfaces=interfaces)
        return instance.instance_id, mux.add(instance.instance_id)

    def terminate(instance_ids: list[str]) -> None:
        for instance_id in instance_ids:
            mux.remove(instance_id)
            cloud.terminate_instance(instance_id)

    def usage() -> dict[str, int]:
        return {
            "nau_used": cloud.nau_used(vpc_id),
            "subnet_addresses_used": sum(cloud.subnet(s).space.stats().used for s in subnet_ids),
        }

    def requests_since(mark: int) -> RequestSummary:
        records = cloud.requests.records()[mark:]
        return RequestSummary(
            len(records),
            sum(1 for r in records if r.error_code == "RequestLimitExceeded"),
            dict(Counter(r.action for r in records)),
            dict(Counter(r.action for r in records if r.error_code is None)),
            dict(Counter(r.error_code for r in records if r.error_code is not None)),
        )

    def cpu_s() -> float:
        used = resource.getrusage(resource.RUSAGE_SELF)
        return used.ru_utime + used.ru_stime

    commands: dict[str, Any] = {
        "info": lambda: EmulatorInfo(server_url, vpc_id, subnet_ids),
        "fresh_account": fresh_account,
        "launch": launch,
        "terminate": terminate,
        "link": links.link,
        "usage": usage,
        "request_mark": lambda: len(cloud.requests.records()),
        "requests_since": requests_since,
        "cpu_s": cpu_s,
    }
    try:
        while True:
            try:
                name, args = conn.recv()
            except EOFError:
                return
            if name == "stop":
                conn.send((True, None))
                return
            try:
                conn.send((True, commands[name](*args)))
            except Exception as err:  # noqa: BLE001 - the runner gets it as EmulatorError
                conn.send((False, f"{name}: {type(err).__name__}: {err}"))
    finally:
        mux.close()
        server.close()


class EmulatorProcess:
    """The child process; ``call`` runs one command there and returns its answer."""

    def __init__(
        self,
        *,
        seed: int,
        throttle: ThrottleTable | None,
        blocks: list[str],
        faults: tuple[FaultSpec, ...] = (),
    ) -> None:
        context = multiprocessing.get_context("spawn")  # no threads or sockets inherited
        self._conn, child = context.Pipe()
        self._lock = threading.Lock()
        self._process = context.Process(
            target=_serve,
            args=(child, seed, throttle, blocks, faults),
            name="fleet-emulator",
            daemon=True,
        )
        self._process.start()
        child.close()
        self.info: EmulatorInfo = self.call("info")

    def call(self, name: str, *args: Any) -> Any:
        with self._lock:
            try:
                self._conn.send((name, args))
                ok, value = self._conn.recv()
            except (EOFError, OSError) as err:
                raise EmulatorError(f"the emulator process is gone ({name}): {err}") from err
        if not ok:
            raise EmulatorError(str(value))
        return value

    def link(self, instance_id: str, mac: str) -> str | None:
        found: str | None = self.call("link", instance_id, mac)
        return found

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self.call("stop")
            except EmulatorError:
                pass  # already gone: nothing left to stop
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
