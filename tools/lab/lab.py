"""A whole lab: the cloud emulator, a VPC, one instance, and its namespaces.

``Lab`` is a context manager used three ways: by the pytest fixture (in-process),
by ``ultranet-lab up`` (in a detached process) and by ``make demo``. Whatever happens,
``close()`` removes every namespace, link and listener the lab made. A record of
each running lab is written *before* its first namespace exists, and each namespace is
marked with its owning process (``tools.lab.owner``), so a start can find and remove what
a killed lab left behind (``remove_leftovers``) and nothing a live one holds, whatever
state root either uses.

Only 100.64.0.0/10 and 198.18.0.0/15 (and, with ``ipv6``, fd00::/8 and link-local
fe80::/64) are used, and only inside the lab's namespaces; nothing is added to the
machine's root namespace. The one exception to those ranges is 169.254.169.254 inside
the node namespace, because that is where software on an EC2 instance finds IMDS.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from pyroute2 import IPRoute

from ipam.instance_types import lookup
from tools.lab import netns, owner
from tools.lab.ec2.server import Ec2Server, ImdsServer
from tools.lab.ec2.state import Cloud, LaunchInterface
from tools.lab.node import LabNode
from tools.lab.owner import process_running, process_start

log = logging.getLogger("ultranet.lab")

STATE_ROOT = Path(os.environ.get("ULTRANET_LAB_STATE", "/run/ultranet-lab"))
IMDS_ADDRESS = "169.254.169.254"
NODE_EC2_PORT = 8773
CNI_SUBNET_TAG = "kubernetes.io/role/cni"


@dataclass(frozen=True, slots=True)
class SubnetSpec:
    cidr: str
    availability_zone: str
    tags: dict[str, str] = field(default_factory=dict)


DEFAULT_SUBNETS = (
    SubnetSpec("100.64.0.0/18", "us-west-2a", {CNI_SUBNET_TAG: "1"}),
    SubnetSpec("100.64.64.0/18", "us-west-2a", {CNI_SUBNET_TAG: "1"}),
    SubnetSpec("100.64.128.0/18", "us-west-2b", {CNI_SUBNET_TAG: "1"}),
)


@dataclass(frozen=True, slots=True)
class LabConfig:
    instance_type: str = "p5.48xlarge"
    prefixes_per_card: int = 1  # pre-assigned at launch, as a launch template's Ipv4PrefixCount
    # What sits on cards > 0 at launch, device index 1 as AWS's EFA guide does:
    # "efa" (EFA with ENA, has IPs), "interface", "efa-only" (no IP) or "none".
    other_cards: str = "efa"
    vpc_cidrs: tuple[str, ...] = ("100.64.0.0/16",)
    subnets: tuple[SubnetSpec, ...] = DEFAULT_SUBNETS
    nau_quota: int | None = None  # None: the emulator's default (the 64,000 default quota)
    seed: int = 0
    # IPv6 as an EKS IPv6 cluster's VPC has it: a /56 (unique-local, the lab's choice), a
    # /64 per subnet with AssignIpv6AddressOnCreation (the node's own IPv6 address), and
    # ``ipv6_prefixes`` /80s on the primary interface at launch (0: none; the node agent
    # assigns its own).
    ipv6: bool = False
    ipv6_prefixes: int = 1


@dataclass(frozen=True, slots=True)
class LabRecord:
    lab_id: str
    pid: int
    pid_start: str
    namespaces: list[str]
    ec2_url: str = ""
    imds_url: str = ""
    node_ec2_url: str = ""
    instance_id: str = ""
    instance_type: str = ""


def is_alive(record: LabRecord) -> bool:
    return record.pid_start != "" and process_running(record.pid, record.pid_start)


def read_records(state_root: Path = STATE_ROOT) -> list[LabRecord]:
    if not state_root.is_dir():
        return []
    records = []
    for path in sorted(state_root.glob("*.json")):
        records.append(LabRecord(**json.loads(path.read_text())))
    return records


def remove_lab(lab_id: str, state_root: Path = STATE_ROOT) -> list[str]:
    """Delete every namespace of a lab and its record; returns what was removed.

    Called for this process's own lab or for one whose process is gone, so a namespace
    named like the lab's is spared only when its mark names another live process."""
    removed = []
    for name in netns.list_lab_namespaces():
        if name.startswith(f"{netns.PREFIX}{lab_id}-") and not owner.held_by_another(name):
            netns.delete(name)
            removed.append(name)
    (state_root / f"{lab_id}.json").unlink(missing_ok=True)
    return removed


def remove_leftovers(state_root: Path = STATE_ROOT) -> list[str]:
    """Remove what killed processes left: the labs recorded under ``state_root`` whose
    process is gone, and, whatever their state root, the lab namespaces whose owner mark
    names a process that is gone. A namespace whose owner lives stays (another lab, a
    test, a benchmark), and so does one with no mark: nothing proves it dead."""
    removed: list[str] = []
    for record in read_records(state_root):
        if not is_alive(record):
            removed += remove_lab(record.lab_id, state_root)
    unowned = []
    for name in netns.list_lab_namespaces():
        mark = owner.owner_of(name)
        if mark is None:
            unowned.append(name)
        elif not mark.alive():
            netns.delete(name)
            removed.append(name)
    netns.prune_marks()
    if removed:
        log.warning("lab: removed leftovers of killed labs: %s", ", ".join(removed))
    if unowned:
        log.warning("lab: namespaces with no owner mark left alone: %s", ", ".join(unowned))
    return removed


def launch_interfaces(
    instance_type: str, prefixes_per_card: int, other_cards: str, ipv6_prefixes: int = 0
) -> list[LaunchInterface]:
    """A launch template's NetworkInterfaces: the primary, and one per other network card.

    Cards > 0 get device index 1, as AWS's EFA guide launches them; ``other_cards`` is
    their InterfaceType, or "none". Every interface with IPs gets the same prefix count;
    the primary also ``ipv6_prefixes`` /80s (EKS IPv6 puts its one /80 there).
    """
    interfaces = [
        LaunchInterface(0, 0, ipv4_prefix_count=prefixes_per_card, ipv6_prefix_count=ipv6_prefixes)
    ]
    if other_cards == "none":
        return interfaces
    prefixes = 0 if other_cards == "efa-only" else prefixes_per_card
    for card in lookup(instance_type).network_cards:
        if card.index != 0:
            interfaces.append(
                LaunchInterface(
                    card.index, 1, interface_type=other_cards, ipv4_prefix_count=prefixes
                )
            )
    return interfaces


class Lab:
    """One emulated instance in one emulated VPC. Use as a context manager."""

    def __init__(self, config: LabConfig | None = None, *, state_root: Path = STATE_ROOT) -> None:
        self.config = config or LabConfig()
        self.lab_id = secrets.token_hex(3)
        self.state_root = state_root
        self.vpc_ns = f"{netns.PREFIX}{self.lab_id}-vpc"
        self.node_ns = f"{netns.PREFIX}{self.lab_id}-node"
        self.cloud = Cloud(seed=self.config.seed)
        self.vpc_id = ""
        self.subnet_ids: list[str] = []
        self.instance_id = ""
        self.ec2_url = ""  # on the host's loopback
        self.imds_url = ""  # on the host's loopback, for tests running outside the node
        self.node_ec2_url = ""  # on the node namespace's loopback
        self._servers: list[Ec2Server | ImdsServer] = []
        self._pods: list[str] = []
        self._netlink: netns.Netlink | None = None  # sockets in vpc_ns and node_ns
        self._node: LabNode | None = None
        self._node_subscribed = False

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        lookup(self.config.instance_type)  # fail before creating anything
        remove_leftovers(self.state_root)
        self._write_record()
        netns.create(self.vpc_ns, state_root=self.state_root)
        netns.create(self.node_ns, state_root=self.state_root)
        self._netlink = netns.Netlink([self.vpc_ns, self.node_ns], name=f"netlink-{self.lab_id}")
        self._netlink.run(self._loopbacks_up)
        netns.sysctl(self.vpc_ns, "net.ipv4.ip_forward", "1")
        netns.sysctl(self.node_ns, "net.ipv4.ip_forward", "1")
        if self.config.ipv6:
            for ns in (self.vpc_ns, self.node_ns):
                netns.sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
            netns.sysctl(self.vpc_ns, "net.ipv6.conf.default.accept_dad", "0")  # the router
        self._build_vpc()
        ec2 = Ec2Server(self.cloud)
        self._servers.append(ec2)
        self.ec2_url = ec2.start()
        node_sock = netns.listening_socket(self.node_ns, "127.0.0.1", NODE_EC2_PORT)
        self.node_ec2_url = ec2.start(node_sock)
        self._launch()
        self._write_record()

    def close(self) -> None:
        """Stop everything and remove it all; every step runs even if one before fails.

        Idempotent. Netlink sockets are closed before the namespaces are removed, since
        an open socket would keep a namespace (and its links) alive without its name.
        """
        with ExitStack() as cleanup:  # callbacks run last-registered first
            cleanup.callback(remove_lab, self.lab_id, self.state_root)
            netlink, self._netlink = self._netlink, None
            if netlink is not None:
                cleanup.callback(netlink.close)
            if self._node is not None:
                cleanup.callback(self._node.close)
                if self._node_subscribed:
                    self._node_subscribed = False
                    cleanup.callback(self.cloud.unsubscribe, self._node)
            servers, self._servers = self._servers, []
            for server in servers:
                cleanup.callback(server.close)

    # -- helpers for tests and tools -------------------------------------------------

    def create_pod_namespace(self, name: str) -> str:
        """A namespace for a pod, removed with the lab."""
        ns = f"{netns.PREFIX}{self.lab_id}-pod-{name}"
        netns.create(ns, state_root=self.state_root)
        self._pods.append(ns)
        with netns.iproute(ns) as ipr:
            self._loopback_up(ipr)
        return ns

    def node_exec(self, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node namespace (``ip netns exec``)."""
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            ["ip", "netns", "exec", self.node_ns, *argv],
            check=True,
            capture_output=True,
            text=True,
            **kwargs,
        )

    @property
    def node(self) -> LabNode:
        assert self._node is not None, "lab not started"
        return self._node

    # -- internals -----------------------------------------------------------------

    def _build_vpc(self) -> None:
        vpc = self.cloud.create_vpc(list(self.config.vpc_cidrs))
        self.vpc_id = vpc.vpc_id
        if self.config.nau_quota is not None:
            self.cloud.set_nau_quota(self.vpc_id, self.config.nau_quota)
        for spec in self.config.subnets:
            subnet = self.cloud.create_subnet(
                self.vpc_id, spec.cidr, spec.availability_zone, dict(spec.tags)
            )
            self.subnet_ids.append(subnet.subnet_id)
        if self.config.ipv6:
            block = self.cloud.associate_vpc_ipv6_cidr(self.vpc_id).cidr
            for subnet_id, sub64 in zip(
                self.subnet_ids, block.subnets(new_prefix=64), strict=False
            ):
                self.cloud.associate_subnet_ipv6_cidr(subnet_id, str(sub64))
                self.cloud.set_assign_ipv6_on_creation(subnet_id, True)

    def _launch(self) -> None:
        itype = lookup(self.config.instance_type)
        interfaces = launch_interfaces(
            self.config.instance_type,
            self.config.prefixes_per_card,
            self.config.other_cards,
            self.config.ipv6_prefixes if self.config.ipv6 else 0,
        )
        per_card = max(card.max_interfaces for card in itype.network_cards)
        # The node must listen before launch: launch attaches every interface at once,
        # so it adopts the first instance it hears of (nothing else launches meanwhile).
        assert self._netlink is not None
        self._node = LabNode(None, self.vpc_ns, self.node_ns, per_card, netlink=self._netlink)
        self.cloud.subscribe(self._node)
        self._node_subscribed = True
        instance = self.cloud.launch_instance(
            self.config.instance_type, self.subnet_ids[0], interfaces=interfaces
        )
        self.instance_id = instance.instance_id
        assert self._node.instance_id == self.instance_id
        imds = ImdsServer(self.cloud, self.instance_id)
        self._servers.append(imds)
        self.imds_url = imds.start()
        self._netlink.run(lambda ipr: self._add_address(ipr[self.node_ns], "lo", IMDS_ADDRESS, 32))
        imds.start(netns.listening_socket(self.node_ns, IMDS_ADDRESS, 80))

    def _write_record(self) -> None:
        self.state_root.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        record = LabRecord(
            lab_id=self.lab_id,
            pid=pid,
            pid_start=process_start(pid),
            namespaces=[self.vpc_ns, self.node_ns, *self._pods],
            ec2_url=self.ec2_url,
            imds_url=self.imds_url,
            node_ec2_url=self.node_ec2_url,
            instance_id=self.instance_id,
            instance_type=self.config.instance_type,
        )
        path = self.state_root / f"{self.lab_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(path)

    def _loopbacks_up(self, ipr: Mapping[str, IPRoute]) -> None:
        self._loopback_up(ipr[self.vpc_ns])
        self._loopback_up(ipr[self.node_ns])

    @staticmethod
    def _loopback_up(ipr: IPRoute) -> None:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    @staticmethod
    def _add_address(ipr: IPRoute, ifname: str, address: str, prefixlen: int) -> None:
        ipr.addr(
            "add", index=ipr.link_lookup(ifname=ifname)[0], address=address, prefixlen=prefixlen
        )
