"""Helpers for the DNS cache tests: a real ultranet-dns process and real clients."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import dnslib
import yaml

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


class DnsProcess:
    """``python -m dnscache`` with a config file; ``port`` and ``metrics`` once ready."""

    def __init__(
        self, doc: dict[str, Any], extra: list[str] | None = None, netns: str | None = None
    ) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="ultranet-dns-test-")
        self.config = Path(self.dir.name) / "dns.yaml"
        self.write_config(doc)
        self.log = open(Path(self.dir.name) / "stderr.log", "w+")  # noqa: SIM115
        argv = [sys.executable, "-m", "dnscache", "--config", str(self.config), *(extra or [])]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=REPO,
            env=env,
            text=True,
            start_new_session=True,
        )
        self.ready = self._wait_ready()
        host, _, port = self.ready["listen"][0].rpartition(":")
        self.host = host
        self.port = int(port)
        self.metrics = self.ready.get("metrics", "")

    def write_config(self, doc: dict[str, Any]) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.rename(self.config)

    def _wait_ready(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    break
                event: dict[str, Any] = json.loads(line)
                if event.get("event") == "ready":
                    return event
            if self.proc.poll() is not None:
                break
        err = self.stderr()
        self.close()
        raise AssertionError(f"ultranet-dns did not start:\n{err}")

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """The next JSON line on stdout with ``"event": name`` (bounded; not a timed wait)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if not r:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            event: dict[str, Any] = json.loads(line)
            if event.get("event") == name:
                return event
        raise AssertionError(f"no {name!r} event from ultranet-dns:\n{self.stderr()}")

    def stderr(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.metrics}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
            exc.close()
            return exc.code, body

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.http("/metrics")[1].splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, rest = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += float(value)
        return total

    def close(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # workers of a supervisor killed hard: never leave them behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        self.dir.cleanup()
        return self.proc.returncode


def base_doc(addr: str, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listen": ["127.0.0.1:0"],
        "workers": 1,
        "metrics": "127.0.0.1:0",
        "zones": {".": {"upstreams": [addr]}},
        "upstream": {"timeout": 1.0},
    }
    doc.update(over)
    return doc


def make_query(
    name: str, qtype: str = "A", *, do: bool = False, payload: int | None = 1232, cd: bool = False
) -> dnslib.DNSRecord:
    q = dnslib.DNSRecord.question(name, qtype)
    if cd:
        q.header.cd = 1
    if payload is not None:
        q.add_ar(dnslib.EDNS0(udp_len=payload, flags="do" if do else ""))
    return q


def udp(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 3.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, (host, port))
        return s.recv(65535)


def ask(
    port: int, name: str, qtype: str = "A", host: str = "127.0.0.1", **kw: Any
) -> dnslib.DNSRecord:
    q = make_query(name, qtype, **kw)
    reply = dnslib.DNSRecord.parse(udp(port, bytes(q.pack()), host))
    assert reply.header.id == q.header.id
    return reply


def tcp_exchange(
    port: int, messages: list[bytes], host: str = "127.0.0.1", timeout: float = 5.0
) -> list[bytes]:
    """Send every message on one connection (pipelined), return replies in arrival order."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"".join(len(m).to_bytes(2, "big") + m for m in messages))
        out = []
        buf = b""
        while len(out) < len(messages):
            chunk = s.recv(65535)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                n = int.from_bytes(buf[:2], "big")
                out.append(buf[2 : 2 + n])
                buf = buf[2 + n :]
        return out


def dig(port: int, *args: str, host: str = "127.0.0.1") -> str:
    proc = subprocess.run(
        ["dig", f"@{host}", "-p", str(port), "+tries=1", "+time=3", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return proc.stdout


def wait_for(cond: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
