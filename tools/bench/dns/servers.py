"""The servers a benchmark run starts: NSD as the upstream, and the caching forwarders under test
(ultranet-dns, dnsmasq, unbound with one thread, dnsdist), each forwarding to that NSD.

Every server gets the same cache size (``CACHE_ENTRIES``), the same bound on queries it
forwards at once (``MAX_IN_FLIGHT``) and no logging, and is pinned with ``taskset`` to
``SERVER_CPU``; NSD and dnsperf share ``LOAD_CPU``. Each ``Running`` keeps the argv and the
config file it was started with, for the run's JSON.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SERVER_CPU = "0"
LOAD_CPU = "1"
CACHE_ENTRIES = 200_000
# Queries forwarded upstream at once, at most, the same for every server: ultranet's
# upstream.max_concurrent (this is its shipped default), dnsmasq's --dns-forward-max (default
# 150), unbound's num-queries-per-thread, dnsdist's setMaxUDPOutstanding (default 65535).
# dnsperf keeps at most 100 queries outstanding (-q 100), so none of them binds here.
MAX_IN_FLIGHT = 1000
ZONE = "bench."
NAMES = 100_000
REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        port: int = u.getsockname()[1]
    return port


def wait_answering(port: int, timeout: float = 20.0) -> None:
    """Until the server answers a query on ``port`` (any rcode), bounded."""
    query = (
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ready\x05bench\x00\x00\x01\x00\x01"
    )
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(query, ("127.0.0.1", port))
            try:
                if s.recv(4096)[:2] == b"\x12\x34":
                    return
            except TimeoutError:
                continue
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


@dataclass
class Running:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    pids: list[int] = field(default_factory=list)  # processes whose CPU time is counted
    argv: list[str] = field(default_factory=list)
    config: str = ""  # the config file's text, if it has one

    def cpu_seconds(self) -> float:
        """utime + stime of the server's processes (the supervisor's workers for ultranet)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids or [self.proc.pid]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _spawn(
    argv: list[str], cpu: str, log: Path, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", cpu, *argv],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
    )


def write_zone(work: Path) -> Path:
    lines = [
        f"$ORIGIN {ZONE}",
        "$TTL 3600",
        f"@ IN SOA ns.{ZONE} hostmaster.{ZONE} 1 3600 600 86400 3600",
        f"@ IN NS ns.{ZONE}",
        "ns IN A 198.18.0.1",
        "ready IN A 198.18.0.2",
    ]
    rng = random.Random(1)
    lines += [f"n{i} IN A 198.18.{rng.randrange(256)}.{rng.randrange(256)}" for i in range(NAMES)]
    path = work / "bench.zone"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_nsd(work: Path, attempts: int = 3) -> Running:
    """NSD on a free port. The port is free for UDP when picked but NSD binds TCP too, and
    another run on the machine may hold it for TCP by then (a run failed so once): NSD then
    exits, and another port is tried. An NSD that runs but does not answer is an error."""
    zone = write_zone(work)
    for _ in range(attempts):
        port = free_port()
        proc, argv, conf = _spawn_nsd(work, port, zone)
        try:
            wait_answering(port)
        except RuntimeError:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
                raise
            log = (work / "nsd.log").read_text() if (work / "nsd.log").exists() else ""
            print(f"nsd exited on port {port}, trying another: {log[-300:]}", file=sys.stderr)
            continue
        return Running("nsd", port, proc, argv=argv, config=conf.read_text())
    raise RuntimeError(f"nsd did not start in {attempts} attempts (see {work}/nsd.log)")


def _spawn_nsd(
    work: Path, port: int, zone: Path
) -> tuple[subprocess.Popen[bytes], list[str], Path]:
    conf = work / "nsd.conf"
    conf.write_text(f"""server:
  ip-address: 127.0.0.1
  port: {port}
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "{work}"
  database: ""
  zonelistfile: "{work}/zone.list"
  xfrdfile: "{work}/xfrd.state"
  pidfile: "{work}/nsd.pid"
  logfile: "{work}/nsd.log"
  verbosity: 0
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: "{ZONE}"
  zonefile: "{zone}"
""")
    argv = ["nsd", "-d", "-c", str(conf)]
    return _spawn(argv, LOAD_CPU, work / "nsd.out"), argv, conf


def ultranet_conf(upstream: int, socket_reuse: int | None, tcp: bool) -> str:
    reuse = "" if socket_reuse is None else f", socket_reuse: {socket_reuse}"
    zones = f"zones: {{'.': {{upstreams: ['127.0.0.1:{upstream}'], transport: tcp}}}}\n"
    return (
        f"cache: {{capacity: {CACHE_ENTRIES}}}\nacl: [127.0.0.0/8]\n"
        f"upstream: {{max_concurrent: {MAX_IN_FLIGHT}{reuse}}}\n" + (zones if tcp else "")
    )


def start_ultranet(
    work: Path,
    upstream: int,
    workers: int = 1,
    loop: str = "asyncio",
    metrics: int | None = None,
    socket_reuse: int | None = None,
    tag: str = "ultranet",
    repo: Path = REPO,
    tcp: bool = False,
) -> Running:
    """``socket_reuse`` None: the default (``dnscache/config.py``); ``tag`` names its files;
    ``repo``: the checkout whose ``dnscache`` runs (another one: a baseline in the same run);
    ``tcp``: zone ``.`` always over TCP."""
    port = free_port()
    conf = work / f"{tag}-{workers}.yaml"
    conf.write_text(ultranet_conf(upstream, socket_reuse, tcp))
    argv = [
        sys.executable,
        "-m",
        "dnscache",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{upstream}",
        "--workers",
        str(workers),
        "--config",
        str(conf),
        "--log-level",
        "WARNING",
        "--loop",
        loop,
    ]
    if metrics is not None:
        argv += ["--metrics", f"127.0.0.1:{metrics}"]
    cpu = SERVER_CPU if workers == 1 else f"{SERVER_CPU},{LOAD_CPU}"
    env = dict(os.environ, PYTHONPATH=str(repo))
    _check_imports_from(repo, env)
    proc = _spawn(argv, cpu, work / f"{tag}-{workers}.out", env, cwd=repo)
    wait_answering(port)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    # taskset execs the supervisor in place, so proc.pid is the supervisor; count it too.
    return Running("ultranet", port, proc, [proc.pid, *pids], argv, conf.read_text())


def _check_imports_from(repo: Path, env: dict[str, str]) -> None:
    """A baseline is only a baseline if it runs its own code: the venv's editable install of
    this checkout must not win over ``repo`` (it did, unnoticed, before this check)."""
    where = subprocess.run(
        [sys.executable, "-c", "import dnscache; print(dnscache.__file__)"],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"ultranet from {repo} would import {where}, not its own dnscache")


def dnsmasq_argv(port: int, upstream: int) -> list[str]:
    return [
        "dnsmasq",
        "-k",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        f"--port={port}",
        f"--server=127.0.0.1#{upstream}",
        f"--cache-size={CACHE_ENTRIES}",
        f"--dns-forward-max={MAX_IN_FLIGHT}",
        "--pid-file=",
        "--user=root",
        "--conf-file=/dev/null",
    ]


def start_dnsmasq(work: Path, upstream: int, tcp: bool = False) -> Running:
    if tcp:
        raise ValueError("dnsmasq cannot send every upstream query over TCP")
    port = free_port()
    argv = dnsmasq_argv(port, upstream)
    proc = _spawn(argv, SERVER_CPU, work / "dnsmasq.out")
    wait_answering(port)
    return Running("dnsmasq", port, proc, argv=argv)


def unbound_conf(work: Path, port: int, upstream: int, tcp: bool) -> str:
    return f"""server:
  interface: 127.0.0.1
  port: {port}
  num-threads: 1
  do-daemonize: no
  use-syslog: no
  logfile: ""
  verbosity: 0
  chroot: ""
  username: ""
  pidfile: ""
  directory: "{work}"
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  module-config: "iterator"
  msg-cache-size: 256m
  rrset-cache-size: 512m
  num-queries-per-thread: {MAX_IN_FLIGHT}
  outgoing-range: 8192
  qname-minimisation: no
  minimal-responses: yes
  domain-insecure: "{ZONE}"
  local-zone: "{ZONE}" nodefault
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@{upstream}
  forward-tcp-upstream: {"yes" if tcp else "no"}
remote-control:
  control-enable: no
"""


def start_unbound(work: Path, upstream: int, tcp: bool = False) -> Running:
    port = free_port()
    conf = work / "unbound.conf"
    conf.write_text(unbound_conf(work, port, upstream, tcp))
    argv = ["unbound", "-d", "-c", str(conf)]
    proc = _spawn(argv, SERVER_CPU, work / "unbound.out")
    wait_answering(port)
    return Running("unbound", port, proc, argv=argv, config=conf.read_text())


def dnsdist_conf(port: int, upstream: int, tcp: bool) -> str:
    tcp_only = ", tcpOnly=true" if tcp else ""
    return f"""setSecurityPollSuffix("")
setMaxUDPOutstanding({MAX_IN_FLIGHT})
setLocal("127.0.0.1:{port}")
addACL("127.0.0.0/8")
newServer({{address="127.0.0.1:{upstream}", checkName="ready.{ZONE}"{tcp_only}}})
pc = newPacketCache({CACHE_ENTRIES}, {{maxTTL=86400}})
getPool(""):setCache(pc)
"""


def start_dnsdist(work: Path, upstream: int, tcp: bool = False) -> Running:
    port = free_port()
    conf = work / "dnsdist.conf"
    conf.write_text(dnsdist_conf(port, upstream, tcp))
    argv = ["dnsdist", "--supervised", "--disable-syslog", "-C", str(conf)]
    proc = _spawn(argv, SERVER_CPU, work / "dnsdist.out")
    wait_answering(port)
    return Running("dnsdist", port, proc, argv=argv, config=conf.read_text())


# The C peers: (work, upstream port, every upstream query over TCP) -> Running.
STARTERS: dict[str, Callable[[Path, int, bool], Running]] = {
    "dnsmasq": start_dnsmasq,
    "unbound": start_unbound,
    "dnsdist": start_dnsdist,
}


def check_tools() -> list[str]:
    return [
        t
        for t in ("dnsperf", "nsd", "dnsmasq", "unbound", "dnsdist", "taskset")
        if shutil.which(t) is None
    ]


# How each tool tells its version: (argv, the line of its output that names it).
VERSION_ARGV = {
    "dnsperf": ["dnsperf", "-h"],
    "nsd": ["nsd", "-v"],
    "dnsmasq": ["dnsmasq", "--version"],
    "unbound": ["unbound", "-V"],
    "dnsdist": ["dnsdist", "--version"],
}


def versions() -> dict[str, str]:
    """The first line naming a version in each tool's own report of it."""
    out = {"python": sys.version.split()[0]}
    for tool, argv in VERSION_ARGV.items():
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=20)
        except FileNotFoundError:
            out[tool] = "not installed"
            continue
        lines = (proc.stdout + proc.stderr).splitlines()
        named = [ln.strip() for ln in lines if "ersion" in ln] or [
            ln.strip() for ln in lines if ln.startswith(tool)
        ]
        out[tool] = named[0] if named else "?"
    return out
