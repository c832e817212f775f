"""A worker process: ``python -m dnscache.worker``, started only by the supervisor.

It inherits its listening sockets (the supervisor made them, in order, so the steering program's
indexes stay put across restarts) and one end of a control socket pair. Over that pair it
speaks newline-delimited JSON: the supervisor sends ``config`` (the first message, and again on
reload), ``stats`` and ``drain``; the worker answers ``ready``, ``config``, ``stats`` and
``drained``. When the pair closes (the supervisor died), the worker drains and exits, so no
worker outlives its supervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from .config import parse
from .errors import ConfigError
from .eventloop import FastSelector, new_loop
from .gcpolicy import GcPolicy
from .server import Worker

log = logging.getLogger("ultranet.dns")


def _fds(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dnscache.worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--udp-fds", default="")
    p.add_argument("--tcp-fds", default="")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s worker{args.index} %(levelname)s %(message)s",
    )
    # The supervisor handles the terminal's ^C and SIGHUP; a worker acts on its messages.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if args.loop == "uvloop":
        import uvloop

        code: int = uvloop.run(_run(args, None))
        return code
    selector = FastSelector()
    with asyncio.Runner(loop_factory=lambda: new_loop(selector)) as runner:
        return runner.run(_run(args, selector))


async def _run(args: argparse.Namespace, selector: FastSelector | None) -> int:
    loop = asyncio.get_running_loop()
    udp = [socket.socket(fileno=fd) for fd in _fds(args.udp_fds)]
    tcp = [socket.socket(fileno=fd) for fd in _fds(args.tcp_fds)]
    control = socket.socket(fileno=args.control_fd)
    reader, writer = await asyncio.open_connection(sock=control, limit=1 << 24)
    first = json.loads(await reader.readline())
    cfg = parse(first["doc"], cpu_count=1)
    worker = Worker(cfg, loop, udp, tcp, selector)
    await worker.start()
    collector = GcPolicy(loop)
    collector.start()
    _send(writer, {"op": "ready", "index": args.index, "pid": os.getpid()})
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stopper = loop.create_task(stop.wait())
    try:
        while True:
            line_task = loop.create_task(reader.readline())
            done, _ = await asyncio.wait({line_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if line_task not in done:
                line_task.cancel()
                break
            line = line_task.result()
            if not line:
                break  # the supervisor is gone
            msg = json.loads(line)
            if msg["op"] == "drain":
                break
            _send(writer, _handle(worker, msg))
    finally:
        stopper.cancel()
        collector.stop()
        await worker.drain(cfg.drain_timeout, lambda: _send(writer, {"op": "closed"}))
        _send(writer, {"op": "drained", "index": args.index})
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
        for s in udp + tcp:
            s.close()
    return 0


def _handle(worker: Worker, msg: dict[str, Any]) -> dict[str, Any]:
    op = msg["op"]
    if op == "stats":
        return {"op": "stats", "data": worker.stats.snapshot(worker.gauges())}
    if op == "config":
        try:
            worker.reconfigure(parse(msg["doc"], cpu_count=1))
        except ConfigError as exc:  # the supervisor validated it; report, keep the old one
            return {"op": "config", "ok": False, "error": str(exc)}
        return {"op": "config", "ok": True}
    return {"op": "error", "error": f"unknown op {op!r}"}


def _send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(json.dumps(msg).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())
