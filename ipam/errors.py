"""Errors of the ipam package.

::

    UltranetError                                (cni.errors: the one root)
    ├── ConfigError(field, value, reason)        bad configuration; names the knob
    ├── UnknownInstanceType(name, suggestions)   not in the instance data
    └── SubnetSpaceError(code)                   an address or prefix EC2 would refuse
        ├── InsufficientCidrBlocks                no aligned, fully free /28 left, addresses remain
        ├── NoRoomForPrefix                       not even 16 free addresses for a /28
        ├── InsufficientFreeAddresses             no free address left
        ├── AddressUnavailable                    a named address/prefix is taken or reserved
        └── ReservationConflict                   a CIDR reservation overlaps another

``SubnetSpaceError.code`` is the EC2 error code the emulator answers with, so the
allocator and the emulator cannot drift apart on which failure is which.
"""

from __future__ import annotations

from cni.errors import UltranetError

__all__ = [
    "AddressUnavailable",
    "ConfigError",
    "InsufficientCidrBlocks",
    "InsufficientFreeAddresses",
    "NoRoomForPrefix",
    "ReservationConflict",
    "SubnetSpaceError",
    "UltranetError",
    "UnknownInstanceType",
]


class ConfigError(UltranetError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class UnknownInstanceType(UltranetError):
    """The instance type is not in the instance data."""

    def __init__(self, name: str, suggestions: list[str]) -> None:
        hint = f" (did you mean {', '.join(suggestions)}?)" if suggestions else ""
        super().__init__(f"unknown instance type {name!r}{hint}")
        self.name = name
        self.suggestions = suggestions


class SubnetSpaceError(UltranetError):
    """EC2 would refuse this assignment in this subnet."""

    code = "InvalidParameterValue"


class InsufficientCidrBlocks(SubnetSpaceError):
    code = "InsufficientCidrBlocks"


class NoRoomForPrefix(SubnetSpaceError):
    """A prefix asked of a subnet with fewer than 16 free addresses.

    EC2 answers this case with InvalidParameterValue ("There aren't sufficient free Ipv4
    addresses or prefixes"), not InsufficientCidrBlocks, which it keeps for
    fragmentation (AWS Support's answer quoted in cilium/cilium#31016; vpc-cni #3105).
    """

    code = "InvalidParameterValue"


class InsufficientFreeAddresses(SubnetSpaceError):
    code = "InsufficientFreeAddressesInSubnet"


class AddressUnavailable(SubnetSpaceError):
    code = "InvalidParameterValue"


class ReservationConflict(SubnetSpaceError):
    code = "InvalidParameterValue"
