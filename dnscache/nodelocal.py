"""Node-local mode, as NodeLocal DNSCache does it: a link-local address on our own interface,
and NOTRACK rules so queries to it skip conntrack (no DNAT races, no table exhaustion).

``setup`` creates the interface (``dummy`` in production, as node-cache does), adds the
addresses, and puts the rules in our own chains (``ULTRANET-DNS-*``) jumped to from the built-in
ones, so ``teardown`` removes exactly what we added. ``setup`` is idempotent and never takes
anything away: each chain, jump and rule is added only when ``iptables -C`` does not find it,
so a second instance starting beside a first (a surge upgrade) changes nothing under it.
``teardown`` is idempotent too: whatever is already gone counts as removed, and every step
runs even when an earlier one failed.

IPv6 addresses (NodeLocal DNSCache suggests one of fd00::/8) get the same, through ``ip6tables``,
as node-cache picks its iptables by the address's family; they are added ``nodad``: the address
is ours alone on a link with no peer, so duplicate address detection has nothing to find, and
would keep the address tentative (a bind to it fails) for a second or more after setup, while
the workers bind it at once.

Whether to tear down on exit is ``node_local.teardown``: ``always``, ``never``, or ``auto``
(the default): tear down unless another process still listens on one of the node-local
addresses and ports, found by binding it without SO_REUSEPORT after our own sockets closed
(``in_use``): the replacement pod of a surge upgrade keeps its address and rules.
Both act on the network namespace of the calling process (tests run us in their own).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import replace

from .config import NodeLocalConfig
from .errors import NodeLocalError

# (table, built-in chain, our chain)
CHAINS = (
    ("raw", "PREROUTING", "ULTRANET-DNS-PRE"),
    ("raw", "OUTPUT", "ULTRANET-DNS-OUT"),
    ("filter", "INPUT", "ULTRANET-DNS-IN"),
    ("filter", "OUTPUT", "ULTRANET-DNS-OUTF"),
)


def _run(step: str, argv: list[str], ok_if: Iterable[str] = ()) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodeLocalError(step, f"{' '.join(argv)}: {exc}") from None
    if proc.returncode != 0 and not any(s in proc.stderr for s in ok_if):
        raise NodeLocalError(step, f"{' '.join(argv)}: {proc.stderr.strip()}")


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def iptables_for(addr: IpAddress) -> str:
    """The command that holds rules for ``addr``'s family."""
    return "ip6tables" if addr.version == 6 else "iptables"


def families(cfg: NodeLocalConfig) -> list[str]:
    """The iptables commands ``cfg``'s addresses need, IPv4's first."""
    return sorted({iptables_for(a) for a in cfg.addresses}, key=len)


def rules(cfg: NodeLocalConfig, ports: Iterable[int]) -> list[tuple[str, str, list[str]]]:
    """(table, our chain, rule) for every address, port and protocol, as node-cache adds them;
    an IPv6 address's rules go to ``ip6tables`` (:func:`iptables_for`)."""
    out: list[tuple[str, str, list[str]]] = []
    for addr in cfg.addresses:
        for port in sorted(set(ports)):
            for proto in ("udp", "tcp"):
                a, p = str(addr), str(port)
                if cfg.notrack:
                    out.append(
                        (
                            "raw",
                            "ULTRANET-DNS-PRE",
                            ["-d", a, "-p", proto, "--dport", p, "-j", "NOTRACK"],
                        )
                    )
                    out.append(
                        (
                            "raw",
                            "ULTRANET-DNS-OUT",
                            ["-s", a, "-p", proto, "--sport", p, "-j", "NOTRACK"],
                        )
                    )
                    out.append(
                        (
                            "raw",
                            "ULTRANET-DNS-OUT",
                            ["-d", a, "-p", proto, "--dport", p, "-j", "NOTRACK"],
                        )
                    )
                out.append(
                    (
                        "filter",
                        "ULTRANET-DNS-IN",
                        ["-d", a, "-p", proto, "--dport", p, "-j", "ACCEPT"],
                    )
                )
                out.append(
                    (
                        "filter",
                        "ULTRANET-DNS-OUTF",
                        ["-s", a, "-p", proto, "--sport", p, "-j", "ACCEPT"],
                    )
                )
    return out


def setup(cfg: NodeLocalConfig, ports: Iterable[int]) -> None:
    """Interface, addresses, rules. On failure, removes what it added and raises."""
    ports = sorted(set(ports))
    try:
        _run(
            "interface",
            ["ip", "link", "add", cfg.interface, "type", cfg.link_kind],
            ok_if=("File exists",),
        )
        _run("interface", ["ip", "link", "set", cfg.interface, "up"])
        for addr in cfg.addresses:
            prefix, flags = ("128", ["nodad"]) if addr.version == 6 else ("32", [])
            _run(
                "address",
                ["ip", "addr", "add", f"{addr}/{prefix}", "dev", cfg.interface, *flags],
                ok_if=("File exists", "already assigned"),
            )
        for tool, family in _by_family(cfg):
            for table, builtin, chain in CHAINS:
                _run("iptables", [tool, "-w", "-t", table, "-N", chain], ok_if=("exists",))
                if not _present(tool, table, builtin, ["-j", chain]):
                    _run("iptables", [tool, "-w", "-t", table, "-I", builtin, "1", "-j", chain])
            for table, chain, rule in rules(family, ports):
                if not _present(tool, table, chain, rule):
                    _run("iptables", [tool, "-w", "-t", table, "-A", chain, *rule])
    except NodeLocalError:
        teardown(cfg)
        raise


def _by_family(cfg: NodeLocalConfig) -> list[tuple[str, NodeLocalConfig]]:
    """(iptables command, ``cfg`` with only the addresses it holds rules for) per family."""
    return [
        (tool, replace(cfg, addresses=tuple(a for a in cfg.addresses if iptables_for(a) == tool)))
        for tool in families(cfg)
    ]


def _present(tool: str, table: str, chain: str, rule: list[str]) -> bool:
    """``iptables -C``: whether ``chain`` already holds ``rule``."""
    argv = [tool, "-w", "-t", table, "-C", chain, *rule]
    try:
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodeLocalError("iptables", f"{' '.join(argv)}: {exc}") from None


def in_use(cfg: NodeLocalConfig, ports: Iterable[int]) -> str | None:
    """``ADDR:PORT`` of a node-local address still bound by another process, or None. Our own
    sockets must be closed already: a UDP bind without SO_REUSEPORT fails with EADDRINUSE
    exactly when some socket holds the address and port."""
    for addr in cfg.addresses:
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        for port in sorted(set(ports)):
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                try:
                    s.bind((str(addr), port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
    return None


def finish(cfg: NodeLocalConfig, ports: Iterable[int]) -> tuple[str | None, list[str]]:
    """At exit: tear down as ``cfg.teardown`` says. Returns (why it was skipped, or None when
    it ran; the teardown's errors)."""
    if cfg.teardown == "never":
        return "teardown: never", []
    if cfg.teardown == "auto":
        other = in_use(cfg, ports)
        if other is not None:
            return f"{other} is still served by another process", []
    return None, teardown(cfg)


def teardown(cfg: NodeLocalConfig) -> list[str]:
    """Remove the rules, chains and interface; returns the errors (empty when clean)."""
    errors: list[str] = []
    gone = ("No chain", "does not exist", "Bad rule", "No such", "Cannot find device")
    for tool in families(cfg):
        for table, builtin, chain in CHAINS:
            for _ in range(16):  # every jump we may have inserted (one per start)
                try:
                    _run("teardown", [tool, "-w", "-t", table, "-D", builtin, "-j", chain])
                except NodeLocalError as exc:
                    if not any(s in exc.reason for s in gone):
                        errors.append(str(exc))
                    break
            for op in ("-F", "-X"):
                try:
                    _run("teardown", [tool, "-w", "-t", table, op, chain], ok_if=gone)
                except NodeLocalError as exc:
                    errors.append(str(exc))
    try:
        _run("teardown", ["ip", "link", "del", cfg.interface], ok_if=gone)
    except NodeLocalError as exc:
        errors.append(str(exc))
    return errors
