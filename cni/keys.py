"""The identity of a CNI attachment and of the pod it belongs to.

``IpamKey`` is the CNI spec's primary key for an attachment: the network name, the
container id and the interface name ("Container Network Interface (CNI) Specification",
section "Lifecycle & Ordering": a plugin must treat (network name, CNI_CONTAINERID,
CNI_IFNAME) as unique). The VPC CNI keys its datastore the same way (``IPAMKey``).
They live in ``cni`` because they are the CNI's own notions; the daemon's datastore
(``ipam``) stores and restores them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cni.errors import UltranetError

# CNI spec, "Parameters": CNI_CONTAINERID "must have at least one character" and consists
# of alphanumerics, underscore, dot and hyphen, starting with an alphanumeric.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# CNI spec, "Parameters": CNI_IFNAME must be a valid Linux interface name: at most 15
# bytes (IFNAMSIZ - 1), not "." or "..", no "/", ":" or whitespace.
_IFNAME_FORBIDDEN = re.compile(r"[/:\s]")
IFNAME_MAX = 15
# CNI spec, "Configuration format": the network name is "[a-zA-Z0-9_.\-]+" ... loosely; we
# accept what the spec's reference library accepts: non-empty, no whitespace or "/".
_NETWORK_FORBIDDEN = re.compile(r"[/\s]")


class InvalidKey(UltranetError):
    """A key or pod reference field is malformed; the message names the field."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value


@dataclass(frozen=True, slots=True)
class IpamKey:
    """One attachment: (network, container id, interface name), validated per the CNI spec."""

    network: str
    container_id: str
    ifname: str

    def __post_init__(self) -> None:
        if not self.network or _NETWORK_FORBIDDEN.search(self.network):
            raise InvalidKey("network", self.network, "must be non-empty without '/' or spaces")
        if _CONTAINER_ID.fullmatch(self.container_id) is None:
            raise InvalidKey(
                "container_id",
                self.container_id,
                "must be alphanumerics, '_', '.' or '-', starting with an alphanumeric",
            )
        name = self.ifname
        if (
            not name
            or len(name.encode()) > IFNAME_MAX
            or name in (".", "..")
            or _IFNAME_FORBIDDEN.search(name)
        ):
            raise InvalidKey(
                "ifname", name, f"must be 1..{IFNAME_MAX} bytes, not '.'/'..', no '/', ':', spaces"
            )

    def __str__(self) -> str:
        return f"{self.network}/{self.container_id}/{self.ifname}"


@dataclass(frozen=True, slots=True)
class PodRef:
    """The Kubernetes pod an attachment belongs to (CNI_ARGS K8S_POD_NAMESPACE/NAME)."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        if not self.namespace:
            raise InvalidKey("pod.namespace", self.namespace, "must be non-empty")
        if not self.name:
            raise InvalidKey("pod.name", self.name, "must be non-empty")

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"
