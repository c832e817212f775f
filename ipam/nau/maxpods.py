"""Max pods per node, computed as the EKS max-pods calculator computes it.

Source: ``awslabs/amazon-eks-ami`` ``templates/al2023/runtime/max-pods-calculator.sh``:

* secondary-IP mode: ``ENIs * (IPv4Limit - 1) + 2`` (the values of the VPC CNI's
  ``misc/eni-max-pods.txt``, uncapped); the +2 are host-network pods (aws-node,
  kube-proxy), which take no pod address;
* custom networking: the primary ENI holds no pods, so ``ENIs - 1``;
* prefix mode (and IPv6, which is prefix mode only): ``ENIs * ((IPv4Limit - 1) * 16) + 2``;
* then ``min(calc, 110)`` for 30 vCPUs or fewer, ``min(calc, 250)`` above
  (``--show-max-allowed`` skips the cap: ``cap=False`` here).

``ENIs`` is ``MaximumNetworkInterfaces`` of the default network card only, as the VPC CNI
uses it. Where the calculator would silently fall back (prefix delegation asked for on a
non-Nitro type) this module refuses instead: the VPC CNI would run in secondary-IP mode,
which is a different plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ipam.instance_types import InstanceType
from ipam.nau.errors import PlanError

IPS_PER_PREFIX = 16
HOST_NETWORK_PODS = 2
CAP_SMALL = 110
CAP_LARGE = 250
CAP_VCPU_THRESHOLD = 30  # calculator: -gt 30 gets the larger cap


class Mode(StrEnum):
    """The VPC CNI's IPAM modes."""

    SECONDARY = "secondary-ip"
    PREFIX = "prefix"
    IPV6 = "ipv6"


@dataclass(frozen=True, slots=True)
class MaxPods:
    value: int
    uncapped: int
    formula: str  # how ``uncapped`` was computed, for the table
    cap: int | None  # the cap that applied, if any


def pod_enis(itype: InstanceType, *, custom_networking: bool) -> int:
    """ENIs on the default card that can hold pod addresses."""
    return itype.max_enis_default_card - (1 if custom_networking else 0)


def max_pods(
    itype: InstanceType, mode: Mode, *, custom_networking: bool = False, cap: bool = True
) -> MaxPods:
    """The calculator's answer for ``itype``; ``PlanError`` where the mode cannot apply."""
    enis = pod_enis(itype, custom_networking=custom_networking)
    if enis < 1:
        raise PlanError(
            f"custom networking on {itype.name} leaves no ENI for pods "
            f"({itype.max_enis_default_card} ENI on the default card)"
        )
    slots = itype.ipv4_per_eni - 1
    if mode is Mode.SECONDARY:
        uncapped = enis * slots + HOST_NETWORK_PODS
        formula = f"{enis} ENIs x {slots} IPs + {HOST_NETWORK_PODS}"
    else:
        if not itype.nitro:
            raise PlanError(
                f"{mode} mode needs prefix delegation, which needs a Nitro instance; "
                f"{itype.name} is {itype.hypervisor} (use --mode secondary-ip)"
            )
        uncapped = enis * slots * IPS_PER_PREFIX + HOST_NETWORK_PODS
        formula = f"{enis} ENIs x {slots} prefixes x {IPS_PER_PREFIX} + {HOST_NETWORK_PODS}"
    if not cap:
        return MaxPods(uncapped, uncapped, formula, None)
    if itype.vcpus is None:
        raise PlanError(
            f"the vCPU count of {itype.name} is not in the instance data, so the 110/250 "
            "max-pods cap is unknown; give max_pods (--max-pods)"
        )
    limit = CAP_LARGE if itype.vcpus > CAP_VCPU_THRESHOLD else CAP_SMALL
    return MaxPods(min(uncapped, limit), uncapped, formula, limit if uncapped > limit else None)
