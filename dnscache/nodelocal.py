"""Node-local mode, as NodeLocal DNSCache does it: a link-local address on our own interface,
and NOTRACK rules so queries to it skip conntrack (no DNAT races, no table exhaustion).

``setup`` creates the interface (``dummy`` in production, as node-cache does), adds the
addresses, and puts the rules in our own chains (``ULTRANET-DNS-*``) jumped to from the built-in
ones, so ``teardown`` removes exactly what we added. ``teardown`` is idempotent: whatever is
already gone counts as removed, and every step runs even when an earlier one failed.
Both act on the network namespace of the calling process (tests run us in their own).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

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


def rules(cfg: NodeLocalConfig, ports: Iterable[int]) -> list[tuple[str, str, list[str]]]:
    """(table, our chain, rule) for every address, port and protocol, as node-cache adds them."""
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
    try:
        _run(
            "interface",
            ["ip", "link", "add", cfg.interface, "type", cfg.link_kind],
            ok_if=("File exists",),
        )
        _run("interface", ["ip", "link", "set", cfg.interface, "up"])
        for addr in cfg.addresses:
            _run(
                "address",
                ["ip", "addr", "add", f"{addr}/32", "dev", cfg.interface],
                ok_if=("File exists",),
            )
        for table, builtin, chain in CHAINS:
            _run("iptables", ["iptables", "-w", "-t", table, "-N", chain], ok_if=("exists",))
            _run("iptables", ["iptables", "-w", "-t", table, "-F", chain])
            _run("iptables", ["iptables", "-w", "-t", table, "-I", builtin, "1", "-j", chain])
        for table, chain, rule in rules(cfg, ports):
            _run("iptables", ["iptables", "-w", "-t", table, "-A", chain, *rule])
    except NodeLocalError:
        teardown(cfg)
        raise


def teardown(cfg: NodeLocalConfig) -> list[str]:
    """Remove the rules, chains and interface; returns the errors (empty when clean)."""
    errors: list[str] = []
    gone = ("No chain", "does not exist", "Bad rule", "No such", "Cannot find device")
    for table, builtin, chain in CHAINS:
        for _ in range(16):  # every jump we may have inserted (one per start)
            try:
                _run("teardown", ["iptables", "-w", "-t", table, "-D", builtin, "-j", chain])
            except NodeLocalError as exc:
                if not any(s in exc.reason for s in gone):
                    errors.append(str(exc))
                break
        for op in ("-F", "-X"):
            try:
                _run("teardown", ["iptables", "-w", "-t", table, op, chain], ok_if=gone)
            except NodeLocalError as exc:
                errors.append(str(exc))
    try:
        _run("teardown", ["ip", "link", "del", cfg.interface], ok_if=gone)
    except NodeLocalError as exc:
        errors.append(str(exc))
    return errors
