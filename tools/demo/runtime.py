"""How the demo's pods start and stop: through containerd's CRI, as on a node, or through
the libcni driver when containerd cannot start here.

``CriPods``: Debian's containerd with its CRI plugin in the lab node (``tools/lab/containerd.py``),
driven as the kubelet drives it: RunPodSandbox (containerd makes the sandbox's network
namespace, starts the pause container and execs ultranet's shim through go-cni and libcni),
PodSandboxStatus for what containerd recorded, StopPodSandbox (the CNI DEL) and
RemovePodSandbox. A multi-NIC pod is asked for by its annotation, as in a pod spec.

``LibcniPods``: our Go driver calls libcni's AddNetworkList / DelNetworkList on lab-made
namespaces, the plugin's path without a runtime. The demo uses it only when containerd
cannot start, and says why.

Both retry an ADD refused with "try again later" (ultranet's code 11 while a card has no
free address yet) with back-off, as the kubelet retries a sandbox whose network set-up
failed; the latency kept is that of the attempt that succeeded.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.demo.progress import DemoError
from tools.demo.services import scrape

MULTI_NIC_ANNOTATION = {"k8s.amazonaws.com/nicConfig": "multi-nic-attachment"}
ADD_RETRY_FIRST_S, ADD_RETRY_MAX_S, ADD_RETRY_FOR_S = 0.25, 2.0, 60.0
# containerd's metrics listener, on the loopback of the lab's own node namespace.
CONTAINERD_METRICS = "127.0.0.1:1338"
# containerd's own CRI timers (Prometheus histograms): the CNI ADD / DEL it runs for a sandbox.
NETWORK_TIMERS = {
    "add": "containerd_cri_sandbox_create_network_seconds",
    "del": "containerd_cri_sandbox_delete_network_seconds",
}


class RuntimeUnavailable(RuntimeError):
    """containerd cannot start here; the message says why."""


@dataclass(slots=True)
class Pod:
    index: int
    multi_nic: bool
    ns: str = ""  # the name of its network namespace under /run/netns
    sandbox: str = ""  # the CRI sandbox id (CNI_CONTAINERID); libcni: the container id
    pid: int = 0  # the pause process (CRI only)
    add_ms: float = 0.0  # the ADD (RunPodSandbox) that succeeded
    del_ms: float = 0.0  # the DEL (StopPodSandbox)
    remove_ms: float = 0.0  # RemovePodSandbox (CRI only)
    failures: list[str] = field(default_factory=list)  # ADDs that failed before it
    addresses: list[tuple[str, str]] = field(default_factory=list)  # (ifname in pod, address)
    name_prefix: str = "pod"  # "pod6" on the IPv6 node

    @property
    def name(self) -> str:
        return f"{self.name_prefix}-{self.index:03d}"

    @property
    def container(self) -> str:
        """Unique across both nodes: libcni's result cache is the host's, keyed by it."""
        return f"demo-{self.name}"


def with_retries(pod: Pod, attempt: Callable[[], str | None], undo: Callable[[], None]) -> None:
    """``attempt()`` (None on success, else the error text) until it succeeds, with
    back-off; ``undo()`` after each failure; DemoError after ADD_RETRY_FOR_S."""
    delay, deadline = ADD_RETRY_FIRST_S, time.monotonic() + ADD_RETRY_FOR_S
    while (error := attempt()) is not None:
        pod.failures.append(error)
        if time.monotonic() + delay > deadline:
            raise DemoError(
                f"ADD of {pod.name} failed {len(pod.failures)} times in {ADD_RETRY_FOR_S:g} s; "
                f"last: {error}"
            )
        undo()
        time.sleep(delay)  # the kubelet's back-off between sandbox attempts
        delay = min(delay * 2, ADD_RETRY_MAX_S)


# -- containerd ------------------------------------------------------------------------------


def containerd_missing(binary: str) -> str | None:
    """Why containerd cannot start here (a missing tool, named with its Debian package),
    or None."""
    wanted = ((binary, "containerd"), ("ctr", "containerd"), ("runc", "runc"), ("gcc", "gcc"))
    missing = [f"{tool} ({pkg})" for tool, pkg in wanted if shutil.which(tool) is None]
    return f"not found: {', '.join(missing)}" if missing else None


class CriPods:
    label = "containerd CRI"
    add_call, del_call = "RunPodSandbox", "StopPodSandbox"

    def __init__(self, containerd: Any) -> None:
        self.containerd = containerd
        self.client = containerd.client(timeout=60)

    @classmethod
    def start(
        cls,
        node_ns: str,
        base_dir: Path,
        bin_dir: Path,
        conf_dir: Path,
        binary: str,
        stack: ExitStack,
    ) -> CriPods:
        """containerd up in the node with our CNI dirs, its clean-up on ``stack`` before
        it starts. RuntimeUnavailable says why it could not start."""
        from tools.lab.containerd import Containerd, ContainerdError
        from tools.lab.cri.pause_image import PauseImageError

        if (missing := containerd_missing(binary)) is not None:
            raise RuntimeUnavailable(missing)
        containerd = Containerd(
            node_ns, base_dir, bin_dir, conf_dir, binary=binary, metrics_address=CONTAINERD_METRICS
        )
        stack.callback(containerd.close)
        try:
            containerd.start()
        except (ContainerdError, PauseImageError, OSError, subprocess.SubprocessError) as err:
            containerd.close()  # now, not at the end: the libcni run goes on without it
            raise RuntimeUnavailable(f"{type(err).__name__}: {err}") from err
        pods = cls(containerd)
        stack.callback(pods.client.close)
        return pods

    @property
    def pid(self) -> int:
        process = self.containerd.process
        return int(process.pid) if process is not None else 0

    def version(self) -> str:
        answer = self.client.version()
        return f"{answer.runtime_name} {answer.runtime_version} (CRI {answer.runtime_api_version})"

    def add(self, pod: Pod) -> None:
        import grpc

        annotations = MULTI_NIC_ANNOTATION if pod.multi_nic else {}

        def attempt() -> str | None:
            begun = time.perf_counter()
            try:
                pod.sandbox = self.client.run_pod_sandbox(pod.name, annotations=annotations)
            except grpc.RpcError as err:
                return str(err.details())  # containerd has torn the failed sandbox down
            pod.add_ms = (time.perf_counter() - begun) * 1000
            return None

        with_retries(pod, attempt, lambda: None)
        info = self.client.sandbox_info(pod.sandbox)
        path = next(
            n["path"] for n in info["runtimeSpec"]["linux"]["namespaces"] if n["type"] == "network"
        )
        self.containerd.sandboxes[pod.sandbox] = path  # close() removes it if containerd did not
        pod.ns, pod.pid = Path(path).name, int(info["pid"])
        pod.addresses = cni_result_addresses(info.get("cniResult") or {})
        if not pod.addresses:
            raise DemoError(f"containerd recorded no pod address for {pod.name}: {info}")

    def delete(self, pod: Pod) -> None:
        begun = time.perf_counter()
        self.client.stop_pod_sandbox(pod.sandbox)
        stopped = time.perf_counter()
        self.client.remove_pod_sandbox(pod.sandbox)
        pod.del_ms = (stopped - begun) * 1000
        pod.remove_ms = (time.perf_counter() - stopped) * 1000

    def left_behind(self) -> list[str]:
        found: list[str] = self.containerd.left_behind()
        return found

    def network_timers(self) -> dict[str, tuple[float, int]]:
        """containerd's own CNI timers: {"add"/"del": (mean ms, count)}, from /v1/metrics."""
        totals = scrape(self.containerd.node_ns, CONTAINERD_METRICS, "/v1/metrics", "containerd")
        out = {}
        for op, name in NETWORK_TIMERS.items():
            count = int(totals.get(f"{name}_count", 0))
            if count:
                out[op] = (totals[f"{name}_sum"] / count * 1000, count)
        return out


def cni_result_addresses(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(pod interface, address) from containerd's record of the CNI result: the
    interfaces inside the sandbox (lo aside), eth0 first, then by name's number."""
    out = []
    for name, config in (result.get("Interfaces") or {}).items():
        if name == "lo" or not config.get("Sandbox"):
            continue  # host-side veths carry no Sandbox
        for ip in config.get("IPConfigs") or []:
            out.append((str(name), str(ip["IP"])))

    def order(item: tuple[str, str]) -> tuple[int, str]:
        digits = "".join(c for c in item[0] if c.isdigit())
        return (0 if item[0] == "eth0" else 1 + int(digits or 0), item[0])

    return sorted(out, key=order)


# -- the libcni driver -------------------------------------------------------------------------


def build_driver() -> Path:
    """The libcni driver, built (or cached); errors name the Debian packages."""
    from tools.bench.cni.driver import DriverUnavailable, build

    try:
        return build()
    except DriverUnavailable as err:
        raise DemoError(f"libcni driver: {err} (make demo installs them)") from err
    except subprocess.CalledProcessError as err:
        raise DemoError(f"building tools/bench/cni/libcni_driver.go failed: {err}") from err


class LibcniPods:
    label = "libcni driver"
    add_call, del_call = "AddNetworkList", "DelNetworkList"

    def __init__(self, driver: Any, binary: Path, make_namespace: Callable[[str], str]) -> None:
        self.driver = driver
        self.binary = binary
        self.make_namespace = make_namespace

    def add(self, pod: Pod) -> None:
        pod.ns = self.make_namespace(f"{pod.index:03d}")
        pod.sandbox = pod.container
        netns_path = f"/run/netns/{pod.ns}"
        annotations = MULTI_NIC_ANNOTATION if pod.multi_nic else None

        def attempt() -> str | None:
            answer = self.driver.call("add", pod.container, netns_path, annotations=annotations)
            if not answer["ok"]:
                return str(answer["error"]).removeprefix('plugin type="ultranet" failed (add): ')
            pod.add_ms = float(answer["ms"])
            pod.addresses = result_addresses(answer["result"])
            return None

        def undo() -> None:  # libcni leaves the DEL of a failed ADD to the runtime
            answer = self.driver.call("del", pod.container, netns_path)
            if not answer["ok"]:
                raise DemoError(f"DEL after the failed ADD of {pod.name} failed: {answer['error']}")

        with_retries(pod, attempt, undo)

    def delete(self, pod: Pod) -> None:
        answer = self.driver.call("del", pod.container, f"/run/netns/{pod.ns}")
        if not answer["ok"]:
            raise DemoError(f"DEL of {pod.name} failed: {answer['error']}")
        pod.del_ms = float(answer["ms"])

    def left_behind(self) -> list[str]:
        return []

    def network_timers(self) -> dict[str, tuple[float, int]]:
        return {}


def result_addresses(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(pod interface, address) from a CNI result, in its order."""
    interfaces = result.get("interfaces") or []
    out = []
    for ip in result.get("ips") or []:
        index = ip.get("interface")
        name = interfaces[index]["name"] if index is not None else "?"
        out.append((str(name), str(ip["address"]).split("/")[0]))
    return out
