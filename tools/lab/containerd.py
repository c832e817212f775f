"""Debian's containerd with its CRI plugin, run inside a lab node as a node runs it.

``Containerd(node_ns, base_dir, cni_bin_dir, cni_conf_dir)`` writes a config of its own
(root, state, gRPC socket and runc root all under ``base_dir``; CNI from the given
directories; the locally built pause image as ``sandbox_image``), starts ``containerd``
in the node's network namespace, waits for a CRI Version answer, imports the pause image
with ``ctr``, and on ``close()`` removes everything it made, even after a failure:
sandboxes (through the CRI, so the CNI DEL runs), the daemon, runc containers and shims
left behind, mounts under its root and state, and the pod network namespaces containerd
made.

How it is started decides which mount namespace it lives in:

* default: ``nsenter --net=/run/netns/<node>``: it shares the host's mounts, as on a real
  node, so the ``/run/netns/cni-*`` files it bind-mounts are seen by every process;
* ``own_mount_namespace=True``: ``unshare --mount --propagation slave`` first, a mount
  namespace of its own (a slave of the host's): the namespace files it mounts there are
  seen by nothing outside it, as with a containerd started by a unit with
  ``PrivateMounts=``.

``runtime_cni_conf_dirs={"handler": dir}`` adds runtime handlers (runc, as the default
one) that each read their CNI network from a conf dir of their own (the runtime's
``cni_conf_dir``, in containerd since 1.6): a pod started with that ``runtime_handler``
gets that network, so two plugins are served by one containerd.

``netns_mounts_under_state_dir=True`` is containerd's own option: the pod namespaces are
mounted under ``<state>/netns`` instead of ``/run/netns``.

On machines that refuse a lower OOM score even to root (a container), containerd would
fail every sandbox; ``restrict_oom_score_adj`` is then set, which is what the option is
for (containerd's docs: rootless and nested runs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc

from tools.lab.cri.client import RuntimeClient
from tools.lab.cri.pause_image import PAUSE_IMAGE, image_tarball
from tools.lab.netns import NETNS_DIR

log = logging.getLogger("ultranet.lab")

CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin keeps its objects in
SNAPSHOTTER = "overlayfs"
LIBCNI_RESULTS = Path("/var/lib/cni/results")  # libcni's default cache, go-cni keeps it
LOOPBACK_PLUGIN = Path("/usr/lib/cni/loopback")  # Debian's containernetworking-plugins
_MNT_DETACH = 2


class ContainerdError(RuntimeError):
    """containerd could not be started or answered wrongly; the message has its log tail."""


def lower_oom_score_refused() -> bool:
    """True when even root may not lower its OOM score here (a container without
    CAP_SYS_RESOURCE): containerd must then be told ``restrict_oom_score_adj``."""
    current = int(Path("/proc/self/oom_score_adj").read_text())
    if current <= -1000:
        return False
    done = subprocess.run(
        ["sh", "-c", f"echo {current - 1} > /proc/self/oom_score_adj"],
        capture_output=True,
    )
    return done.returncode != 0


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a TOML basic string is a JSON string for paths


class Containerd:
    """One containerd in a lab node's network namespace. Use as a context manager."""

    def __init__(
        self,
        node_ns: str,
        base_dir: Path,
        cni_bin_dir: Path,
        cni_conf_dir: Path,
        *,
        netns_mounts_under_state_dir: bool = False,
        own_mount_namespace: bool = False,
        restrict_oom_score_adj: bool | None = None,
        env: Mapping[str, str] | None = None,
        binary: str = "containerd",
        metrics_address: str | None = None,
        runtime_cni_conf_dirs: Mapping[str, Path] | None = None,
    ) -> None:
        self.node_ns = node_ns
        self.binary = binary
        # host:port in the node namespace for containerd's Prometheus /v1/metrics
        # (its CRI timers among them); None: no metrics listener.
        self.metrics_address = metrics_address
        self.base_dir = base_dir
        self.root = base_dir / "root"
        self.state = base_dir / "state"
        self.socket = base_dir / "containerd.sock"
        self.config_path = base_dir / "config.toml"
        self.log_path = base_dir / "containerd.log"
        self.runc_root = self.state / "runc"
        self.cni_bin_dir = cni_bin_dir
        self.cni_conf_dir = cni_conf_dir
        self.runtime_cni_conf_dirs = dict(runtime_cni_conf_dirs or {})
        self.netns_mounts_under_state_dir = netns_mounts_under_state_dir
        self.own_mount_namespace = own_mount_namespace
        self.restrict_oom_score_adj = (
            lower_oom_score_refused() if restrict_oom_score_adj is None else restrict_oom_score_adj
        )
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        # Sandbox id -> its network namespace file, as seen; close() removes what is left.
        self.sandboxes: dict[str, str] = {}
        self._log: IO[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Containerd:
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

    def config(self) -> str:
        """containerd's config.toml (version 2) for this instance."""
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        metrics = (
            f"[metrics]\n  address = {_toml_str(self.metrics_address)}\n"
            if self.metrics_address
            else ""
        )
        runtimes = "".join(
            f"""
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{name}]
      runtime_type = "io.containerd.runc.v2"
      cni_conf_dir = {_toml_str(conf_dir)}
      cni_max_conf_num = 1

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{name}.options]
        Root = {_toml_str(self.runc_root)}
"""
            for name, conf_dir in sorted(self.runtime_cni_conf_dirs.items())
        )
        return f"""version = 2
root = {_toml_str(self.root)}
state = {_toml_str(self.state)}
# Only snapshotters that cannot work here, and the plugin that would write /opt/containerd.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {_toml_str(self.socket)}

{metrics}{cri}
  sandbox_image = {_toml_str(PAUSE_IMAGE)}
  restrict_oom_score_adj = {str(self.restrict_oom_score_adj).lower()}
  netns_mounts_under_state_dir = {str(self.netns_mounts_under_state_dir).lower()}
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {_toml_str(self.cni_bin_dir)}
    conf_dir = {_toml_str(self.cni_conf_dir)}
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{SNAPSHOTTER}"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = {_toml_str(self.runc_root)}
{runtimes}"""

    def argv(self) -> list[str]:
        run = [self.binary, "--config", str(self.config_path)]
        if self.own_mount_namespace:
            # Not `ip netns exec`: it also remounts /sys for the namespace, which hides the
            # cgroup mount runc needs; unshare gives the mount namespace alone.
            return [
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "nsenter",
                f"--net={NETNS_DIR / self.node_ns}",
                *run,
            ]
        return ["nsenter", f"--net={NETNS_DIR / self.node_ns}", *run]

    def start(self, timeout: float = 30.0) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # The CRI plugin always adds a loopback network (go-cni's WithLoNetwork) and execs
        # its plugin from the same bin_dir: Debian's, linked in beside ours.
        loopback = self.cni_bin_dir / "loopback"
        if not loopback.exists():
            self.cni_bin_dir.mkdir(parents=True, exist_ok=True)
            loopback.symlink_to(LOOPBACK_PLUGIN)
        self.config_path.write_text(self.config())
        tarball = image_tarball()  # before the daemon: a gcc failure needs no teardown
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv(),
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **self.env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        self.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(tarball))

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the CRI answers a Version call (the plugin is loaded and serving)."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        with RuntimeClient(self.socket) as client:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise ContainerdError(
                        f"containerd exited {self.process.returncode}: {self.log_tail()}"
                    )
                try:
                    client.version(timeout=1.0)
                    return
                except grpc.RpcError:
                    pass  # not listening yet, or the CRI plugin not registered yet
                if time.monotonic() > deadline:
                    raise ContainerdError(f"no CRI answer in {timeout} s: {self.log_tail()}")
                time.sleep(delay)  # polling containerd's own answer, bounded by the deadline
                delay = min(0.2, delay * 2)

    def client(self, timeout: float = 60.0) -> RuntimeClient:
        return RuntimeClient(self.socket, timeout=timeout)

    def ctr(self, *args: str) -> str:
        """``ctr`` against this containerd, in the CRI's namespace; its stdout."""
        try:
            done = subprocess.run(
                ["ctr", "--address", str(self.socket), "--namespace", CRI_NAMESPACE, *args],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
        except subprocess.CalledProcessError as err:
            raise ContainerdError(f"ctr {' '.join(args)}: {err.stderr.strip()}") from err
        return done.stdout

    def sandbox_netns(self, client: RuntimeClient, sandbox_id: str) -> str:
        """The path of a sandbox's network namespace file, as containerd mounted it
        (remembered, so ``close`` removes it if containerd does not)."""
        info = client.sandbox_info(sandbox_id)
        path: str = next(
            ns["path"]
            for ns in info["runtimeSpec"]["linux"]["namespaces"]
            if ns["type"] == "network"
        )
        self.sandboxes[sandbox_id] = path
        return path

    def sandbox_pid(self, client: RuntimeClient, sandbox_id: str) -> int:
        pid: int = client.sandbox_info(sandbox_id)["pid"]
        return pid

    def close(self) -> None:
        """Remove everything; every step runs even if one before it fails. Idempotent."""
        with ExitStack() as cleanup:  # callbacks run last-registered first
            cleanup.callback(self._remove_pod_netns)
            cleanup.callback(self._unmount_under, [self.root, self.state])
            cleanup.callback(self._kill_shims)
            cleanup.callback(self._delete_runc_containers)
            cleanup.callback(self._stop_daemon)
            if self.process is not None and self.process.poll() is None:
                cleanup.callback(self._remove_sandboxes)

    # -- teardown steps --------------------------------------------------------------------

    def _remove_sandboxes(self) -> None:
        """Stop and remove every sandbox through the CRI, so the CNI DEL runs for each."""
        with self.client(timeout=30) as client:
            for sandbox in client.list_pod_sandbox():
                try:
                    self.sandbox_netns(client, sandbox.id)
                except (grpc.RpcError, KeyError, StopIteration, json.JSONDecodeError) as err:
                    log.warning("containerd: no netns path for sandbox %s: %s", sandbox.id, err)
                try:
                    client.stop_pod_sandbox(sandbox.id)
                    client.remove_pod_sandbox(sandbox.id)
                except grpc.RpcError as err:
                    log.error("containerd: removing sandbox %s failed: %s", sandbox.id, err)

    def _stop_daemon(self) -> None:
        process, self.process = self.process, None
        try:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def _delete_runc_containers(self) -> None:
        """Force-delete what runc still runs under our root (sandboxes of a killed run)."""
        root = self.runc_root / CRI_NAMESPACE
        if not root.is_dir():
            return
        for container in sorted(p.name for p in root.iterdir() if p.is_dir()):
            done = subprocess.run(
                ["runc", "--root", str(root), "delete", "--force", container],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                log.error("containerd: runc delete %s: %s", container, done.stderr.strip())

    def _kill_shims(self) -> None:
        """SIGKILL the runc shims this containerd started (by their ``-address``)."""
        for pid in self._shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _shim_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            if (
                argv
                and argv[0].endswith(b"containerd-shim-runc-v2")
                and str(self.socket).encode() in argv
            ):
                pids.append(int(entry.name))
        return pids

    def _unmount_under(self, dirs: list[Path]) -> None:
        """Detach every mount at or below ``dirs`` (rootfs, shm and netns mounts
        containerd leaves when it is killed), deepest first."""
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        for target in mounts_under(dirs):
            if libc.umount2(target.encode(), _MNT_DETACH) != 0:
                err = ctypes.get_errno()
                log.error("containerd: umount %s: %s", target, os.strerror(err))

    def _remove_pod_netns(self) -> None:
        """Unmount and unlink the namespace files of our sandboxes that containerd left,
        and libcni's cached results of their attachments (kept outside our root, in
        ``/var/lib/cni/results``, until a DEL succeeds)."""
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        mounted = set(mount_points())
        for sandbox_id, path in sorted(self.sandboxes.items()):
            real = str(Path(path).resolve())  # containerd names /var/run/netns/...
            if real in mounted and libc.umount2(real.encode(), _MNT_DETACH) != 0:
                err = ctypes.get_errno()
                log.error("containerd: umount %s: %s", real, os.strerror(err))
            Path(real).unlink(missing_ok=True)
            for cached in LIBCNI_RESULTS.glob(f"*-{sandbox_id}-*"):
                cached.unlink(missing_ok=True)

    def left_behind(self) -> list[str]:
        """What ``close`` should have removed and is still here: shims, mounts under root
        and state, namespace files and libcni cache entries of our sandboxes."""
        found = [f"containerd shim {pid}" for pid in self._shim_pids()]
        found += [f"mount {m}" for m in mounts_under([self.root, self.state])]
        for sandbox_id, path in sorted(self.sandboxes.items()):
            if Path(path).exists():
                found.append(f"netns file {path}")
            found += [f"libcni cache {c}" for c in LIBCNI_RESULTS.glob(f"*-{sandbox_id}-*")]
        return found

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def mount_points() -> list[str]:
    """Every mount point of this process's mount namespace (``/proc/self/mountinfo``),
    with the kernel's octal escapes undone."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        points.append(raw.encode().decode("unicode_escape"))
    return points


def mounts_under(dirs: list[Path]) -> list[str]:
    """The mount points at or below ``dirs``, deepest first."""
    prefixes = [str(d.resolve()) for d in dirs]
    found = [p for p in mount_points() if any(p == d or p.startswith(d + "/") for d in prefixes)]
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)
