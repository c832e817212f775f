"""IMDSv2 client: what the node learns about itself without calling EC2.

IMDSv2 only (session token from ``PUT /latest/api/token``, refreshed before it
expires); no IMDSv1 fallback, because a node whose IMDS answers v1 has hop-limit or
policy problems that should be seen, not papered over. One keep-alive HTTP connection:
a p5.48xlarge has 32 network cards and the daemon reads about ten keys per interface
at start, so connection set-up would otherwise dominate exec-to-ready time.

Keys are the ones the VPC CNI reads (``aws/amazon-vpc-cni-k8s``, ``pkg/awsutils/imds.go``).
An interface with no ``local-ipv4s`` is an efa-only candidate, as in the VPC CNI;
only EC2's InterfaceType can confirm it. The IPv6 keys (``ipv6s``, ``ipv6-prefix``) are
read only when asked (``ipv6=True``, an ``ENABLE_IPv6`` node), as the VPC CNI reads them
only in IPv6 mode.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from urllib.parse import urlsplit

from ipam.errors import UltranetError

TOKEN_TTL_S = 21600
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
META = "/latest/meta-data/"


class ImdsError(UltranetError):
    """IMDS could not be read; the message names the path."""


@dataclass(frozen=True, slots=True)
class ImdsInterface:
    mac: str
    interface_id: str
    device_number: int
    network_card: int
    subnet_id: str
    subnet_cidr: IPv4Network | None
    vpc_id: str
    vpc_cidrs: tuple[IPv4Network, ...]
    security_group_ids: tuple[str, ...]
    local_ipv4s: tuple[IPv4Address, ...]  # primary first; empty for efa-only
    ipv4_prefixes: tuple[IPv4Network, ...]
    ipv6s: tuple[IPv6Address, ...] = ()  # read only with ipv6=True
    ipv6_prefixes: tuple[IPv6Network, ...] = ()  # the /80s; read only with ipv6=True

    @property
    def primary_ip(self) -> IPv4Address | None:
        return self.local_ipv4s[0] if self.local_ipv4s else None

    @property
    def maybe_efa_only(self) -> bool:
        return not self.local_ipv4s


@dataclass(frozen=True, slots=True)
class InstanceIdentity:
    instance_id: str
    instance_type: str
    availability_zone: str
    primary_mac: str


class ImdsClient:
    """Reads instance metadata over one keep-alive connection."""

    def __init__(
        self,
        endpoint: str = "http://169.254.169.254",
        *,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise ImdsError(f"IMDS endpoint {endpoint!r} must be http://host[:port]")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._timeout = timeout_s
        self._clock = clock
        self._conn: http.client.HTTPConnection | None = None
        self._token = ""
        self._token_expiry = 0.0
        self.requests = 0
        self.read_ipv6 = False  # an ENABLE_IPv6 node's agent sets it

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ImdsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw access ------------------------------------------------------------------

    def get(self, path: str) -> str | None:
        """The value at ``/latest/meta-data/<path>``, or None when IMDS says 404."""
        status, body = self._request("GET", META + path, {TOKEN_HEADER: self._session_token()})
        if status == 401:  # token expired or revoked early: one fresh try
            self._token = ""
            status, body = self._request("GET", META + path, {TOKEN_HEADER: self._session_token()})
        if status == 404:
            return None
        if status != 200:
            raise ImdsError(f"IMDS GET {path}: HTTP {status}")
        return body

    def require(self, path: str) -> str:
        value = self.get(path)
        if value is None:
            raise ImdsError(f"IMDS has no {path}")
        return value

    # -- typed views -----------------------------------------------------------------

    def identity(self) -> InstanceIdentity:
        return InstanceIdentity(
            instance_id=self.require("instance-id"),
            instance_type=self.require("instance-type"),
            availability_zone=self.require("placement/availability-zone"),
            primary_mac=self.require("mac"),
        )

    def macs(self) -> list[str]:
        listing = self.require("network/interfaces/macs/")
        return [line.rstrip("/") for line in listing.splitlines() if line.strip()]

    def interface(
        self, mac: str, *, same_vpc_as: ImdsInterface | None = None, ipv6: bool = False
    ) -> ImdsInterface:
        """One interface's keys. With ``same_vpc_as``, its VPC id, VPC CIDRs and security
        groups are taken from that interface instead of read: every ENI of an instance is
        in the instance's VPC, and on a p5.48xlarge that saves 93 of 325 requests."""
        base = f"network/interfaces/macs/{mac}/"
        subnet_cidr = self.get(base + "subnet-ipv4-cidr-block")
        if same_vpc_as is None:
            vpc_id = self.require(base + "vpc-id")
            vpc_cidrs = tuple(
                IPv4Network(c) for c in _lines(self.get(base + "vpc-ipv4-cidr-blocks"))
            )
            groups = tuple(_lines(self.get(base + "security-group-ids")))
        else:
            vpc_id, vpc_cidrs = same_vpc_as.vpc_id, same_vpc_as.vpc_cidrs
            groups = same_vpc_as.security_group_ids
        return ImdsInterface(
            mac=mac,
            interface_id=self.require(base + "interface-id"),
            device_number=int(self.require(base + "device-number")),
            network_card=int(self.get(base + "network-card") or 0),
            subnet_id=self.require(base + "subnet-id"),
            subnet_cidr=IPv4Network(subnet_cidr) if subnet_cidr else None,
            vpc_id=vpc_id,
            vpc_cidrs=vpc_cidrs,
            security_group_ids=groups,
            local_ipv4s=tuple(IPv4Address(a) for a in _lines(self.get(base + "local-ipv4s"))),
            ipv4_prefixes=tuple(IPv4Network(p) for p in _lines(self.get(base + "ipv4-prefix"))),
            ipv6s=tuple(IPv6Address(a) for a in _lines(self.get(base + "ipv6s"))) if ipv6 else (),
            ipv6_prefixes=(
                tuple(IPv6Network(p) for p in _lines(self.get(base + "ipv6-prefix")))
                if ipv6
                else ()
            ),
        )

    def interfaces(self, *, primary_mac: str | None = None) -> list[ImdsInterface]:
        """Every interface; given the primary's MAC, the others' VPC keys come from it.
        With ``read_ipv6`` set the primary's IPv6 keys are read too (pods use its /80)."""
        macs = self.macs()
        found = []
        primary = None
        if primary_mac is not None and primary_mac in macs:
            primary = self.interface(primary_mac, ipv6=self.read_ipv6)
            found.append(primary)
        found += [self.interface(m, same_vpc_as=primary) for m in macs if m != primary_mac]
        return sorted(found, key=lambda i: (i.network_card, i.device_number))

    # -- internals -------------------------------------------------------------------

    def _session_token(self) -> str:
        # Refresh a minute early so a token never expires between check and use.
        if self._token and self._clock() < self._token_expiry - 60:
            return self._token
        status, body = self._request("PUT", "/latest/api/token", {TTL_HEADER: str(TOKEN_TTL_S)})
        if status != 200:
            raise ImdsError(f"IMDSv2 token request refused: HTTP {status}")
        self._token = body
        self._token_expiry = self._clock() + TOKEN_TTL_S
        return self._token

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
            try:
                self._conn.request(method, path, headers=headers)
                response = self._conn.getresponse()
                body = response.read().decode()
                self.requests += 1
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response.status, body
            except (OSError, http.client.HTTPException) as err:
                # A keep-alive connection the server closed fails once; retry on a new one.
                self.close()
                if attempt == 2:
                    raise ImdsError(f"IMDS {method} {path}: {err}") from err
        raise AssertionError("unreachable")


def _lines(value: str | None) -> list[str]:
    return [line.strip() for line in (value or "").splitlines() if line.strip()]


def main() -> int:
    """``python -m ipam.imds [endpoint]``: print what this node's IMDS says, as JSON."""
    endpoint = sys.argv[1] if len(sys.argv) > 1 else "http://169.254.169.254"
    try:
        with ImdsClient(endpoint) as imds:
            doc = {
                "identity": asdict(imds.identity()),
                "interfaces": [asdict(i) for i in imds.interfaces()],
                "imds_requests": imds.requests,
            }
    except ImdsError as err:
        print(f"imds: {err}", file=sys.stderr)
        return 1
    print(json.dumps(doc, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
