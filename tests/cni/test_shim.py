"""The exec'd shim: its imports, its wire format, the installer, and the daemon-down paths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from cni import shim
from cni.install import InstallError, conflist, install, real_interpreter
from cni.spec import SUPPORTED_VERSIONS
from tests.cni.harness import conf, env

# What `python -IS` has loaded before running a script; the shim may add only _socket.
ALLOWED = {"_socket"}


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    (path, _) = install(tmp_path / "bin", tmp_path / "net.d", python=sys.executable)
    return path


def exec_shim(
    path: Path, variables: dict[str, str], stdin: bytes | None, tmp_path: Path
) -> tuple[int, dict[str, object]]:
    full = {
        "PATH": "/usr/bin:/bin",
        "ULTRANET_CNI_SOCKET": str(tmp_path / "absent.sock"),
        "ULTRANET_CNI_SPOOL": str(tmp_path / "spool"),
        **variables,
    }
    done = subprocess.run([str(path)], input=stdin, env=full, capture_output=True, timeout=30)
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})


def test_installed_shim_imports_only_what_the_interpreter_loaded(
    installed: Path, tmp_path: Path
) -> None:
    base = subprocess.run(
        [sys.executable, "-IS", "-X", "importtime", "-c", "pass"], capture_output=True, text=True
    )
    shim_run = subprocess.run(
        [sys.executable, "-IS", "-X", "importtime", str(installed)],
        input=conf(),
        env={"CNI_COMMAND": "STATUS", "ULTRANET_CNI_SOCKET": str(tmp_path / "none")},
        capture_output=True,
    )

    def modules(stderr: str) -> set[str]:
        return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if "|" in line}

    extra = modules(shim_run.stderr.decode()) - modules(base.stderr)
    assert "_socket" in extra or "_socket" in sys.builtin_module_names
    assert extra <= ALLOWED, extra


def test_shebang_names_the_real_interpreter_with_isolation(installed: Path) -> None:
    first = installed.read_bytes().split(b"\n", 1)[0].decode()
    assert first == f"#!{Path(sys.executable).resolve()} -IS"
    assert os.access(installed, os.X_OK)


def code_files(bin_dir: Path) -> set[str]:
    return {p.name for p in bin_dir.glob(".ultranet-shim-*.marshal")}


def test_the_shim_runs_code_beside_it_and_reinstalls_keep_only_the_previous_code(
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    names = []
    for sock in ("a.sock", "b.sock", "c.sock"):  # each a different code file
        (shim_path,) = install(bin_dir, None, python=sys.executable, socket_path=sock)
        (line,) = [x for x in shim_path.read_text().splitlines() if x.startswith("NAME = ")]
        names.append(line.split("'")[1])
        code, out = exec_shim(shim_path, {"CNI_COMMAND": "VERSION"}, conf("1.0.0"), tmp_path)
        assert code == 0 and out["supportedVersions"] == list(SUPPORTED_VERSIONS)
    assert len(set(names)) == 3
    # the running shim's code and the one before it (an exec of it may be starting)
    assert code_files(bin_dir) == {names[1], names[2]}
    install(bin_dir, None, python=sys.executable, socket_path="c.sock")  # same code again
    assert code_files(bin_dir) == {names[2]}


def test_the_shim_finds_its_code_where_the_runtime_sees_it(tmp_path: Path) -> None:
    """The init container installs into /host/opt/cni/bin; the host execs /opt/cni/bin."""
    (shim_path,) = install(tmp_path / "host" / "bin", None, python=sys.executable)
    moved = tmp_path / "elsewhere"
    (tmp_path / "host" / "bin").rename(moved)
    code, out = exec_shim(moved / shim_path.name, {"CNI_COMMAND": "VERSION"}, conf(), tmp_path)
    assert code == 0 and out["supportedVersions"] == list(SUPPORTED_VERSIONS)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_shim_whose_code_cannot_be_loaded_answers_an_io_error(
    installed: Path, tmp_path: Path, damage: str
) -> None:
    (code_file,) = installed.parent.glob(".ultranet-shim-*.marshal")
    if damage == "missing":
        code_file.unlink()
    else:
        code_file.write_bytes(code_file.read_bytes()[:100])
    code, out = exec_shim(installed, {"CNI_COMMAND": "VERSION"}, conf("1.0.0"), tmp_path)
    assert code == 1 and out["code"] == 5
    assert str(code_file) in str(out["msg"])
    assert ("No such file" if damage == "missing" else "100 bytes") in str(out["msg"])


def test_installer_refuses_a_version_manager_shim(tmp_path: Path) -> None:
    fake = tmp_path / "shims" / "python3"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nexec pyenv exec python "$@"\n')
    with pytest.raises(InstallError, match="not an executable binary"):
        real_interpreter(str(fake))
    with pytest.raises(InstallError, match="not an executable binary"):
        install(tmp_path / "bin", None, python=str(fake))
    assert not (tmp_path / "bin" / "ultranet").exists()


def test_conflist_lists_every_version_and_the_annotation_capability(tmp_path: Path) -> None:
    (_, written) = install(tmp_path / "bin", tmp_path / "net.d", python=sys.executable)
    body = json.loads(written.read_text())
    assert body == conflist()
    assert body["cniVersions"] == list(SUPPORTED_VERSIONS)
    (plugin,) = body["plugins"]
    assert plugin["type"] == "ultranet"
    assert plugin["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}
    assert not [p for p in written.parent.iterdir() if p.name.startswith(".")]  # no temp files


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"XXXX" + b"Q" + b"\0\0\0\0", "bad magic"),
        (shim.MAGIC + b"Q" + (shim.MAX_FRAME + 1).to_bytes(4, "big"), "exceeds"),
    ],
)
def test_wire_header_rejects_foreign_or_huge_frames(data: bytes, message: str) -> None:
    with pytest.raises(shim.WireError, match=message):
        shim.parse_header(data)


def test_wire_round_trip_and_truncation() -> None:
    request = shim.encode_request({b"CNI_COMMAND": b"ADD", b"CNI_ARGS": b""}, b'{"a": 1}')
    body = shim.decode_frame(request, shim.REQUEST)
    assert shim.decode_request(body) == ({b"CNI_COMMAND": b"ADD", b"CNI_ARGS": b""}, b'{"a": 1}')
    with pytest.raises(shim.WireError, match="truncated"):
        shim.decode_request(body[:-1])
    with pytest.raises(shim.WireError, match="trailing"):
        shim.decode_request(body + b"x")
    answer = shim.encode_answer(1, b"out", b"err")
    assert shim.decode_answer(shim.decode_frame(answer, shim.ANSWER)) == (1, b"out", b"err")


@pytest.mark.parametrize(
    ("stdin", "version"),
    [
        (b'{"cniVersion": "1.0.0"}', b"1.0.0"),
        (b'{"cniVersion" :\n "0.4.0", "name": "x"}', b"0.4.0"),
        (b'{"cniVersion": 4}', b"1.1.0"),
        (b'{"cniVersion": "1.0.0\\" evil"}', b"1.1.0"),
        (b"", b"1.1.0"),
    ],
)
def test_shim_reads_cni_version_without_json(stdin: bytes, version: bytes) -> None:
    assert shim.cni_version(stdin) == version


def test_version_is_answered_without_the_daemon(installed: Path, tmp_path: Path) -> None:
    code, out = exec_shim(installed, {"CNI_COMMAND": "VERSION"}, conf("1.0.0"), tmp_path)
    assert code == 0
    assert out == {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}


def test_daemon_down_del_succeeds_and_spools(installed: Path, tmp_path: Path) -> None:
    variables = env("DEL", "c1", "/run/netns/gone")
    code, out = exec_shim(installed, variables, conf(), tmp_path)
    assert (code, out) == (0, {})
    (spooled,) = (tmp_path / "spool").iterdir()
    assert spooled.name == "c1:eth0.del"
    sent, stdin = shim.decode_request(shim.decode_frame(spooled.read_bytes(), shim.REQUEST))
    assert stdin == conf()
    assert sent[b"CNI_COMMAND"] == b"DEL" and b"ULTRANET_CNI_SOCKET" not in sent


@pytest.mark.parametrize(("command", "code"), [("STATUS", 50), ("ADD", 11), ("CHECK", 11)])
def test_daemon_down_answers_50_for_status_and_11_otherwise(
    installed: Path, tmp_path: Path, command: str, code: int
) -> None:
    rc, out = exec_shim(installed, env(command, "c1", "/proc/self/ns/net"), conf("1.0.0"), tmp_path)
    assert rc == 1
    assert out["code"] == code and out["cniVersion"] == "1.0.0"
    assert str(tmp_path / "absent.sock") in str(out["msg"])
    assert not (tmp_path / "spool").exists()


def test_unreadable_stdin_is_code_5(installed: Path, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "write-only", os.O_WRONLY | os.O_CREAT)  # read() fails: EBADF
    try:
        done = subprocess.run(
            [str(installed)], stdin=fd, env={"CNI_COMMAND": "ADD"}, capture_output=True
        )
    finally:
        os.close(fd)
    assert done.returncode == 1
    out = json.loads(done.stdout)
    assert out["code"] == 5 and "stdin" in out["msg"]


def test_del_that_cannot_be_spooled_is_code_11(installed: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, out = exec_shim(
        installed, {**env("DEL", "c1"), "ULTRANET_CNI_SPOOL": str(blocker)}, conf(), tmp_path
    )
    assert code == 1 and out["code"] == 11 and "cannot spool" in str(out["msg"])


def answered_by_a_daemon(
    installed: Path, tmp_path: Path, answer: bytes, **run: Any
) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    """Exec the shim against a one-shot daemon that sends ``answer``; (the run, what it got)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "daemon.sock"))
    listener.listen(1)
    received: list[bytes] = []

    def answer_once() -> None:
        conn, _ = listener.accept()
        with conn:
            kind, size = shim.parse_header(conn.recv(9, socket.MSG_WAITALL))
            received.append(kind + conn.recv(size, socket.MSG_WAITALL))
            conn.sendall(answer)

    daemon = threading.Thread(target=answer_once)
    daemon.start()
    try:
        done = subprocess.run(
            [str(installed)],
            input=conf(),
            env={
                **env("ADD", "c1", "/proc/self/ns/net"),
                "ULTRANET_CNI_SOCKET": listener.getsockname(),
            },
            timeout=30,
            **run,
        )
    finally:
        daemon.join(timeout=30)
        listener.close()
    return done, received[0]


def test_the_daemons_whole_answer_reaches_the_runtime(installed: Path, tmp_path: Path) -> None:
    # The shim ends in posix._exit, which flushes nothing: its exit code and both streams
    # must all be out by then, here each larger than a pipe's 64 KiB.
    stdout, stderr = b"o" * 300_000 + b"\n", b"e" * 70_000
    done, received = answered_by_a_daemon(
        installed, tmp_path, shim.encode_answer(7, stdout, stderr), capture_output=True
    )
    assert (done.returncode, done.stdout, done.stderr) == (7, stdout, stderr)
    flags, sent, body = shim.decode_request_v2(received[1:])
    assert received[:1] == shim.REQUEST and body == conf()
    assert flags == shim.FLAG_NETNS_FD  # /proc/self/ns/net opened and sent
    assert sent[b"CNI_COMMAND"] == b"ADD"


def test_a_closed_stderr_costs_the_runtime_nothing_of_the_answer(
    installed: Path, tmp_path: Path
) -> None:
    answer = shim.encode_answer(0, b'{"cniVersion": "1.1.0"}\n', b"a warning")
    done, _ = answered_by_a_daemon(
        installed, tmp_path, answer, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2)
    )
    assert (done.returncode, done.stdout) == (0, b'{"cniVersion": "1.1.0"}\n')


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_a_netns_the_shim_cannot_open_is_answered_by_the_shim(
    installed: Path, tmp_path: Path, command: str
) -> None:
    # No daemon listens (absent.sock): 3 and 4 instead of 11 show the shim answered
    # before any request, so no address can have been taken.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "a-socket"))  # open(2) of a socket file: ENXIO
    try:
        gone = exec_shim(
            installed, env(command, "c1", "/run/netns/ul-gone"), conf("0.4.0"), tmp_path
        )
        other = exec_shim(
            installed, env(command, "c1", str(tmp_path / "a-socket")), conf(), tmp_path
        )
    finally:
        sock.close()
    assert gone[0] == 1 and gone[1]["code"] == 3 and gone[1]["cniVersion"] == "0.4.0", gone
    assert 'CNI_NETNS="/run/netns/ul-gone": gone' in str(gone[1]["msg"])
    assert other[0] == 1 and other[1]["code"] == 4, other
    assert "cannot be opened" in str(other[1]["msg"])


def test_a_new_shim_against_a_daemon_before_ucn2_is_retried_later_and_dels_are_spooled(
    installed: Path, tmp_path: Path
) -> None:
    # A daemon before UCN2 reads the header, finds a magic it does not know, and hangs up
    # without an answer (cni.transport of UCN1 did exactly that).
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "old.sock"))
    listener.listen(4)
    magics: list[bytes] = []

    def old_daemon() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                magics.append(conn.recv(9, socket.MSG_WAITALL)[:4])

    thread = threading.Thread(target=old_daemon)
    thread.start()
    old = {"ULTRANET_CNI_SOCKET": str(tmp_path / "old.sock")}
    try:
        add = exec_shim(
            installed, {**env("ADD", "c1", "/proc/self/ns/net"), **old}, conf(), tmp_path
        )
        delete = exec_shim(
            installed, {**env("DEL", "c1", "/proc/self/ns/net"), **old}, conf(), tmp_path
        )
    finally:
        thread.join(timeout=30)
        listener.close()
    assert magics == [b"UCN2", b"UCN2"]
    assert add[0] == 1 and add[1]["code"] == 11, add  # the runtime retries the ADD
    assert "does not read wire format UCN2" in str(add[1].get("details"))
    assert delete == (0, {})  # spooled by path (UCN1), for the new daemon to replay
    (spooled,) = (tmp_path / "spool").iterdir()
    assert spooled.read_bytes()[:4] == shim.MAGIC_V1


def test_a_daemon_that_answers_and_hangs_up_before_the_shim_returns_from_sendmsg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short request leaves whole with the descriptor; the daemon may read it, answer
    # and close before the shim's process runs again (20 ADDs on 2 cores). The shim then
    # had nothing left to send, yet sent it: a send on a socket its peer has closed is
    # EPIPE even for 0 bytes, so a pod plumbed by the daemon was reported unreachable
    # (BrokenPipeError, code 11) and the runtime deleted it.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "daemon.sock"))
    listener.listen(1)
    hung_up = threading.Event()
    answer = shim.encode_answer(0, b'{"cniVersion": "1.1.0"}\n')

    def answer_and_hang_up() -> None:
        conn, _ = listener.accept()
        with conn:
            kind, size = shim.parse_header(conn.recv(9, socket.MSG_WAITALL))
            conn.recv(size, socket.MSG_WAITALL)
            conn.sendall(answer)
        hung_up.set()

    class SlowShimSocket(socket.socket):
        def sendmsg(self, *args: Any) -> int:
            sent = super().sendmsg(*args)
            assert hung_up.wait(timeout=30)  # the shim descheduled until the daemon is done
            return sent

    class SocketModule:
        AF_UNIX, SOCK_STREAM = socket.AF_UNIX, socket.SOCK_STREAM
        SOL_SOCKET, SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
        socket = SlowShimSocket

    monkeypatch.setattr(shim, "_socket", SocketModule)
    daemon = threading.Thread(target=answer_and_hang_up)
    daemon.start()
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        request = shim.encode_request_v2({b"CNI_COMMAND": b"ADD"}, conf(), shim.FLAG_NETNS_FD)
        got = shim.exchange(listener.getsockname().encode(), request, timeout=30, fd=fd)
    finally:
        os.close(fd)
        daemon.join(timeout=30)
        listener.close()
    assert got == (0, b'{"cniVersion": "1.1.0"}\n', b"")
