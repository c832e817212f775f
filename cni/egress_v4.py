"""IPv4 egress for an IPv6 pod, the pod's side, as the VPC CNI's ``egress-cni`` plugin does it.

On an IPv6 node a pod has only its /128, yet must reach IPv4-only endpoints. The VPC CNI
chains its ``egress-cni`` plugin after its own (``aws/amazon-vpc-cni-k8s``,
``cmd/egress-cni-plugin``: ``egressContext.go`` ``setupContainerVethV4`` and
``setupHostVethV4``; ``snat/snat.go``): a second veth, ``v4if0`` in the pod, holding an
address from a node-local IPv4 range (its conflist's host-local IPAM subnet,
169.254.172.0/22), whose first address is the gateway on the host end; the node then
SNATs the range to its own primary IPv4, so the packet leaves as the node's.

Here the ADD plumbs it (:meth:`cni.plumbing.Plumbing.setup_v4_egress`, two rtnetlink
batches), the daemon picks the address (``ipam.pool6``, journaled with the allocation),
and the node-wide part, one SNAT rule for the whole range rather than the VPC CNI's chain
per pod and the rule that keeps other pods from opening connections to a pod's node-local
address, is :func:`ipam.egress.v4_egress_ruleset`. This module holds what they share: the
pod end's name and where the gateway sits in the range.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

POD_IFNAME = "v4if0"  # the VPC CNI's EgressIPv4InterfaceName


def gateway(node_range: IPv4Network) -> IPv4Address:
    """The host end's address: the range's first, as host-local IPAM's default gateway."""
    return node_range.network_address + 1
