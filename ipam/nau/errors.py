"""Errors of the NAU planner.

::

    UltranetError                      (ipam.errors)
    ├── ConfigError(field, value, ...)  a bad number or unknown key; names the field
    ├── UnknownInstanceType             not in the instance data; suggests close names
    └── PlanError                       an impossible combination (EFA on a non-EFA type, ...)
        └── InspectError                reading a live VPC failed (boto3 error translated)

Every message is one line, so the CLI prints it as is and exits non-zero.
"""

from __future__ import annotations

from ipam.errors import UltranetError


class PlanError(UltranetError):
    """The plan asks for something EC2 or the VPC CNI cannot do."""


class InspectError(PlanError):
    """A live VPC could not be read."""
