"""The ADD result, rendered per CNI version and parsed back from ``prevResult``.

CNI spec 1.1.0 §"Success" / "ADD Success": ``interfaces``, ``ips`` (``interface`` is an
index into ``interfaces``), ``routes``, ``dns``. Differences by version:

* 0.4.0 (and 0.3.x): each ``ips[]`` entry carries ``"version": "4"|"6"``, by its
  address's family; interfaces have name/mac/sandbox only; routes have dst/gw only.
* 1.0.0: ``ips[].version`` is gone.
* 1.1.0: adds ``interfaces[].mtu/socketPath/pciID`` and
  ``routes[].mtu/advmss/priority/table/scope``.

Routes that only make sense in another table (a multi-NIC pod's interface k > 0) are
rendered only for 1.1.0, which can say ``table``; an older reader would take them as a
second default route of the main table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from typing import Any

from cni.errors import CniError, ErrorCode

__all__ = [
    "Dns",
    "IpConfig",
    "PodInterface",
    "Result",
    "Route",
    "chain",
    "parse_result",
    "render_result",
]


@dataclass(frozen=True, slots=True)
class PodInterface:
    name: str
    mac: str = ""
    sandbox: str = ""  # the netns path for container-side interfaces; "" on the host
    mtu: int | None = None


@dataclass(frozen=True, slots=True)
class IpConfig:
    address: IPv4Interface | IPv6Interface
    gateway: IPv4Address | IPv6Address | None = None
    interface: int | None = None


@dataclass(frozen=True, slots=True)
class Route:
    dst: IPv4Network | IPv6Network
    gw: IPv4Address | IPv6Address | None = None
    table: int | None = None  # 1.1.0 only
    scope: int | None = None  # 1.1.0 only
    priority: int | None = None  # 1.1.0 only
    mtu: int | None = None  # 1.1.0 only
    advmss: int | None = None  # 1.1.0 only


@dataclass(frozen=True, slots=True)
class Dns:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Result:
    interfaces: tuple[PodInterface, ...] = ()
    ips: tuple[IpConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: Dns = field(default_factory=Dns)


def _is_v1(version: str) -> bool:
    return not version.startswith("0.")


def _render_interface(iface: PodInterface, version: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": iface.name}
    if iface.mac:
        out["mac"] = iface.mac
    if iface.sandbox:
        out["sandbox"] = iface.sandbox
    if version == "1.1.0" and iface.mtu is not None:
        out["mtu"] = iface.mtu
    return out


def _render_route(route: Route, version: str) -> dict[str, Any] | None:
    extra = {
        "table": route.table,
        "scope": route.scope,
        "priority": route.priority,
        "mtu": route.mtu,
        "advmss": route.advmss,
    }
    if version != "1.1.0" and route.table is not None:
        return None  # cannot be said before 1.1.0 without lying about the main table
    out: dict[str, Any] = {"dst": str(route.dst)}
    if route.gw is not None:
        out["gw"] = str(route.gw)
    if version == "1.1.0":
        out.update({key: value for key, value in extra.items() if value is not None})
    return out


def chain(prev: Mapping[str, Any], ours: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Our rendered result appended to a raw ``prevResult`` (CNI spec §"Chained plugins":
    a plugin given prevResult outputs it, modified as needed).

    The raw object is kept, not a typed view, so what ultranet does not model (other
    plugins' fields, unknown keys) passes through. libcni converts prevResult to the config's
    version before the call, so both halves share ``version``; our interface indexes are
    shifted past the earlier plugins' interfaces.
    """
    out = dict(prev)
    shift = len(prev.get("interfaces") or [])
    ips = [
        {**ip, "interface": ip["interface"] + shift} if "interface" in ip else dict(ip)
        for ip in ours["ips"]
    ]
    out["cniVersion"] = version
    out["interfaces"] = list(prev.get("interfaces") or []) + list(ours["interfaces"])
    out["ips"] = list(prev.get("ips") or []) + ips
    out["routes"] = list(prev.get("routes") or []) + list(ours["routes"])
    out.setdefault("dns", ours["dns"])
    return out


def render_result(result: Result, version: str) -> dict[str, Any]:
    """The result object for ``version`` (one of ``spec.SUPPORTED_VERSIONS``)."""
    ips = []
    for ip in result.ips:
        entry: dict[str, Any] = {"address": str(ip.address)}
        if not _is_v1(version):
            entry["version"] = str(ip.address.version)
        if ip.gateway is not None:
            entry["gateway"] = str(ip.gateway)
        if ip.interface is not None:
            entry["interface"] = ip.interface
        ips.append(entry)
    routes = [r for r in (_render_route(r, version) for r in result.routes) if r is not None]
    dns: dict[str, Any] = {}
    for key in ("nameservers", "domain", "search", "options"):
        value = getattr(result.dns, key)
        if value:
            dns[key] = list(value) if isinstance(value, tuple) else value
    return {
        "cniVersion": version,
        "interfaces": [_render_interface(i, version) for i in result.interfaces],
        "ips": ips,
        "routes": routes,
        "dns": dns,
    }


# -- parsing prevResult ------------------------------------------------------------------


def _bad(path: str, value: object, why: str) -> CniError:
    return CniError(ErrorCode.DECODE_FAILURE, f"prevResult.{path}={value!r}: {why}")


def _opt_int(obj: Mapping[str, Any], key: str, path: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{path}.{key}", value, "must be an integer")
    return value


def _str(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise _bad(f"{path}.{key}", value, "must be a string")
    return value


def _list(obj: Mapping[str, Any], key: str) -> Sequence[Any]:
    value = obj.get(key) or []
    if not isinstance(value, list):
        raise _bad(key, value, "must be a list")
    return value


def _obj(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, value, "must be an object")
    return value


def _parse_ip(raw: object, i: int) -> IpConfig:
    """An ``ips[]`` entry, IPv4 or IPv6 (a gateway of the other family is refused)."""
    obj = _obj(raw, f"ips[{i}]")
    try:
        address = ip_interface(_str(obj, "address", f"ips[{i}]"))
        gateway = ip_address(obj["gateway"]) if obj.get("gateway") else None
    except ValueError as err:
        raise _bad(f"ips[{i}]", raw, str(err)) from err
    if gateway is not None and gateway.version != address.version:
        raise _bad(
            f"ips[{i}].gateway",
            str(gateway),
            f"IPv{gateway.version} gateway for an IPv{address.version} address",
        )
    return IpConfig(address, gateway, _opt_int(obj, "interface", f"ips[{i}]"))


def _parse_route(raw: object, i: int) -> Route:
    obj = _obj(raw, f"routes[{i}]")
    try:
        dst = ip_network(_str(obj, "dst", f"routes[{i}]"), strict=False)
        gw = ip_address(obj["gw"]) if obj.get("gw") else None
    except ValueError as err:
        raise _bad(f"routes[{i}]", raw, str(err)) from err
    if gw is not None and gw.version != dst.version:
        raise _bad(
            f"routes[{i}].gw", str(gw), f"IPv{gw.version} gateway for an IPv{dst.version} route"
        )
    path = f"routes[{i}]"
    return Route(
        dst,
        gw,
        _opt_int(obj, "table", path),
        _opt_int(obj, "scope", path),
        _opt_int(obj, "priority", path),
        _opt_int(obj, "mtu", path),
        _opt_int(obj, "advmss", path),
    )


def parse_result(raw: object) -> Result:
    """A ``prevResult`` of any supported version (0.4.0 ``version`` fields are ignored;
    the address says its family). A chained plugin's pass-through keeps the raw object
    (``spec.NetConf.prev_raw``), so what the typed view leaves out is not lost downstream.
    """
    obj = _obj(raw, "")
    interfaces = []
    for i, item in enumerate(_list(obj, "interfaces")):
        iface = _obj(item, f"interfaces[{i}]")
        interfaces.append(
            PodInterface(
                _str(iface, "name", f"interfaces[{i}]"),
                _str(iface, "mac", f"interfaces[{i}]"),
                _str(iface, "sandbox", f"interfaces[{i}]"),
                _opt_int(iface, "mtu", f"interfaces[{i}]"),
            )
        )
    ips = [_parse_ip(raw_ip, i) for i, raw_ip in enumerate(_list(obj, "ips"))]
    routes = [_parse_route(raw_r, i) for i, raw_r in enumerate(_list(obj, "routes"))]
    dns_obj = _obj(obj.get("dns") or {}, "dns")
    dns = Dns(
        tuple(str(x) for x in dns_obj.get("nameservers") or ()),
        str(dns_obj.get("domain") or ""),
        tuple(str(x) for x in dns_obj.get("search") or ()),
        tuple(str(x) for x in dns_obj.get("options") or ()),
    )
    return Result(tuple(interfaces), tuple(ips), tuple(routes), dns)
