"""CNI spec 1.1.0 inputs: the ``CNI_*`` environment, ``CNI_ARGS``, the network config.

Everything here is pure: mappings and bytes in, frozen values or ``CniError`` out, so
the handler, the shim's tests and the installer share one reading of the spec (the
rules below are from ``SPEC.md`` in ``containernetworking/cni``, tag ``spec-v1.1.0``).

* Versions: results can be rendered as 0.4.0, 1.0.0 and 1.1.0; any other
  ``cniVersion`` is code 1 ("incompatible CNI versions"). A conflist's ``cniVersions``
  (1.1.0) lists what the file can be read as; the highest we support wins.
* Environment (§"Parameters"): ADD and CHECK need CNI_CONTAINERID, CNI_NETNS and
  CNI_IFNAME; DEL needs CNI_CONTAINERID and CNI_IFNAME (the netns may be gone); STATUS,
  GC and VERSION need none. A missing variable is code 4 naming all that are missing.
* ``CNI_ARGS`` is ``K=V;K=V``, read by key, never by position (CRI-O and containerd
  order them differently); an empty value counts as absent.
* Config: JSON object with ``cniVersion``, ``name``, ``type``; ours adds ``mtu`` and
  ``vethPrefix`` (the VPC CNI's names); unknown keys are ignored as the spec says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from cni.errors import CniError, ErrorCode
from cni.result import Result, parse_result

__all__ = [
    "ANNOTATIONS_CAPABILITY",
    "LATEST_VERSION",
    "MULTI_NIC_ANNOTATION",
    "MULTI_NIC_VALUE",
    "NETNS_FD",
    "NO_NETNS_FD",
    "SUPPORTED_VERSIONS",
    "Attachment",
    "CniEnv",
    "Command",
    "NetConf",
    "PodArgs",
    "error_json",
    "parse_cni_args",
    "parse_conf",
    "declared_version",
    "parse_env",
    "pick_version",
    "version_json",
]

# Set by cni.transport, never by a shim (it forwards only CNI_*): the descriptor of the
# pod's netns the shim sent (UCN2), or NO_NETNS_FD when the shim could not open the path.
# Absent (a UCN1 shim, a spooled DEL, an in-process caller): the path is opened.
NETNS_FD = "ultranet.netns-fd"
NO_NETNS_FD = "none"
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
MULTI_NIC_ANNOTATION = "k8s.amazonaws.com/nicConfig"
MULTI_NIC_VALUE = "multi-nic-attachment"
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
LEGACY_ATTACHMENTS = "cni.dev/attachments"  # the 1.1.0 tag's spelling; libcni >= 1.2 sends both
MTU_MIN, MTU_MAX = 576, 9001  # the VPC CNI's AWS_VPC_ENI_MTU range
DEFAULT_MTU = 9001
DEFAULT_VETH_PREFIX = "eni"
VETH_PREFIX_MAX = 4  # the VPC CNI's limit: prefix + 11 hex digits fit IFNAMSIZ - 1
_VETH_PREFIX = re.compile(r"[a-z][a-z0-9]{0,3}")
_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")


class Command(Enum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"
    VERSION = "VERSION"
    STATUS = "STATUS"
    GC = "GC"


_REQUIRED = {
    Command.ADD: ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    Command.CHECK: ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    Command.DEL: ("CNI_CONTAINERID", "CNI_IFNAME"),
    Command.VERSION: (),
    Command.STATUS: (),
    Command.GC: (),
}


@dataclass(frozen=True, slots=True)
class PodArgs:
    """The Kubernetes keys of CNI_ARGS (absent ones are "")."""

    namespace: str = ""
    name: str = ""
    infra_container_id: str = ""
    uid: str = ""


@dataclass(frozen=True, slots=True)
class CniEnv:
    command: Command
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    path: str = ""
    # From the transport (NETNS_FD): None, open ``netns`` by path; -1, the shim could not
    # open it (treat the namespace as gone); else a descriptor the transport owns.
    netns_fd: int | None = None

    @property
    def pod(self) -> PodArgs:
        get = self.args.get
        return PodArgs(
            get("K8S_POD_NAMESPACE", ""),
            get("K8S_POD_NAME", ""),
            get("K8S_POD_INFRA_CONTAINER_ID", ""),
            get("K8S_POD_UID", ""),
        )


@dataclass(frozen=True, slots=True)
class Attachment:
    """One entry of ``cni.dev/valid-attachments``."""

    container_id: str
    ifname: str


@dataclass(frozen=True, slots=True)
class NetConf:
    cni_version: str
    name: str
    type: str
    mtu: int = DEFAULT_MTU
    veth_prefix: str = DEFAULT_VETH_PREFIX
    runtime_config: Mapping[str, Any] = field(default_factory=dict)
    prev_raw: Mapping[str, Any] | None = None  # prevResult as received, for pass-through
    prev_result: Result | None = None
    valid_attachments: tuple[Attachment, ...] | None = None  # GC; None: the key is absent

    def pod_annotations(self) -> Mapping[str, str]:
        value = self.runtime_config.get(ANNOTATIONS_CAPABILITY) or {}
        if not isinstance(value, dict):
            raise CniError(
                ErrorCode.INVALID_CONFIG,
                f"runtimeConfig.{ANNOTATIONS_CAPABILITY}={value!r}: must be an object",
            )
        return {str(k): str(v) for k, v in value.items()}

    def wants_multi_nic(self) -> bool:
        return self.pod_annotations().get(MULTI_NIC_ANNOTATION) == MULTI_NIC_VALUE


# -- environment -------------------------------------------------------------------------


def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K=V`` by key. Each pair needs exactly one ``=`` (as ``types.LoadArgs``)."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key or "=" in value:
            raise CniError(ErrorCode.INVALID_ENV, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def parse_env(env: Mapping[str, str]) -> CniEnv:
    raw = env.get("CNI_COMMAND", "")
    if not raw:
        raise CniError(ErrorCode.INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    try:
        command = Command(raw)
    except ValueError:
        known = ", ".join(c.value for c in Command)
        raise CniError(
            ErrorCode.INVALID_ENV, f"CNI_COMMAND={raw!r}: unknown command (one of {known})"
        ) from None
    missing = [name for name in _REQUIRED[command] if not env.get(name)]
    if missing:
        names = ",".join(missing)
        raise CniError(ErrorCode.INVALID_ENV, f"required env variables [{names}] missing")
    netns = env.get("CNI_NETNS", "")
    if netns and command in (Command.ADD, Command.CHECK, Command.DEL) and netns[0] != "/":
        raise CniError(ErrorCode.INVALID_ENV, f"CNI_NETNS={netns!r}: must be an absolute path")
    fd_text = env.get(NETNS_FD)
    netns_fd = None
    if fd_text is not None:
        netns_fd = -1 if fd_text == NO_NETNS_FD else int(fd_text)
    return CniEnv(
        command,
        env.get("CNI_CONTAINERID", ""),
        netns,
        env.get("CNI_IFNAME", ""),
        parse_cni_args(env.get("CNI_ARGS", "")),
        env.get("CNI_PATH", ""),
        netns_fd,
    )


# -- versions ------------------------------------------------------------------------------


def pick_version(cni_version: object, cni_versions: object) -> str:
    """The version to speak. ``cniVersion`` when given: it is the runtime's choice, and a
    result must carry the input's version. Otherwise the highest supported entry of
    ``cniVersions`` (1.1.0 §"Configuration format": the runtime picks the highest it
    supports). Code 1 if the version is not one we speak."""
    if cni_version is not None and cni_version != "":
        if not isinstance(cni_version, str):
            raise CniError(
                ErrorCode.INVALID_CONFIG, f"cniVersion={cni_version!r}: must be a string"
            )
        if cni_version not in SUPPORTED_VERSIONS:
            raise _incompatible(f"cniVersion={cni_version!r}")
        return cni_version
    if cni_versions is None:
        raise CniError(ErrorCode.INVALID_CONFIG, "cniVersion: missing from the network config")
    if not isinstance(cni_versions, list) or not all(isinstance(v, str) for v in cni_versions):
        raise CniError(
            ErrorCode.INVALID_CONFIG, f"cniVersions={cni_versions!r}: must be a list of strings"
        )
    usable: list[str] = [v for v in cni_versions if v in SUPPORTED_VERSIONS]
    if not usable:
        raise _incompatible(f"cniVersions={cni_versions!r}")
    return max(usable, key=lambda v: tuple(int(x) for x in v.split(".")))


def _incompatible(what: str) -> CniError:
    return CniError(
        ErrorCode.INCOMPATIBLE_VERSION,
        "incompatible CNI versions",
        f"{what}; this plugin supports {', '.join(SUPPORTED_VERSIONS)}",
    )


# -- network configuration ---------------------------------------------------------------


def _decode(stdin: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(stdin)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CniError(
            ErrorCode.DECODE_FAILURE, "network config on stdin is not JSON", str(err)
        ) from err
    if not isinstance(obj, dict):
        raise CniError(ErrorCode.DECODE_FAILURE, "network config on stdin is not a JSON object")
    return obj


def _mtu(value: object) -> int:
    # The VPC CNI's conflist writes "mtu": "9001" (a string); accept both spellings.
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if not text.isdigit() or not MTU_MIN <= int(text) <= MTU_MAX:
        raise CniError(
            ErrorCode.INVALID_CONFIG, f"mtu={value!r}: must be an integer {MTU_MIN}..{MTU_MAX}"
        )
    return int(text)


def _veth_prefix(value: object) -> str:
    if not isinstance(value, str) or _VETH_PREFIX.fullmatch(value) is None:
        raise CniError(
            ErrorCode.INVALID_CONFIG,
            f"vethPrefix={value!r}: must be 1..{VETH_PREFIX_MAX} lower-case letters/digits, "
            "starting with a letter",
        )
    return value


def _attachments(obj: Mapping[str, Any]) -> tuple[Attachment, ...] | None:
    key = VALID_ATTACHMENTS if VALID_ATTACHMENTS in obj else LEGACY_ATTACHMENTS
    if key not in obj:
        return None
    raw = obj[key]
    if not isinstance(raw, list):
        raise CniError(ErrorCode.INVALID_CONFIG, f"{key}={raw!r}: must be a list")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) and item.get(k) for k in ("containerID", "ifname")
        ):
            raise CniError(
                ErrorCode.INVALID_CONFIG,
                f"{key}[{i}]={item!r}: needs string containerID and ifname",
            )
        out.append(Attachment(item["containerID"], item["ifname"]))
    return tuple(out)


def _required_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise CniError(ErrorCode.INVALID_CONFIG, f"{key}={value!r}: must be a non-empty string")
    return value


def parse_conf(stdin: bytes, command: Command) -> NetConf:
    """The per-plugin config the runtime derived from the conflist (CNI spec §"Derived
    execution configuration")."""
    obj = _decode(stdin)
    version = pick_version(obj.get("cniVersion"), obj.get("cniVersions"))
    if command is Command.VERSION:
        return NetConf(version, "", "")
    name, type_ = _required_str(obj, "name"), _required_str(obj, "type")
    if "ipam" in obj:
        raise CniError(
            ErrorCode.UNSUPPORTED_FIELD,
            f"ipam={json.dumps(obj['ipam'])}: unsupported, ultranet-ipamd assigns the "
            "addresses; remove the ipam section",
        )
    runtime = obj.get("runtimeConfig") or {}
    if not isinstance(runtime, dict):
        raise CniError(ErrorCode.INVALID_CONFIG, f"runtimeConfig={runtime!r}: must be an object")
    prev_raw = obj.get("prevResult")
    prev = None
    if prev_raw is not None:
        if not isinstance(prev_raw, dict):
            raise CniError(ErrorCode.DECODE_FAILURE, f"prevResult={prev_raw!r}: not an object")
        prev = parse_result(prev_raw)
    return NetConf(
        version,
        name,
        type_,
        _mtu(obj.get("mtu", DEFAULT_MTU)),
        _veth_prefix(obj.get("vethPrefix", DEFAULT_VETH_PREFIX)),
        runtime,
        prev_raw,
        prev,
        _attachments(obj),
    )


# -- output ----------------------------------------------------------------------------------


def declared_version(stdin: bytes) -> str:
    """The version an error answers in when the config could not be read whole (a bad
    ``CNI_*`` variable, a bad ``mtu``, ...): the config's own, as ``pick_version`` reads it,
    if that much of it can be read and is one we speak; else the latest. The spec's
    error carries the config's ``cniVersion``, and a 0.4.0 runtime may not read 1.1.0."""
    try:
        obj = json.loads(stdin)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return LATEST_VERSION
    if not isinstance(obj, dict):
        return LATEST_VERSION
    try:
        return pick_version(obj.get("cniVersion"), obj.get("cniVersions"))
    except CniError:
        return LATEST_VERSION


def error_json(err: CniError, version: str = LATEST_VERSION) -> bytes:
    """CNI spec §"Error": ``{"cniVersion", "code", "msg", "details"}`` (on stdout)."""
    body: dict[str, Any] = {"cniVersion": version, "code": int(err.code), "msg": err.msg}
    if err.details:
        body["details"] = err.details
    return json.dumps(body).encode() + b"\n"


def version_json(stdin: bytes) -> bytes:
    """VERSION's answer. Its stdin "may be ignored" (§"VERSION"); we echo a well-formed
    ``cniVersion`` and otherwise answer with the latest we speak."""
    version = LATEST_VERSION
    try:
        obj = json.loads(stdin) if stdin.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        obj = {}
    asked = obj.get("cniVersion") if isinstance(obj, dict) else None
    if isinstance(asked, str) and _VERSION.fullmatch(asked):
        version = asked
    body = {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
    return json.dumps(body).encode() + b"\n"


def render(obj: Mapping[str, Any] | Sequence[Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"
