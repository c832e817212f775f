"""The embedded default plan: 100,000 nodes of an AI/ML cluster, as ``plan`` with no
arguments plans it. Kept as data in a module (not a package data file) so it ships
with the code. Realistic, not canonical: training fleets on p5 / p5en / trn2 with the
EFA layout AWS recommends (an EFA with ENA as the primary, EFA-only interfaces on the
other cards, up to the type's EFA limit), a CPU fleet for system and data-loading pods,
and the usual VPC endpoints, load balancers and NAT gateways of a private cluster.
"""

from __future__ import annotations

from typing import Any

DEFAULT_PLAN: dict[str, Any] = {
    "name": "ai-ml-100k (embedded default)",
    "mode": "prefix",
    "warm": {"WARM_PREFIX_TARGET": 1},
    "azs": 3,
    "quota": "max",
    "node_groups": [
        {
            "name": "p5-training",
            "instance_type": "p5.48xlarge",
            "nodes": 40_000,
            "pods_per_node": 12,
            "efa_primary": True,
            "efa_only_interfaces": 31,
        },
        {
            "name": "p5en-training",
            "instance_type": "p5en.48xlarge",
            "nodes": 30_000,
            "pods_per_node": 12,
            "efa_primary": True,
            "efa_only_interfaces": 15,
        },
        {
            "name": "trn2-training",
            "instance_type": "trn2.48xlarge",
            "nodes": 20_000,
            "pods_per_node": 12,
            "efa_primary": True,
            "efa_only_interfaces": 15,
        },
        {
            "name": "cpu-system",
            "instance_type": "m7i.24xlarge",
            "nodes": 10_000,
            "pods_per_node": 40,
        },
    ],
    "consumers": {
        "nlb": 10,
        "vpc_endpoints": 12,
        "nat_gateways": 3,
        "efs_mount_targets": 3,
        "tgw_attachments": 1,
    },
}
