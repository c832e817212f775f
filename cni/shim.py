"""The exec'd CNI plugin: forwards CNI_* and stdin to ultranet-ipamd, prints its answer.

Installed as ``/opt/cni/bin/ultranet`` by ``ultranet-cni install``, which copies this
file verbatim behind a ``#!<real python> -I -S`` line. Interpreter start-up is most of
an exec'd plugin's cost (measured by us on the 2-core test VM, Python 3.11: ``-I -S``
6 ms, ``import json`` +6.6 ms, ``import socket`` +6.5 ms), so this file imports only
what the interpreter has already loaded at start (``sys``, ``posix``) plus the C module
``_socket``, and no ``from __future__`` either (that is an import too). It must stay so:
a test runs it under ``-X importtime`` and fails on any other import.

The wire format (also used for spool files) is length-prefixed binary, every length a
4-byte big-endian unsigned integer::

    frame   = MAGIC(4) kind(1) body_len(4) body
    request = kind b"Q": [flags(1)] count(4) {key_len(4) key value_len(4) value}*count
              stdin_len(4) stdin
    answer  = kind b"A": exit_code(1) stdout_len(4) stdout stderr_len(4) stderr

MAGIC is "UCN2" (flags present; flag 1: an open descriptor of CNI_NETNS rides on the
request's first bytes as SCM_RIGHTS) or "UCN1" (no flags: the daemon opens CNI_NETNS by
path; spool files and shims before UCN2). The daemon answers in the request's MAGIC.

When the daemon cannot be reached (no socket, refused, or it hung up mid-answer):

* DEL succeeds (exit 0) after spooling the request to ``SPOOL_DIR/<id>:<ifname>.del``;
  the daemon replays spooled DELs (full teardown from prevResult, then the release)
  before it serves again. A DEL must succeed when the daemon is down, or the kubelet
  retries it forever and the pod never terminates.
* STATUS answers code 50 (not available); ADD, CHECK and GC answer code 11 (try again
  later): 50/51 are STATUS-only codes in the spec, and 11 is what runtimes retry.
* VERSION never needs the daemon: it is answered here.
"""

import _socket
import posix
import sys

MAGIC = b"UCN2"  # a request with a flags byte; the pod's netns may travel as a descriptor
MAGIC_V1 = b"UCN1"  # the first format (by path): spool files, and shims before UCN2
FLAG_NETNS_FD = 1  # the request's first sendmsg carries an open CNI_NETNS (SCM_RIGHTS)
REQUEST = b"Q"
ANSWER = b"A"
MAX_FRAME = 16 << 20
SUPPORTED = b'["0.4.0", "1.0.0", "1.1.0"]'
LATEST = b"1.1.0"
TIMEOUT_S = 120.0
# The installer rewrites the next two lines; the environment overrides them (tests).
SOCKET_PATH = b"/run/ultranet/cni.sock"
SPOOL_DIR = b"/var/lib/ultranet/cni-spool"


class WireError(ValueError):
    """A frame that is not ours, truncated, or too large."""


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _blob(data: bytes) -> bytes:
    return _u32(len(data)) + data


def frame(kind: bytes, body: bytes, magic: bytes = MAGIC_V1) -> bytes:
    if len(body) > MAX_FRAME:
        raise WireError(f"frame body of {len(body)} bytes exceeds {MAX_FRAME}")
    return magic + kind + _u32(len(body)) + body


def _request_body(env: dict[bytes, bytes], stdin: bytes) -> bytes:
    parts = [_u32(len(env))]
    for key, value in env.items():
        parts.append(_blob(key))
        parts.append(_blob(value))
    parts.append(_blob(stdin))
    return b"".join(parts)


def encode_request(env: dict[bytes, bytes], stdin: bytes) -> bytes:
    """A UCN1 request (by path): what spool files hold, and what a shim before UCN2 sent."""
    return frame(REQUEST, _request_body(env, stdin))


def encode_request_v2(env: dict[bytes, bytes], stdin: bytes, flags: int) -> bytes:
    """A UCN2 request: ``flags`` (FLAG_NETNS_FD) then the UCN1 body."""
    return frame(REQUEST, bytes([flags]) + _request_body(env, stdin), MAGIC)


def encode_answer(code: int, stdout: bytes, stderr: bytes = b"", magic: bytes = MAGIC) -> bytes:
    if not 0 <= code <= 255:
        raise WireError(f"exit code {code} is not 0..255")
    return frame(ANSWER, bytes([code]) + _blob(stdout) + _blob(stderr), magic)


def parse_header_magic(header: bytes) -> tuple[bytes, bytes, int]:
    """(magic, kind, body length) of a 9-byte frame header, UCN1 or UCN2."""
    if len(header) != 9 or header[:4] not in (MAGIC, MAGIC_V1):
        raise WireError("not an ultranet CNI frame (bad magic)")
    size = int.from_bytes(header[5:9], "big")
    if size > MAX_FRAME:
        raise WireError(f"frame body of {size} bytes exceeds {MAX_FRAME}")
    return header[:4], header[4:5], size


def parse_header(header: bytes) -> tuple[bytes, int]:
    """(kind, body length) of a 9-byte frame header."""
    _, kind, size = parse_header_magic(header)
    return kind, size


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def take(self, size: int) -> bytes:
        end = self.at + size
        if end > len(self.data):
            raise WireError("frame body is truncated")
        chunk = self.data[self.at : end]
        self.at = end
        return chunk

    def blob(self) -> bytes:
        return self.take(self.u32())

    def done(self) -> None:
        if self.at != len(self.data):
            raise WireError(f"{len(self.data) - self.at} trailing bytes in frame body")


def decode_request(body: bytes) -> tuple[dict[bytes, bytes], bytes]:
    reader = _Reader(body)
    env = {}
    for _ in range(reader.u32()):
        key = reader.blob()
        env[key] = reader.blob()
    stdin = reader.blob()
    reader.done()
    return env, stdin


def decode_request_v2(body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """(flags, env, stdin) of a UCN2 request body."""
    if not body:
        raise WireError("frame body is truncated")
    env, stdin = decode_request(body[1:])
    return body[0], env, stdin


def decode_answer(body: bytes) -> tuple[int, bytes, bytes]:
    reader = _Reader(body)
    code = reader.take(1)[0]
    stdout, stderr = reader.blob(), reader.blob()
    reader.done()
    return code, stdout, stderr


def decode_frame(data: bytes, kind: bytes) -> bytes:
    """The body of a whole frame of ``kind`` (spool files)."""
    got, size = parse_header(data[:9])
    if got != kind:
        raise WireError(f"frame kind {got!r}, expected {kind!r}")
    if len(data) != 9 + size:
        raise WireError("frame length does not match its header")
    return data[9:]


# -- the exec'd program ----------------------------------------------------------------------


def cni_version(stdin: bytes) -> bytes:
    """The config's ``cniVersion`` by a byte scan (no json here), or LATEST."""
    at = stdin.find(b'"cniVersion"')
    if at < 0:
        return LATEST
    rest = stdin[at + 12 :].lstrip(b" \t\r\n")
    if not rest.startswith(b":"):
        return LATEST
    rest = rest[1:].lstrip(b" \t\r\n")
    end = rest.find(b'"', 1)
    value = rest[1:end] if rest.startswith(b'"') and end > 0 else b""
    ok = value and all(c in b"0123456789." for c in value)
    return value if ok else LATEST


def _quote(text: str) -> bytes:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return b'"' + "".join(out).encode() + b'"'


def error_json(version: bytes, code: int, msg: str, details: str = "") -> bytes:
    body = b'{"cniVersion": "' + version + b'", "code": ' + str(code).encode()
    body += b', "msg": ' + _quote(msg)
    if details:
        body += b', "details": ' + _quote(details)
    return body + b"}\n"


def exchange(
    path: bytes, request: bytes, timeout: float = TIMEOUT_S, fd: int = -1
) -> tuple[int, bytes, bytes]:
    """Send one request frame (``fd``, if not -1, with its first bytes), read one answer;
    OSError if the daemon is not there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        if fd >= 0:
            rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]
            sent = sock.sendmsg([request], rights)
            # Only what is left: sendall(b"") still calls send(2), which is EPIPE once the
            # daemon has read the whole request, answered and closed (the answer waits).
            if sent < len(request):
                sock.sendall(request[sent:])
        else:
            sock.sendall(request)
        kind, size = parse_header(_recv_exactly(sock, 9))
        if kind != ANSWER:
            raise WireError(f"frame kind {kind!r}, expected an answer")
        return decode_answer(_recv_exactly(sock, size))
    finally:
        sock.close()


def _recv_exactly(sock: _socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        try:
            chunk = sock.recv(min(size, 1 << 20))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise ConnectionResetError(
                "ultranet-ipamd closed the connection without a whole answer: it stopped, "
                "or it is older than this shim and does not read wire format UCN2"
            )
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def spool_name(env: dict[bytes, bytes]) -> bytes:
    """``<container id>:<ifname>.del``; ':' is in neither, so names cannot collide."""
    cid, ifname = env.get(b"CNI_CONTAINERID", b""), env.get(b"CNI_IFNAME", b"")
    for value in (cid, ifname):
        if not value or b"/" in value or b"\0" in value or value.startswith(b"."):
            raise ValueError(f"cannot spool a DEL for {cid!r}/{ifname!r}")
    return cid + b":" + ifname + b".del"


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[posix.write(fd, view) :]
        except BlockingIOError:  # a runtime's non-blocking pipe, full: wait for room
            posix.set_blocking(fd, True)


def spool(directory: bytes, env: dict[bytes, bytes], stdin: bytes) -> bytes:
    """Write the request atomically (tmp + fsync + rename); returns the file's path."""
    try:
        posix.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    final = directory + b"/" + spool_name(env)
    tmp = final + b".tmp" + str(posix.getpid()).encode()
    fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC, 0o600)
    try:
        write_all(fd, encode_request(env, stdin))
        posix.fsync(fd)
    finally:
        posix.close(fd)
    posix.rename(tmp, final)
    return final


def daemon_down(env: dict[bytes, bytes], stdin: bytes, why: str) -> tuple[int, bytes]:
    command = env.get(b"CNI_COMMAND", b"")
    version = cni_version(stdin)
    where = (posix.environ.get(b"ULTRANET_CNI_SOCKET") or SOCKET_PATH).decode(errors="replace")
    msg = f"ultranet-ipamd is not reachable at {where}"
    if command == b"DEL":
        directory = posix.environ.get(b"ULTRANET_CNI_SPOOL") or SPOOL_DIR
        try:
            spool(directory, env, stdin)
        except (OSError, ValueError) as err:
            return 1, error_json(version, 11, msg + "; cannot spool the DEL", f"{why}; {err}")
        return 0, b""
    if command == b"STATUS":
        return 1, error_json(version, 50, msg, why)
    return 1, error_json(version, 11, msg, why)


def run(environ: dict[bytes, bytes], stdin: bytes) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr) of one invocation."""
    env = {k: v for k, v in environ.items() if k.startswith(b"CNI_")}
    if env.get(b"CNI_COMMAND") == b"VERSION":
        body = b'{"cniVersion": "' + cni_version(stdin) + b'", "supportedVersions": '
        return 0, body + SUPPORTED + b"}\n", b""
    path = environ.get(b"ULTRANET_CNI_SOCKET") or SOCKET_PATH
    # The daemon may not see the runtime's mount namespace: the pod's netns goes to it as
    # a descriptor opened here, where the runtime's path is valid.
    netns = env.get(b"CNI_NETNS", b"")
    fd, flags = -1, 0
    if netns and env.get(b"CNI_COMMAND") in (b"ADD", b"CHECK", b"DEL"):
        try:
            fd = posix.open(netns, posix.O_RDONLY | posix.O_CLOEXEC)
        except OSError as err:
            if env.get(b"CNI_COMMAND") != b"DEL":  # a DEL goes on: the netns may be gone
                shown = _quote(netns.decode(errors="replace")).decode()
                gone = isinstance(err, FileNotFoundError)
                msg = f"CNI_NETNS={shown}: " + ("gone" if gone else "cannot be opened")
                return 1, error_json(cni_version(stdin), 3 if gone else 4, msg, str(err)), b""
        else:
            flags = FLAG_NETNS_FD
    try:
        return exchange(path, encode_request_v2(env, stdin, flags), fd=fd)
    except WireError as err:
        return 1, error_json(cni_version(stdin), 5, "bad answer from ultranet-ipamd", str(err)), b""
    except OSError as err:
        code, out = daemon_down(env, stdin, f"{type(err).__name__}: {err}")
        return code, out, b""
    finally:
        if fd >= 0:
            posix.close(fd)


def main() -> int:
    try:
        stdin = sys.stdin.buffer.read()
    except (OSError, ValueError, AttributeError) as err:  # closed, a directory, ...
        code, stdout, stderr = 1, error_json(LATEST, 5, "cannot read stdin", str(err)), b""
    else:
        code, stdout, stderr = run(posix.environ, stdin)
    write_all(1, stdout)  # first: the answer must not depend on stderr being writable
    if stderr:
        try:
            write_all(2, stderr)
        except OSError:  # diagnostics only; the answer is out
            pass
    return code


if __name__ == "__main__":
    # Everything went out through posix.write, unbuffered, and nothing else needs
    # finalising: skipping the interpreter's teardown saves a quarter of an exec's
    # instructions (valgrind: 20.9M for `-IS -c pass`, 15.7M ending in posix._exit).
    posix._exit(main())
