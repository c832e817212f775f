"""IPv4 egress as the AWS VPC CNI does it: SNAT to the node's primary address for traffic
that leaves the VPC, and connection marks that keep a connection on the ENI it used.

Why (``aws/amazon-vpc-cni-k8s``, ``pkg/networkutils/network.go``): a pod's address belongs
to one ENI, and the rule ``from <pod> lookup <ENI table>`` sends its traffic out by that
ENI. Two cases need the primary ENI instead:

* **Leaving the VPC.** Only the primary ENI's primary address has the public address (or
  the NAT gateway's route) a public subnet gives; so a new connection from a pod veth
  (``<AWS_VPC_K8S_CNI_VETHPREFIX>+``) to anything outside the VPC CIDRs and
  ``AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS`` gets the connection mark (``buildIptablesConnmarkRules``:
  nat ``AWS-CONNMARK-CHAIN-0``), the mark is copied to its packets, the rule
  ``fwmark <mark>/<mark> lookup main`` (priority 1024) routes them by the main table, out
  the primary ENI, and ``AWS-SNAT-CHAIN-0`` (``buildIptablesSNATRules``) rewrites their
  source to the node's primary address (``--random-fully`` by default).
* **Connections that came in by the primary ENI** (NodePort, host ports): mangle
  PREROUTING marks them on arrival (``-i <primary> ... --dst-type LOCAL``), and the
  replies from the pod veth get the mark back (``--restore-mark``), so they too leave by
  the primary ENI instead of the pod's ENI, where the VPC would drop them (their source is
  the node's primary address once the DNAT is undone). The primary interface's
  ``rp_filter`` is set loose (2), as the VPC CNI's init container does
  (``cmd/aws-vpc-cni-init/main.go``): strict filtering would drop the DNAT'd packet and
  the reply to a SNAT'd one, whose reverse route from the pod's address points at the
  pod's ENI. It is written over netlink (``RTM_NEWLINK`` with ``IFLA_INET_CONF``, what
  ``CAP_NET_ADMIN`` allows), not through ``/proc/sys``, which a container runtime mounts
  read-only: the VPC CNI needs a privileged init container for it, ultranet does not.

``AWS_VPC_K8S_CNI_EXTERNALSNAT=true`` (an external NAT gateway translates) installs
neither chain, and removes them if present; ``AWS_VPC_CNI_NODE_PORT_SUPPORT`` (default
true) keeps the primary-ENI marks either way, as in the VPC CNI.

The rules are the VPC CNI's, chain names and comments included, written in the form
``iptables-save`` prints them (the same for the nft and the legacy backend), so an
operator finds ``AWS-SNAT-CHAIN-0`` where they know it, and a node moving from one CNI to
the other gets its rules replaced rather than doubled. Not ported: the ``vlan+`` rules of
security groups for pods (ultranet has no branch ENIs), the ``AWS-*-CHAIN-1..n`` chains
of old VPC CNI versions.

The IPv4 egress of IPv6 pods (the VPC CNI's ``egress-cni`` plugin) has its node side here
too: :func:`v4_egress_ruleset` and :meth:`Egress.apply_v4_egress`; the pod side is
:meth:`cni.plumbing.Plumbing.setup_v4_egress`.

How it applies: :func:`ruleset` computes what should exist from the configuration and the
node (pure, tested without root); :func:`restore_script` diffs it against one
``iptables-save`` and produces one ``iptables-restore --noflush`` transaction that adds
what is missing, rewrites our chains whose content differs, and deletes rules with our
comments that should not be there (duplicates, an old primary interface, a config that
turned them off). Nothing to change: no write at all, so re-applying is free of side
effects. :func:`restore_script` against an empty :class:`Ruleset` is the uninstall.

The iptables backend is the one the host already uses, decided as the DNS cache's node
setup decides (``deploy/scripts/ultranet-dns-node-setup``, as kube-proxy's
iptables-wrapper): the one whose ``-save`` shows more rules, nft when tied. The package
graph keeps ipam from importing that script or ``dnscache``, so the few lines are here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import struct
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal, Protocol

from ipam.config import IpamdConfig
from ipam.errors import UltranetError

log = logging.getLogger("ultranet.ipamd")

SnatRandomization = Literal["prng", "hashrandom", "none"]
Backend = Literal["nft", "legacy"]

SNAT_CHAIN = "AWS-SNAT-CHAIN-0"
CONNMARK_CHAIN = "AWS-CONNMARK-CHAIN-0"
# IPv4 egress of IPv6 pods (cni/egress_v4.py): one chain for the node-local range, where the
# VPC CNI's egress-cni makes a chain per pod (E4-<hash>), so the names are ours.
V4_EGRESS_CHAIN = "ULTRANET-EGRESS-V4"
V4_EGRESS_COMMENT = "ultranet, IPv4 egress of IPv6 pods"
MULTICAST_V4 = IPv4Network("224.0.0.0/4")
DEFAULT_CONNMARK = 0x80  # the VPC CNI's; kube-proxy uses 0x4000/0x8000, Calico 0xffff0000
MARK_RULE_PRIORITY = 1024  # the VPC CNI's hostRulePriority: before the pods' 1536
RP_FILTER_LOOSE = "2"
RANDOM_FULLY_SINCE = (1, 6, 2)  # iptables learned --random-fully in 1.6.2
RESTORE_WAIT_S = "5"  # -w: the xtables lock is shared with kube-proxy and the kubelet

# Comments that make a rule in a built-in chain ours: the VPC CNI's, exactly, and ours for
# the IPv4 egress of IPv6 pods.
_COMMENTS = (
    "AWS SNAT CHAIN",
    "AWS, primary ENI",
    "AWS, outbound connections",
    "AWS, CONNMARK",
    V4_EGRESS_COMMENT,
)
_OURS = re.compile("|".join(re.escape(f'--comment "{c}"') for c in _COMMENTS))
# Where our rules go, in restore order: (table, chains we own, built-in chains we add to).
_TABLES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("filter", (), ("FORWARD",)),
    ("mangle", (), ("PREROUTING",)),
    ("nat", (SNAT_CHAIN, CONNMARK_CHAIN, V4_EGRESS_CHAIN), ("PREROUTING", "POSTROUTING")),
)
_VERSION = re.compile(r"\bv(\d+)\.(\d+)\.(\d+)")


class EgressError(UltranetError):
    """An egress step failed; the message names the step and what the tool said."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"egress {step}: {detail}")
        self.step = step


@dataclass(frozen=True, slots=True)
class EgressConfig:
    """The VPC CNI's egress knobs (``ipam.config`` parses them from the environment)."""

    external_snat: bool = False  # AWS_VPC_K8S_CNI_EXTERNALSNAT
    exclude_snat_cidrs: tuple[IPv4Network, ...] = ()  # AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS
    randomize_snat: SnatRandomization = "prng"  # AWS_VPC_K8S_CNI_RANDOMIZESNAT
    connmark: int = DEFAULT_CONNMARK  # AWS_VPC_K8S_CNI_CONNMARK
    node_port_support: bool = True  # AWS_VPC_CNI_NODE_PORT_SUPPORT
    veth_prefix: str = "eni"  # AWS_VPC_K8S_CNI_VETHPREFIX

    @property
    def mark(self) -> str:
        return f"{self.connmark:#x}"


def egress_config(config: IpamdConfig) -> EgressConfig:
    return EgressConfig(
        external_snat=config.external_snat,
        exclude_snat_cidrs=config.exclude_snat_cidrs,
        randomize_snat=config.randomize_snat,
        connmark=config.connmark,
        node_port_support=config.node_port_support,
        veth_prefix=config.veth_prefix,
    )


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What egress needs of the node: the primary ENI's link and address, the VPC."""

    primary_interface: str
    primary_ip: IPv4Address
    vpc_cidrs: tuple[IPv4Network, ...]


@dataclass(frozen=True, slots=True)
class Ruleset:
    """What should exist. Rules are the text after ``-A <chain>`` as iptables-save prints it.

    ``chains``: our own chains and their whole content, by (table, chain); a chain absent
    here must not exist. ``builtin``: our rules in built-in chains, in order, by (table,
    chain). ``mark_rule``: the ``fwmark`` rule at priority 1024. ``loose_rp_filter``: set
    the primary interface's rp_filter to 2.
    """

    chains: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    builtin: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    mark_rule: bool = False
    loose_rp_filter: bool = False


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


def ruleset(cfg: EgressConfig, node: NodeFacts, *, random_fully: bool = True) -> Ruleset:
    """The VPC CNI's rules for ``cfg`` on ``node`` (``buildIptablesSNATRules`` and
    ``buildIptablesConnmarkRules`` in ``pkg/networkutils/network.go``). ``random_fully``:
    whether the installed iptables knows ``--random-fully`` (else ``prng`` falls back to
    ``--random``, as the VPC CNI does, with a warning)."""
    snat = not cfg.external_snat
    mark, veths = cfg.mark, f"{cfg.veth_prefix}+"
    chains: dict[tuple[str, str], tuple[str, ...]] = {}
    builtin: dict[tuple[str, str], list[str]] = {}
    if snat:
        returns = [f"-d {c} {_comment('AWS SNAT CHAIN')} -j RETURN" for c in node.vpc_cidrs]
        returns += [
            f"-d {c} {_comment('AWS SNAT CHAIN EXCLUSION')} -j RETURN"
            for c in cfg.exclude_snat_cidrs
        ]
        to_source = (
            f"! -o vlan+ {_comment('AWS, SNAT')} -m addrtype ! --dst-type LOCAL"
            f" -j SNAT --to-source {node.primary_ip}"
        )
        to_source += _snat_randomization(cfg.randomize_snat, random_fully)
        chains["nat", SNAT_CHAIN] = (*returns, to_source)
        builtin["nat", "POSTROUTING"] = [f"{_comment('AWS SNAT CHAIN')} -j {SNAT_CHAIN}"]
        exempt = [
            f"-d {c} {_comment('AWS CONNMARK CHAIN, VPC CIDR')} -j RETURN" for c in node.vpc_cidrs
        ]
        exempt += [
            f"-d {c} {_comment('AWS CONNMARK CHAIN, EXCLUDED CIDR')} -j RETURN"
            for c in cfg.exclude_snat_cidrs
        ]
        set_mark = f"{_comment('AWS, CONNMARK')} -j CONNMARK --set-xmark {mark}/{mark}"
        chains["nat", CONNMARK_CHAIN] = (*exempt, set_mark)
        # The jump first: the restore copies the mark the chain has just set to the packet.
        builtin["nat", "PREROUTING"] = [
            f"-i {veths} {_comment('AWS, outbound connections')} -j {CONNMARK_CHAIN}",
            f"{_comment('AWS, CONNMARK')} -j CONNMARK --restore-mark"
            f" --nfmask {mark} --ctmask {mark}",
        ]
    mangle: list[str] = []
    if cfg.node_port_support:
        mangle.append(
            f"-i {node.primary_interface} {_comment('AWS, primary ENI')} -m addrtype"
            f" --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark {mark}/{mark}"
        )
    if cfg.node_port_support or snat:
        mangle.append(
            f"-i {veths} {_comment('AWS, primary ENI')}"
            f" -j CONNMARK --restore-mark --nfmask {mark} --ctmask {mark}"
        )
    if mangle:
        builtin["mangle", "PREROUTING"] = mangle
    needed = cfg.node_port_support or snat
    return Ruleset(
        chains=chains,
        builtin={k: tuple(v) for k, v in builtin.items()},
        mark_rule=needed,
        loose_rp_filter=needed,
    )


def _snat_randomization(mode: SnatRandomization, random_fully: bool) -> str:
    """The SNAT rule's flag: prng falls back to --random on an iptables without
    --random-fully, as the VPC CNI does, with a warning."""
    if mode == "none":
        return ""
    if mode == "prng" and random_fully:
        return " --random-fully"
    if mode == "prng":
        log.warning("egress: this iptables has no --random-fully; SNAT uses --random")
    return " --random"


def v4_egress_ruleset(
    node_range: IPv4Network,
    node_ip: IPv4Address,
    randomize: SnatRandomization = "prng",
    *,
    random_fully: bool = True,
) -> Ruleset:
    """The node's part of IPv4 egress for IPv6 pods (``Plumbing.setup_v4_egress`` the pod's): what
    the VPC CNI's ``egress-cni`` adds per pod (``snat/snat.go``: multicast accepted, the
    rest SNAT'd to the node's primary IPv4), once for the whole node-local range; and its
    ``setupRuleToBlockNodeLocalAccess`` (``network.go``): no new connection forwarded to a
    node-local address, so pods cannot reach each other's."""
    tag = _comment(V4_EGRESS_COMMENT)
    snat = f"{tag} -j SNAT --to-source {node_ip}" + _snat_randomization(randomize, random_fully)
    return Ruleset(
        chains={("nat", V4_EGRESS_CHAIN): (f"-d {MULTICAST_V4} {tag} -j ACCEPT", snat)},
        builtin={
            ("nat", "POSTROUTING"): (f"-s {node_range} {tag} -j {V4_EGRESS_CHAIN}",),
            ("filter", "FORWARD"): (
                f"-d {node_range} -m conntrack --ctstate NEW {tag}"
                " -j REJECT --reject-with icmp-port-unreachable",
            ),
        },
    )


# -- iptables-save in, iptables-restore out ---------------------------------------------


@dataclass(slots=True)
class SavedTable:
    chains: set[str] = field(default_factory=set)  # every chain declared (built-in or not)
    rules: dict[str, list[str]] = field(default_factory=dict)  # chain -> rule texts, in order


def parse_save(text: str) -> dict[str, SavedTable]:
    """``iptables-save`` output by table."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), SavedTable())
        elif current is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            current.chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            chain, _, rule = line[3:].partition(" ")
            current.rules.setdefault(chain, []).append(rule)
    return tables


def is_ours(rule: str) -> bool:
    return _OURS.search(rule) is not None


def restore_script(saved: Mapping[str, SavedTable], wanted: Ruleset) -> str:
    """One ``iptables-restore --noflush`` input that makes ``saved`` hold ``wanted``; empty
    when it already does. Declaring a chain in a restore creates it or empties it, so a
    chain whose content differs is rewritten whole, in the same transaction as the rest."""
    blocks: list[str] = []
    for table, own_chains, builtins in _TABLES:
        have = saved.get(table, SavedTable())
        fill: list[str] = []
        for chain in own_chains:
            want = wanted.chains.get((table, chain))
            exists = chain in have.chains
            if want is not None and (not exists or have.rules.get(chain, []) != list(want)):
                fill.append(f":{chain} - [0:0]")
                fill += [f"-A {chain} {rule}" for rule in want]
        edits: list[str] = []
        for chain in builtins:
            want_rules = list(wanted.builtin.get((table, chain), ()))
            ours = [r for r in have.rules.get(chain, []) if is_ours(r)]
            if ours != want_rules:
                # Out of order, doubled, stale or missing: take ours out and put the wanted
                # ones back in order (kept relative order is what the mark restore needs).
                edits += [f"-D {chain} {rule}" for rule in ours]
                edits += [f"-A {chain} {rule}" for rule in want_rules]
        drop: list[str] = []
        for chain in own_chains:
            if (table, chain) not in wanted.chains and chain in have.chains:
                drop += [f"-F {chain}", f"-X {chain}"]
        lines = fill + edits + drop
        if lines:
            blocks.append("\n".join([f"*{table}", *lines, "COMMIT"]))
    return "".join(block + "\n" for block in blocks)


def iptables_version(save_text: str) -> tuple[int, int, int] | None:
    """The version in an iptables-save header (``# Generated by iptables-nft-save v1.8.9``)."""
    for line in save_text.splitlines():
        if line.startswith("# Generated by"):
            found = _VERSION.search(line)
            if found:
                return int(found[1]), int(found[2]), int(found[3])
    return None


def rule_count(save_text: str) -> int:
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


def choose_backend(legacy_rules: int, nft_rules: int) -> Backend:
    """The one the host uses: more rules wins, nft when tied (kube-proxy's iptables-wrapper
    and ``ultranet-dns-node-setup`` decide the same way)."""
    return "legacy" if legacy_rules > nft_rules else "nft"


# -- side effects -------------------------------------------------------------------------


class EgressHost(Protocol):
    """Commands and sysctls of the node's network namespace."""

    def run(
        self, argv: Sequence[str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command; never raises for its exit status (OSError if it cannot start)."""
        ...

    def read_sysctl(self, key: str) -> str: ...

    def set_rp_filter(self, interface: str, value: int) -> None:
        """The interface's ``net.ipv4.conf.<interface>.rp_filter``; OSError on failure."""
        ...


class LocalHost:
    """This process's network namespace."""

    def run(
        self, argv: Sequence[str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=60, check=False
        )

    def read_sysctl(self, key: str) -> str:
        return _sysctl_path(key).read_text().strip()

    def set_rp_filter(self, interface: str, value: int) -> None:
        set_ipv4_devconf(interface, IPV4_DEVCONF_RP_FILTER, value)


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys", *key.split("."))


IPV4_DEVCONF_RP_FILTER = 8  # linux/ip.h: the index of rp_filter in IFLA_INET_CONF
_NLA_F_NESTED = 0x8000
_IFLA_AF_SPEC, _IFLA_INET_CONF = 26, 1
_RTM_NEWLINK, _NLM_F_REQUEST, _NLM_F_ACK, _NLMSG_ERROR = 16, 0x1, 0x4, 2


def _nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def set_ipv4_devconf(interface: str, index: int, value: int) -> None:
    """Set one ``net.ipv4.conf.<interface>.*`` value over rtnetlink (``inet_set_link_af``
    in the kernel): an ``RTM_NEWLINK`` carrying ``IFLA_AF_SPEC`` / ``AF_INET`` /
    ``IFLA_INET_CONF`` / ``<index> = value``. Needs CAP_NET_ADMIN in the namespace of
    the calling thread, and no writable ``/proc/sys``."""
    ifindex = socket.if_nametoindex(interface)
    conf = _nla(index, struct.pack("=I", value))
    spec = _nla(
        _IFLA_AF_SPEC | _NLA_F_NESTED,
        _nla(socket.AF_INET | _NLA_F_NESTED, _nla(_IFLA_INET_CONF | _NLA_F_NESTED, conf)),
    )
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0) + spec
    header = struct.pack("=IHHII", 16 + len(body), _RTM_NEWLINK, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.send(header + body)
        reply = sock.recv(65536)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    (error,) = struct.unpack_from("=i", reply, 16) if kind == _NLMSG_ERROR else (0,)
    if error:
        raise OSError(-error, f"RTM_NEWLINK {interface}: {os.strerror(-error)}")


class Egress:
    """Applies a :class:`Ruleset` through an :class:`EgressHost`; one per daemon."""

    def __init__(
        self, cfg: EgressConfig, host: EgressHost | None = None, *, backend: Backend | None = None
    ) -> None:
        self.cfg = cfg
        self.host: EgressHost = host or LocalHost()
        self.backend = backend  # None: decided at the first save

    def apply(self, node: NodeFacts) -> list[str]:
        """Make the node hold the rules for ``cfg`` and ``node``; idempotent. Returns what
        changed, one line per step (empty: nothing to do)."""
        saved = self._save()
        random_fully = self._random_fully(saved)
        wanted = ruleset(self.cfg, node, random_fully=random_fully)
        changed = self._restore(restore_script(parse_save(saved), wanted))
        changed += self._mark_rule(present=wanted.mark_rule)
        if wanted.loose_rp_filter:
            changed += self._loosen_rp_filter(node.primary_interface)
        return changed

    def apply_v4_egress(self, node_range: IPv4Network, node_ip: IPv4Address) -> list[str]:
        """An IPv6 node's rules: :func:`v4_egress_ruleset` and nothing else of ours (no
        SNAT chain of an IPv4 node, no fwmark rule). Idempotent; returns what changed."""
        saved = self._save()
        wanted = v4_egress_ruleset(
            node_range,
            node_ip,
            self.cfg.randomize_snat,
            random_fully=self._random_fully(saved),
        )
        changed = self._restore(restore_script(parse_save(saved), wanted))
        return changed + self._mark_rule(present=False)

    def remove(self) -> list[str]:
        """Take out every rule and chain of ours and the fwmark rule; idempotent. The
        primary interface's rp_filter stays loose (the VPC CNI does not restore it either,
        and the value before is not known)."""
        changed = self._restore(restore_script(parse_save(self._save()), Ruleset()))
        return changed + self._mark_rule(present=False)

    # -- steps ----------------------------------------------------------------------

    def _tool(self, name: str) -> str:
        assert self.backend is not None
        return f"iptables-{self.backend}-{name}" if name else f"iptables-{self.backend}"

    def _save(self) -> str:
        if self.backend is None:
            outputs = {b: self._try_save(b) for b in ("legacy", "nft")}
            if all(text is None for text in outputs.values()):
                raise EgressError("iptables", "neither iptables-nft-save nor -legacy-save runs")
            self.backend = choose_backend(
                rule_count(outputs["legacy"] or ""), rule_count(outputs["nft"] or "")
            )
            log.info("egress: the host uses the iptables %s backend", self.backend)
            chosen = outputs[self.backend]
            if chosen is not None:
                return chosen
        return self._checked("save", [self._tool("save")]).stdout

    def _try_save(self, backend: str) -> str | None:
        try:
            done = self.host.run([f"iptables-{backend}-save"])
        except OSError:
            return None
        return done.stdout if done.returncode == 0 else None

    def _checked(
        self, step: str, argv: Sequence[str], stdin: str | None = None, ok_if: Iterable[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        try:
            done = self.host.run(argv, stdin)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EgressError(step, f"{shlex.join(argv)}: {exc}") from None
        if done.returncode != 0 and not any(s in done.stderr for s in ok_if):
            raise EgressError(step, f"{shlex.join(argv)}: {done.stderr.strip()}")
        return done

    def _random_fully(self, saved: str) -> bool:
        if self.cfg.randomize_snat != "prng":
            return True  # not asked
        version = iptables_version(saved)
        if version is None:  # an empty ruleset prints no header
            version = iptables_version(
                "# Generated by " + self._checked("version", [self._tool(""), "--version"]).stdout
            )
        return version is not None and version >= RANDOM_FULLY_SINCE

    def _restore(self, script: str) -> list[str]:
        if not script:
            return []
        self._checked("restore", [self._tool("restore"), "-w", RESTORE_WAIT_S, "--noflush"], script)
        return [line for line in script.splitlines() if line[:1] in "-:"]

    def _mark_rule(self, *, present: bool) -> list[str]:
        """``fwmark <mark>/<mark> lookup main`` at priority 1024, and no other fwmark rule of
        ours there (a changed AWS_VPC_K8S_CNI_CONNMARK leaves the old one)."""
        mark = f"{self.cfg.mark}/{self.cfg.mark}"
        listed = self._checked(
            "ip rule", ["ip", "-4", "-j", "rule", "list", "priority", str(MARK_RULE_PRIORITY)]
        ).stdout
        try:
            rules = json.loads(listed or "[]")
        except json.JSONDecodeError as exc:
            raise EgressError("ip rule", f"unreadable `ip -j rule` output: {exc}") from None
        marks = [
            f"{r['fwmark']}/{r.get('fwmask', '0xffffffff')}"
            for r in rules
            if "fwmark" in r and r.get("table") in ("main", 254)
        ]
        changed, kept = [], False
        for found in marks:
            if present and found == mark and not kept:
                kept = True
                continue
            self._checked("ip rule", self._rule_argv("del", found))
            changed.append(f"ip rule del fwmark {found}")
        if present and not kept:
            self._checked("ip rule", self._rule_argv("add", mark))
            changed.append(f"ip rule add fwmark {mark}")
        return changed

    @staticmethod
    def _rule_argv(op: str, mark: str) -> list[str]:
        priority = str(MARK_RULE_PRIORITY)
        return ["ip", "-4", "rule", op, "fwmark", mark, "lookup", "main", "priority", priority]

    def _loosen_rp_filter(self, interface: str) -> list[str]:
        key = f"net.ipv4.conf.{interface}.rp_filter"
        try:
            if self.host.read_sysctl(key) == RP_FILTER_LOOSE:
                return []
            self.host.set_rp_filter(interface, int(RP_FILTER_LOOSE))
        except OSError as exc:
            raise EgressError(
                "rp_filter",
                f"cannot set {key}={RP_FILTER_LOOSE} ({exc.strerror or exc}): replies to"
                " pods on secondary ENIs that come in by the primary ENI need it",
            ) from None
        return [f"{key}={RP_FILTER_LOOSE}"]
