"""The demo's DNS side: the lab upstream, ``ultranet-dns`` on the node, and pods asking it.

Both servers are real processes in the lab's node namespace, each in its own session
(so a Ctrl-C reaches the demo, which then stops them in order) and each stopped with
SIGTERM, then SIGKILL, whatever happens:

- the upstream is ``tools.bench.dns.authserver``'s authoritative server (dnslib) on node loopback,
  answering the VPC's private names (``ip-100-64-1-2.us-west-2.compute.internal``) as the
  VPC resolver would;
- ``ultranet-dns`` runs in node-local mode, as NodeLocal DNSCache does: it creates its
  interface holding 169.254.20.10, adds its NOTRACK rules, listens there, and removes
  both on SIGTERM. Pods reach it through their default route (169.254.1.1, the host end
  of their veth). The interface is a port-less bridge, not a dummy, because this
  machine's kernel has no ``dummy`` module (the dnscache node-local test does the same).

Pods query with dnslib from sockets created inside their namespaces (``netns.run_in``),
and one with ``dig`` as a person would.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import dnslib
import yaml

from tools.demo.progress import DemoError
from tools.lab import netns

NODE_LOCAL_ADDRESS = "169.254.20.10"
# An IPv6 node's: its pods have no IPv4. NodeLocal DNSCache's docs suggest one of fd00::/8
# that nothing else uses; the lab's VPC /56s are random unique-local ones, checked apart.
NODE_LOCAL_ADDRESS_V6 = "fd00::20:10"
ZONE = "us-west-2.compute.internal."
REPO = Path(__file__).resolve().parents[2]


class Child:
    """A process in its own session, logging to a file; ``stop()`` is idempotent."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None

    def start(self, env: Mapping[str, str] | None = None) -> None:
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
            env=dict(env if env is not None else os.environ),
            start_new_session=True,
        )

    def read_json_line(self, timeout: float, want: str | None = None) -> dict[str, Any]:
        """The first JSON line on stdout (with key ``want``, if given) within ``timeout``."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break  # exited
                try:
                    doc: dict[str, Any] = json.loads(line)
                except ValueError:
                    continue
                if want is None or want in doc:
                    return doc
            elif self.proc.poll() is not None:
                break
        code = self.proc.poll()
        why = f"exited {code}" if code is not None else f"not ready in {timeout:g} s"
        raise DemoError(f"{self.name} {why}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the program (a supervisor stops its own workers), SIGKILL to its
        whole session after ``timeout``, and to any straggler of that session after."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # ``ip netns exec`` execs the program
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill_session()
                    self.proc.wait()
            self._kill_session()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return None if self.proc is None else self.proc.returncode

    def _kill_session(self) -> None:
        assert self.proc is not None
        try:  # the group is ours alone: the child started a new session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def host_name(address: str) -> str:
    """EC2's private DNS name of an address: ``ip-100-64-1-2.us-west-2.compute.internal.``"""
    return f"ip-{address.replace('.', '-')}.{ZONE}"


class Upstream(Child):
    """The lab's VPC resolver: an authoritative server for ``ZONE`` on node loopback (an
    A record for an IPv4 address, AAAA for an IPv6 one)."""

    def __init__(self, node_ns: str, records: Mapping[str, str], log_path: Path) -> None:
        argv = ["ip", "netns", "exec", node_ns, sys.executable, "-m", "tools.bench.dns.authserver"]
        argv += ["--origin", ZONE]
        for name, address in records.items():
            argv += ["--record", f"{name} {'AAAA' if ':' in address else 'A'} {address}"]
        super().__init__("the lab upstream (tools.bench.dns.authserver)", argv, log_path)
        self.port = 0

    def wait_ready(self, timeout: float = 20.0) -> int:
        self.port = int(self.read_json_line(timeout, "port")["port"])
        return self.port


class NodeDns(Child):
    """``ultranet-dns`` in node-local mode on ``address`` (169.254.20.10, or on an IPv6 node
    NODE_LOCAL_ADDRESS_V6), forwarding to ``upstream``."""

    def __init__(
        self,
        node_ns: str,
        upstream: str,
        workers: int,
        state_dir: Path,
        address: str = NODE_LOCAL_ADDRESS,
    ) -> None:
        self.config_path = state_dir / "ultranet-dns.yaml"
        self.address = address
        doc = {
            "listen": [f"[{address}]:53" if ":" in address else f"{address}:53"],
            "workers": workers,
            "metrics": "127.0.0.1:0",
            "zones": {".": {"upstreams": [upstream]}},
            "node_local": {
                "interface": "nodelocaldns",
                "addresses": [address],
                "link_kind": "bridge",
            },
        }
        self.config_path.write_text(yaml.safe_dump(doc))
        argv = ["ip", "netns", "exec", node_ns, sys.executable, "-m", "dnscache"]
        argv += ["--config", str(self.config_path), "--log-level", "WARNING"]
        super().__init__("ultranet-dns", argv, state_dir / "ultranet-dns.log")
        self.node_ns = node_ns
        self.metrics = ""

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        event = self.read_json_line(timeout, "event")
        if event.get("event") != "ready":
            raise DemoError(f"ultranet-dns: unexpected first event {event}")
        self.metrics = str(event.get("metrics") or "")
        return event

    def scrape(self) -> dict[str, float]:
        """``/metrics`` read from inside the node namespace, each metric summed."""
        return scrape(self.node_ns, self.metrics, "/metrics", "ultranet-dns")


def scrape(ns: str, address: str, path: str, who: str) -> dict[str, float]:
    """Prometheus text at ``http://address/path``, fetched from inside namespace ``ns``,
    each metric summed over its labels."""
    host, _, port = address.rpartition(":")

    def get() -> str:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read().decode()
            if response.status != 200:
                raise DemoError(f"{who} {path} answered {response.status}")
            return body
        finally:
            conn.close()

    return sum_metrics(netns.run_in(ns, get))


def sum_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each metric's samples summed over their labels."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.partition("{")[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals


@dataclass(frozen=True, slots=True)
class Answer:
    name: str
    rcode: str
    addresses: tuple[str, ...]
    ms: float


def query_from_pod(
    pod_ns: str, server: str, names: Sequence[str], qtype: str = "A", timeout: float = 2.0
) -> list[Answer]:
    """A ``qtype`` query per name, sent from a UDP socket made inside the pod's namespace
    (over IPv6 when ``server`` is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET

    def ask() -> list[Answer]:
        answers = []
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((server, 53))
            for name in names:
                answers.append(_exchange(sock, name, qtype, pod_ns, server))
        return answers

    return netns.run_in(pod_ns, ask)


def _exchange(sock: socket.socket, name: str, qtype: str, pod_ns: str, server: str) -> Answer:
    query: Any = dnslib.DNSRecord.question(name, qtype)
    wanted = getattr(dnslib.QTYPE, qtype)
    begun = time.perf_counter()  # from the first send: a retry's wait counts
    for _attempt in range(2):  # one retry: UDP, even if the lab does not drop
        sock.send(query.pack())
        try:
            while True:
                reply: Any = dnslib.DNSRecord.parse(sock.recv(4096))
                if reply.header.id == query.header.id:
                    break
        except TimeoutError:
            continue
        ms = (time.perf_counter() - begun) * 1000
        addresses = tuple(str(rr.rdata) for rr in reply.rr if rr.rtype == wanted)
        return Answer(name, str(dnslib.RCODE.get(reply.header.rcode)), addresses, ms)
    raise DemoError(f"no DNS answer for {name} in {pod_ns} (asked {server})")


def dig_from_pod(
    pod_ns: str, name: str, server: str = NODE_LOCAL_ADDRESS, qtype: str = "A"
) -> str | None:
    """``dig +short`` from inside a pod; None when dig is not installed."""
    if shutil.which("dig") is None:
        return None
    done = subprocess.run(
        ["ip", "netns", "exec", pod_ns, "dig", f"@{server}", "+short"]
        + ["+tries=1", "+time=3", name, qtype],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if done.returncode != 0:
        raise DemoError(f"dig in {pod_ns} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()
