"""Configuration of ``ultranet-ipamd``, parsed once into a frozen :class:`IpamdConfig`.

The knobs the VPC CNI's ipamd also has keep its environment names and meanings (users
know them and copy their ``aws-node`` env; the VPC CNI's ``README.md`` documents them, in
``aws/amazon-vpc-cni-k8s``); ours
are named in the same style with an ``ULTRANET_`` prefix. Sources, later winning:
built-in defaults, an optional JSON or YAML file whose keys are the same upper-case names,
then the environment. This module is the only one that reads ``os.environ``.

Parsing is strict and every error is a ``ConfigError(knob, value, reason)``:

* booleans take exactly what Go's ``strconv.ParseBool`` takes (``1 t T TRUE true True``
  and ``0 f F FALSE false False``);
* integers are base 10 with an optional sign and nothing else (``strconv.Atoi``);
* negative numbers are refused, except ``MAX_ENI=-1``;
* an empty value (``""`` or a null in the file) counts as not given;
* unknown keys in the file are refused with a did-you-mean suggestion; unknown
  environment variables are ignored, since the environment holds many.

Where we deliberately differ from the VPC CNI:

* ``ENABLE_PREFIX_DELEGATION``: ultranet runs in prefix mode only, so only unset or true
  is accepted (the VPC CNI defaults to false and falls back to secondary IPs off Nitro).
* ``WARM_PREFIX_TARGET`` defaults to 1, what the shipped ``aws-k8s-cni.yaml`` sets (the
  code default is 0). ``WARM_IP_TARGET`` / ``MINIMUM_IP_TARGET`` (0 or unset = unset)
  override it exactly as there; :mod:`ipam.warm` holds the arithmetic.
* ``WARM_ENI_TARGET`` is accepted and validated but ignored, as the VPC CNI ignores it in
  prefix mode; :meth:`IpamdConfig.effective` says so.
* Invalid values are errors. The VPC CNI logs and falls back to a default (a ``MAX_ENI``
  below 1 or a non-number silently means the instance limit); here ``MAX_ENI=0`` is
  refused because the primary ENI always exists.
* ``MAX_PODS`` is ours: unset, the daemon derives it (the VPC CNI reads the node's pod
  capacity).
* ``ENABLE_IPv6=true`` (with ``ENABLE_IPv4=false`` and ``ENABLE_PREFIX_DELEGATION=true``
  given explicitly, as the VPC CNI's ``isConfigValid`` in ``pkg/ipamd/ipamd.go`` demands:
  single stack, prefix delegation) is checked the same way, but refused at load, not at
  start. The warm-pool knobs and ``ENABLE_MULTI_NIC`` have no effect in IPv6 mode (one
  /80 on the primary ENI); :meth:`IpamdConfig.effective` says so.
* The egress knobs (``AWS_VPC_K8S_CNI_EXTERNALSNAT``, ``..._EXCLUDE_SNAT_CIDRS``,
  ``..._RANDOMIZESNAT``, ``..._CONNMARK``, ``AWS_VPC_CNI_NODE_PORT_SUPPORT``,
  ``AWS_VPC_K8S_CNI_VETHPREFIX``; :mod:`ipam.egress`) take the VPC CNI's values, but a
  value it would log and replace by its default (a CIDR that does not parse, an IPv6 CIDR,
  an unknown randomization, a mark out of 1..0xffffffff) is refused here.
* The metrics endpoint binds to loopback by default (the VPC CNI serves ``:61678`` on
  every interface). ``ULTRANET_EC2_RATE``/``ULTRANET_EC2_BURST`` are a client-side token
  bucket the VPC CNI does not have. ``ULTRANET_SUBNET_TAG`` makes the VPC CNI's
  hard-coded discovery tag configurable.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address, ip_network
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from cni.spec import DEFAULT_MTU, DEFAULT_VETH_PREFIX, MTU_MAX, MTU_MIN, VETH_PREFIX_MAX
from ipam.errors import ConfigError
from ipam.warm import WarmTargets

Source = Literal["default", "file", "env"]
FILE_FIELD = "config file"  # the ConfigError field for errors about the file itself
FILE_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


@dataclass(frozen=True, slots=True)
class BindAddress:
    """An IP literal and a port to listen on (port 0 lets the kernel choose)."""

    host: IPv4Address | IPv6Address
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class IpamdConfig:
    """Every knob in force; the defaults here are the daemon's defaults."""

    warm_prefix_target: int = 1
    warm_ip_target: int | None = None
    minimum_ip_target: int | None = None
    max_eni: int | None = None  # None: the instance limit (MAX_ENI=-1)
    ip_cooldown_period: int = 30  # seconds
    enable_multi_nic: bool = False
    enable_ipv4: bool = True  # single stack, as in the VPC CNI: exactly one of the two
    enable_ipv6: bool = False
    max_pods: int | None = None  # None: derived by the daemon
    warm_eni_target: int | None = None  # accepted and ignored (prefix mode)
    socket: Path = Path("/run/ultranet/ipamd.sock")
    cni_socket: Path = Path("/run/ultranet/cni.sock")  # where the CNI shim connects
    cni_spool: Path = Path("/var/lib/ultranet/cni-spool")  # DELs the shim kept while we were down
    # Where the conflist goes once the warm pool is first met (None: not written here).
    # Until a conflist exists the kubelet reports the node NetworkNotReady, so no pod is
    # scheduled onto a node whose daemon cannot yet give it an address.
    cni_conf_dir: Path | None = None
    pod_mtu: int = DEFAULT_MTU  # the conflist's "mtu": the pods' veth MTU
    state_dir: Path = Path("/var/lib/ultranet")
    metrics_addr: BindAddress = BindAddress(IPv4Address("127.0.0.1"), 61678)
    introspection_addr: BindAddress = BindAddress(IPv4Address("127.0.0.1"), 61679)
    imds_endpoint: str = "http://169.254.169.254"
    ec2_endpoint: str | None = None  # None: the SDK's regional endpoint
    ec2_rate: float = 5.0  # EC2 calls per second, refilled into the bucket
    ec2_burst: int = 10  # bucket size
    subnet_tag: str = "kubernetes.io/role/cni"
    # Seconds between sweeps for what pods left without a DEL that finished (stray
    # veths and rules, allocations whose veths are gone); 0: only at start.
    stray_sweep_interval: int = 60
    # Egress (ipam/egress.py), the VPC CNI's knobs and defaults.
    external_snat: bool = False
    exclude_snat_cidrs: tuple[IPv4Network, ...] = ()
    randomize_snat: Literal["prng", "hashrandom", "none"] = "prng"
    connmark: int = 0x80
    node_port_support: bool = True
    veth_prefix: str = DEFAULT_VETH_PREFIX
    # IPv4 egress for IPv6 pods (the VPC CNI's ENABLE_V4_EGRESS): each pod also gets a
    # node-local IPv4 from this range, which the node SNATs to its own primary IPv4.
    enable_v4_egress: bool = True
    v4_egress_range: IPv4Network = IPv4Network("169.254.172.0/22")
    sources: Mapping[str, Source] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    @property
    def ipv6(self) -> bool:
        """IPv6 prefix mode: pods get /128s from the primary ENI's /80."""
        return self.enable_ipv6

    def warm_targets(self) -> WarmTargets:
        """The warm-pool knobs for :func:`ipam.warm.plan` on network card 0."""
        return WarmTargets(
            self.warm_prefix_target, self.warm_ip_target, self.minimum_ip_target, self.max_pods
        )

    def effective(self) -> dict[str, object]:
        """Each knob's value in force (in its environment form) and where it came from.

        ``{"WARM_PREFIX_TARGET": {"value": 1, "source": "default"}, ...}``; an entry also
        has ``"ignored"`` with the reason when the value has no effect.
        """
        out: dict[str, object] = {}
        for knob in KNOBS.values():
            value = getattr(self, knob.field) if knob.field else True
            entry: dict[str, object] = {
                "value": knob.show(value),
                "source": self.sources.get(knob.env, "default"),
            }
            note = self._ignored(knob.env)
            if note:
                entry["ignored"] = note
            out[knob.env] = entry
        return out

    def _ignored(self, env: str) -> str | None:
        if env == "WARM_ENI_TARGET":
            return "not used in prefix-delegation mode, the only mode ultranet has"
        if self.ipv6 and env in _IPV4_POOL_KNOBS:
            return "not used in IPv6 mode: pods take /128s from one /80, no warm pool"
        if not self.ipv6 and env in _V4_EGRESS_KNOBS:
            return "IPv6 mode only: IPv4 pods have their own IPv4 addresses"
        if env == "ULTRANET_V4_EGRESS_RANGE" and not self.enable_v4_egress:
            return "ENABLE_V4_EGRESS is false"
        if env == "WARM_PREFIX_TARGET" and self.warm_targets().ip_targets_set:
            return "overridden by WARM_IP_TARGET/MINIMUM_IP_TARGET"
        return None


_IPV4_POOL_KNOBS = frozenset(
    {"WARM_PREFIX_TARGET", "WARM_IP_TARGET", "MINIMUM_IP_TARGET", "MAX_ENI", "ENABLE_MULTI_NIC"}
)
_V4_EGRESS_KNOBS = frozenset({"ENABLE_V4_EGRESS", "ULTRANET_V4_EGRESS_RANGE"})


# -- parsers: (knob, text) -> value; text is never empty -------------------------------

_INT = re.compile(r"[+-]?[0-9]+")  # strconv.Atoi's syntax, ASCII digits only
_PORT = re.compile(r"[0-9]{1,5}")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # strconv.ParseBool
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _int(env: str, text: str, minimum: int = 0) -> int:
    value = _integer(env, text)
    if value < minimum:
        why = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise ConfigError(env, text, why)
    return value


def _integer(env: str, text: str) -> int:
    if not _INT.fullmatch(text):
        raise ConfigError(env, text, "not a base-10 integer")
    try:
        return int(text)
    except ValueError:  # longer than Python's int-conversion digit limit
        raise ConfigError(env, text, "integer too large") from None


def _count(env: str, text: str) -> int:
    return _int(env, text)


def _positive(env: str, text: str) -> int:
    return _int(env, text, minimum=1)


def _ip_target(env: str, text: str) -> int | None:
    return _int(env, text) or None  # 0 means unset, as in the VPC CNI


def _max_eni(env: str, text: str) -> int | None:
    value = _integer(env, text)
    if value == -1:
        return None
    if value < 1:
        raise ConfigError(env, text, "must be at least 1 (the primary ENI), or -1 for the limit")
    return value


def _bool(env: str, text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(env, text, "not a boolean (true/false, 1/0, t/f as strconv.ParseBool)")


def _prefix_delegation(env: str, text: str) -> bool:
    if not _bool(env, text):
        raise ConfigError(
            env,
            text,
            "ultranet-ipamd runs in prefix-delegation mode only: it hands out addresses from"
            " /28 prefixes (one EC2 call per 16 addresses, not per address); unset it or set"
            " it to true, and run on a Nitro instance",
        )
    return True


def _abs_path(env: str, text: str) -> Path:
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(env, text, "must be an absolute path")
    return path


def _mtu(env: str, text: str) -> int:
    value = _integer(env, text)
    if not MTU_MIN <= value <= MTU_MAX:
        raise ConfigError(env, text, f"must be {MTU_MIN}..{MTU_MAX}, as in the VPC CNI")
    return value


def _socket_path(env: str, text: str) -> Path:
    path = _abs_path(env, text)
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ConfigError(env, text, f"longer than the {UNIX_PATH_MAX} bytes of a unix socket")
    return path


def _bind_address(env: str, text: str) -> BindAddress:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError(env, text, "an IPv6 host needs brackets: [::1]:61678")
    if not sep:
        raise ConfigError(env, text, "expected HOST:PORT, e.g. 127.0.0.1:61678")
    try:
        address = ip_address(host)
    except ValueError:
        raise ConfigError(env, text, f"host {host!r} is not an IP address") from None
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ConfigError(env, text, f"port {port!r} is not a number in 0-65535")
    return BindAddress(address, int(port))


def _url(env: str, text: str) -> str:
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises on a bad port
    except ValueError as exc:
        raise ConfigError(env, text, f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(env, text, "expected an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ConfigError(env, text, "must not have a query or fragment")
    return text.rstrip("/")


def _rate(env: str, text: str) -> float:
    if not _DECIMAL.fullmatch(text):
        raise ConfigError(env, text, "not a decimal number of calls per second")
    value = float(text)
    if value <= 0:
        raise ConfigError(env, text, "must be greater than 0")
    return value


def _tag_key(env: str, text: str) -> str:
    if text != text.strip() or len(text) > 128:
        raise ConfigError(env, text, "an EC2 tag key: 1-128 characters, no edge whitespace")
    return text


_CONNMARK = re.compile(  # strconv.ParseInt(s, 0, 64)'s bases, without its underscores
    r"[+-]?(?:0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|0[0-7]*|[1-9][0-9]*)"
)
_VETH_PREFIX = re.compile(rf"[a-z][a-z0-9]{{0,{VETH_PREFIX_MAX - 1}}}")
# Host interfaces a `<prefix>+` match would take for pod veths (the VPC CNI refuses them).
_RESERVED_VETH_PREFIXES = frozenset({"eth", "lo", "vlan"})


def _ipv4_cidrs(env: str, text: str) -> tuple[IPv4Network, ...]:
    out: list[IPv4Network] = []
    for item in text.split(","):
        item = item.strip()
        try:
            if "/" not in item:
                raise ValueError(item)
            # Host bits are masked off, as Go's net.ParseCIDR (the VPC CNI's) does.
            network = ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(env, text, f"{item!r} is not an IPv4 CIDR like 10.1.0.0/16") from None
        if not isinstance(network, IPv4Network):
            raise ConfigError(env, text, f"{item} is IPv6: the list takes IPv4 CIDRs only")
        out.append(network)
    return tuple(dict.fromkeys(out))


def _v4_egress_range(env: str, text: str) -> IPv4Network:
    try:
        network = IPv4Network(text)  # strict: host bits set are a typo, not a range
    except ValueError as err:
        raise ConfigError(env, text, f"not an IPv4 CIDR like 169.254.172.0/22: {err}") from None
    if network.prefixlen > 30:
        raise ConfigError(env, text, "too small: a gateway and pod addresses need a /30 or more")
    return network


def _randomize_snat(env: str, text: str) -> str:
    if text not in ("prng", "hashrandom", "none"):
        raise ConfigError(
            env, text, "expected prng (--random-fully), hashrandom (--random) or none"
        )
    return text


def _connmark(env: str, text: str) -> int:
    if not _CONNMARK.fullmatch(text):
        raise ConfigError(env, text, "not an integer (decimal, 0x hex, 0o or 0 octal, 0b)")
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    if digits[:2].lower() in ("0x", "0o", "0b"):
        value = int(digits, 0)
    elif digits.startswith("0") and len(digits) > 1:
        value = int(digits, 8)
    else:
        value = int(digits)
    value *= sign
    if not 0 < value <= 0xFFFFFFFF:
        raise ConfigError(env, text, "must be 1..0xffffffff (a fwmark); the default is 0x80")
    return value


def _veth_prefix(env: str, text: str) -> str:
    if not _VETH_PREFIX.fullmatch(text):
        raise ConfigError(
            env, text, f"must be 1..{VETH_PREFIX_MAX} lower-case letters/digits, a letter first"
        )
    if text in _RESERVED_VETH_PREFIXES:
        raise ConfigError(env, text, "would match the host's own interfaces (eth, lo, vlan)")
    return text


def _show(value: object) -> object:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value) if isinstance(value, Path | BindAddress) else value


@dataclass(frozen=True, slots=True)
class Knob:
    env: str  # the name in the environment and the file
    field: str | None  # the IpamdConfig field; None for ENABLE_PREFIX_DELEGATION
    parse: Callable[[str, str], object]
    text_only: bool = False  # file values must be strings (paths, addresses, URLs)
    show: Callable[[object], object] = _show  # the value in its environment form


KNOBS: Mapping[str, Knob] = MappingProxyType(
    {
        k.env: k
        for k in (
            Knob("WARM_PREFIX_TARGET", "warm_prefix_target", _count),
            Knob("WARM_IP_TARGET", "warm_ip_target", _ip_target),
            Knob("MINIMUM_IP_TARGET", "minimum_ip_target", _ip_target),
            Knob("MAX_ENI", "max_eni", _max_eni, show=lambda v: -1 if v is None else v),
            Knob("IP_COOLDOWN_PERIOD", "ip_cooldown_period", _count),
            Knob("ENABLE_MULTI_NIC", "enable_multi_nic", _bool),
            Knob("ENABLE_IPv4", "enable_ipv4", _bool),
            Knob("ENABLE_IPv6", "enable_ipv6", _bool),
            Knob("ENABLE_PREFIX_DELEGATION", None, _prefix_delegation),
            Knob("WARM_ENI_TARGET", "warm_eni_target", _count),
            Knob("MAX_PODS", "max_pods", _positive),
            Knob("ULTRANET_SOCKET", "socket", _socket_path, text_only=True),
            Knob("ULTRANET_CNI_SOCKET", "cni_socket", _socket_path, text_only=True),
            Knob("ULTRANET_CNI_SPOOL", "cni_spool", _abs_path, text_only=True),
            Knob("ULTRANET_CNI_CONF_DIR", "cni_conf_dir", _abs_path, text_only=True),
            Knob("AWS_VPC_ENI_MTU", "pod_mtu", _mtu),
            Knob("ULTRANET_STATE_DIR", "state_dir", _abs_path, text_only=True),
            Knob("ULTRANET_METRICS_ADDR", "metrics_addr", _bind_address, text_only=True),
            Knob(
                "ULTRANET_INTROSPECTION_ADDR", "introspection_addr", _bind_address, text_only=True
            ),
            Knob("ULTRANET_IMDS_ENDPOINT", "imds_endpoint", _url, text_only=True),
            Knob("ULTRANET_EC2_ENDPOINT", "ec2_endpoint", _url, text_only=True),
            Knob("ULTRANET_EC2_RATE", "ec2_rate", _rate),
            Knob("ULTRANET_EC2_BURST", "ec2_burst", _positive),
            Knob("ULTRANET_SUBNET_TAG", "subnet_tag", _tag_key, text_only=True),
            Knob("ULTRANET_STRAY_SWEEP_INTERVAL", "stray_sweep_interval", _count),
            Knob("AWS_VPC_K8S_CNI_EXTERNALSNAT", "external_snat", _bool),
            Knob(
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                "exclude_snat_cidrs",
                _ipv4_cidrs,
                text_only=True,
            ),
            Knob("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "randomize_snat", _randomize_snat),
            Knob("AWS_VPC_K8S_CNI_CONNMARK", "connmark", _connmark, show=lambda v: f"{v:#x}"),
            Knob("AWS_VPC_CNI_NODE_PORT_SUPPORT", "node_port_support", _bool),
            Knob("AWS_VPC_K8S_CNI_VETHPREFIX", "veth_prefix", _veth_prefix, text_only=True),
            Knob("ENABLE_V4_EGRESS", "enable_v4_egress", _bool),
            Knob(
                "ULTRANET_V4_EGRESS_RANGE",
                "v4_egress_range",
                _v4_egress_range,
                text_only=True,
                show=str,
            ),
        )
    }
)


# -- loading -------------------------------------------------------------------------


def load_config(env: Mapping[str, str] | None = None, file: Path | None = None) -> IpamdConfig:
    """Defaults, then ``file`` (JSON or YAML by suffix), then ``env`` (``os.environ``)."""
    layers: list[tuple[Source, Mapping[str, str | None]]] = []
    if file is not None:
        data = _read_file(file)
        layers.append(("file", {name: _file_text(KNOBS[name], v) for name, v in data.items()}))
    environ = os.environ if env is None else env
    layers.append(("env", {name: environ[name] for name in KNOBS if name in environ}))
    kwargs: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for source, layer in layers:
        for name, text in layer.items():
            if not text:
                continue  # empty means not given
            knob = KNOBS[name]
            value = knob.parse(name, text)
            if knob.field is not None:
                kwargs[knob.field] = value
            sources[name] = source
    config = IpamdConfig(**kwargs, sources=MappingProxyType(sources))
    _check_address_family(config)
    return config


def _check_address_family(config: IpamdConfig) -> None:
    """The VPC CNI's ``isConfigValid`` (``pkg/ipamd/ipamd.go``): one family, and IPv6
    only with prefix delegation asked for explicitly."""
    if config.enable_ipv4 and config.enable_ipv6:
        raise ConfigError(
            "ENABLE_IPv6",
            "true",
            "IPv4 and IPv6 are both enabled; like the VPC CNI, ultranet is single stack:"
            " set ENABLE_IPv4=false for an IPv6 node",
        )
    if not config.enable_ipv4 and not config.enable_ipv6:
        raise ConfigError(
            "ENABLE_IPv4", "false", "IPv4 and IPv6 are both disabled: enable one of them"
        )
    if config.enable_ipv6 and "ENABLE_PREFIX_DELEGATION" not in config.sources:
        raise ConfigError(
            "ENABLE_PREFIX_DELEGATION",
            "",
            "IPv6 is supported only in prefix-delegation mode (one /80 per node): set"
            " ENABLE_PREFIX_DELEGATION=true with ENABLE_IPv6=true, as the VPC CNI requires",
        )


def _file_text(knob: Knob, value: object) -> str | None:
    """A file value as the text the environment would carry, refusing structures."""
    if value is None or isinstance(value, str):
        return value
    if knob.text_only:
        raise ConfigError(knob.env, value, "expected a string")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise ConfigError(knob.env, value, f"expected a scalar, got {type(value).__name__}")


def _read_file(path: Path) -> Mapping[str, object]:
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(FILE_FIELD, str(path), "expected a .json, .yaml or .yml file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(FILE_FIELD, str(path), f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(FILE_FIELD, str(path), f"not UTF-8: {exc.reason}") from None
    data = _parse_json(path, text) if kind == "json" else _parse_yaml(path, text)
    if data is None:
        return {}  # an empty YAML document
    if not isinstance(data, dict):
        raise ConfigError(FILE_FIELD, str(path), "expected a mapping of knob names to values")
    for key, value in data.items():
        if not isinstance(key, str) or key not in KNOBS:
            raise ConfigError(str(key), value, _unknown_key(path, key))
    return data


def _unknown_key(path: Path, key: object) -> str:
    close = difflib.get_close_matches(str(key).upper(), KNOBS.keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown key in {path} (keys are the upper-case environment names){hint}"


def _parse_json(path: Path, text: str) -> object:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(key, value, f"given twice in {path}")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(FILE_FIELD, str(path), f"not valid JSON: {exc}") from None


def _parse_yaml(path: Path, text: str) -> object:
    import yaml  # only for YAML files: it costs the daemon's start 20 ms otherwise

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # refused later as an unknown key
                if key_node.value in seen:
                    raise ConfigError(key_node.value, value_node.value, f"given twice in {path}")
                seen.add(key_node.value)
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(FILE_FIELD, str(path), f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
