"""ADD/DEL latency through libcni: ultranet vs Debian's reference ptp + host-local.

``python -m tools.bench.cni [-n 50] [--rounds 2] [--python PATH] [--json]`` (root: it
starts a lab). Both plugins run in the same lab node namespace, driven by the same
libcni 1.1 driver (``libcni_driver.go``); each figure is the wall time of libcni's
``AddNetworkList``/``DelNetworkList`` call, which execs the plugin chain, as a runtime
pays it. ultranet's daemon side (``serve`` + ``CniHandler`` + in-process pool) runs in
this process on its own event loop thread, as it would inside ``ultranet-ipamd``.
Rounds alternate the two plugins so machine noise hits both alike; 3 warm-up pairs
each are not counted. DEL is measured with the netns still present (the kubelet's
order: DEL, then the namespace goes), so both delete a veth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from cni.handler import CniHandler
from cni.install import conflist, install
from cni.plumbing import Plumbing
from cni.transport import serve
from tools.bench.cni.driver import REFERENCE_PLUGINS, Driver
from tools.lab.lab import Lab, LabConfig
from tools.lab.pool_backend import PoolBackend, pool_from_enis

WARMUP = 3
REFERENCE = {
    "cniVersion": "1.0.0",
    "name": "reference",
    "plugins": [
        {
            "type": "ptp",
            "ipMasq": False,
            "mtu": 9001,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "198.18.0.0/24"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }
    ],
}


class Daemon:
    """serve() + CniHandler on an event loop thread, host side in ``node_ns``."""

    def __init__(self, lab: Lab, socket_path: Path) -> None:
        views = [lab.cloud.eni_view(e.eni_id) for e in lab.cloud.enis_of(lab.instance_id)]
        self.backend = PoolBackend(pool_from_enis(views))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="daemon")
        self._thread.start()
        self._netns = f"/run/netns/{lab.node_ns}"
        self._socket = socket_path
        self._run(self._start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start(self) -> None:
        self.plumbing = await Plumbing.open(self._netns)
        self.server = await serve(self._socket, CniHandler(self.backend, self.plumbing).handle)

    async def _stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        await self.plumbing.close()

    def settle(self) -> None:
        self._run(self.plumbing.settle())

    def close(self) -> None:
        try:
            self._run(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


def percentiles(samples: list[float]) -> tuple[float, float]:
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return round(statistics.median(samples), 2), round(deciles[8], 2)


def cycle(
    driver: Driver, pods: list[str], prefix: str, adds: list[float], dels: list[float]
) -> None:
    for i, pod in enumerate(pods):
        answer = driver.call("add", f"{prefix}{i}", f"/run/netns/{pod}")
        if not answer["ok"]:
            raise RuntimeError(f"{prefix} ADD failed: {answer['error']}")
        adds.append(answer["ms"])
    for i, pod in enumerate(pods):
        answer = driver.call("del", f"{prefix}{i}", f"/run/netns/{pod}")
        if not answer["ok"]:
            raise RuntimeError(f"{prefix} DEL failed: {answer['error']}")
        dels.append(answer["ms"])


def measure(n: int, rounds: int, python: str | None) -> dict[str, Any]:
    samples: dict[str, tuple[list[float], list[float]]] = {
        "ultranet": ([], []),
        "reference": ([], []),
    }
    with (
        Lab(LabConfig(instance_type="m5.large", prefixes_per_card=4)) as lab,
        tempfile.TemporaryDirectory() as tmp,
    ):
        root = Path(tmp)
        pods = [lab.create_pod_namespace(f"b{i}") for i in range(n)]
        (shim,) = install(root / "bin", None, python=python)
        interpreter = shim.read_text().split("\n", 1)[0][2:]
        body = conflist()
        body.pop("cniVersions")
        (root / "ultranet.conflist").write_text(json.dumps(body))
        ref = json.loads(json.dumps(REFERENCE))
        ref["plugins"][0]["ipam"]["dataDir"] = str(root / "host-local")
        (root / "reference.conflist").write_text(json.dumps(ref))
        daemon = Daemon(lab, root / "cni.sock")
        try:
            env = {"ULTRANET_CNI_SOCKET": str(root / "cni.sock")}
            with (
                Driver(
                    lab.node_ns, root / "ultranet.conflist", root / "cache-u", [shim.parent], env
                ) as ours,
                Driver(
                    lab.node_ns, root / "reference.conflist", root / "cache-r", [REFERENCE_PLUGINS]
                ) as theirs,
            ):
                for driver, name in ((ours, "ultranet"), (theirs, "reference")):
                    cycle(driver, pods[:WARMUP], f"w{name[0]}", [], [])
                for r in range(rounds):
                    cycle(ours, pods, f"u{r}-", *samples["ultranet"])
                    daemon.settle()
                    cycle(theirs, pods, f"r{r}-", *samples["reference"])
        finally:
            daemon.close()
    out: dict[str, Any] = {}
    for name, (adds, dels) in samples.items():
        add_p50, add_p90 = percentiles(adds)
        del_p50, del_p90 = percentiles(dels)
        out[name] = {
            "add_p50_ms": add_p50,
            "add_p90_ms": add_p90,
            "del_p50_ms": del_p50,
            "del_p90_ms": del_p90,
            "samples": len(adds),
        }
    out["ratio"] = {
        "add_p50": round(out["ultranet"]["add_p50_ms"] / out["reference"]["add_p50_ms"], 2),
        "del_p50": round(out["ultranet"]["del_p50_ms"] / out["reference"]["del_p50_ms"], 2),
    }
    out["shim_interpreter"] = interpreter
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.cni", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-n", type=int, default=50, help="pods per round (<= 60)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--python", help="the shim's interpreter (default: this one, resolved)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 60:
        parser.error("-n must be 1..60 (the lab node has four /28 prefixes)")
    if not (REFERENCE_PLUGINS / "ptp").exists():
        print("needs Debian package containernetworking-plugins", file=sys.stderr)
        return 1
    result = measure(args.n, args.rounds, args.python)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name in ("ultranet", "reference"):
        row = result[name]
        print(
            f"{name:10s} ADD p50 {row['add_p50_ms']:6.2f} ms p90 {row['add_p90_ms']:6.2f} ms   "
            f"DEL p50 {row['del_p50_ms']:6.2f} ms p90 {row['del_p90_ms']:6.2f} ms   "
            f"(n={row['samples']})"
        )
    print(
        f"ratio      ADD p50 {result['ratio']['add_p50']}x   DEL p50 {result['ratio']['del_p50']}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
