"""The errors EC2 answers with, as the emulator raises them.

An ``Ec2Error`` carries EC2's error code and HTTP status; the API layer renders it as
EC2's XML error document, so boto3 raises the same ``ClientError`` it would raise
against AWS. Codes are EC2's ("Error codes for the Amazon EC2 API"); the subnet
allocator's own errors (``ipam.errors.SubnetSpaceError``) already carry theirs.
"""

from __future__ import annotations


class Ec2Error(Exception):
    """A request EC2 refuses. ``status`` is the HTTP status EC2 uses for ``code``."""

    def __init__(self, code: str, message: str, *, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def not_found(kind: str, resource_id: str) -> Ec2Error:
    """``Invalid<Kind>ID.NotFound``, worded as EC2 words it."""
    codes = {
        "eni": ("InvalidNetworkInterfaceID.NotFound", "network interface"),
        "subnet": ("InvalidSubnetID.NotFound", "subnet"),
        "vpc": ("InvalidVpcID.NotFound", "VPC"),
        "instance": ("InvalidInstanceID.NotFound", "instance ID"),
        "attachment": ("InvalidAttachmentID.NotFound", "attachment"),
        "reservation": ("InvalidSubnetCidrReservationID.NotFound", "subnet CIDR reservation"),
    }
    code, noun = codes[kind]
    return Ec2Error(code, f"The {noun} '{resource_id}' does not exist")


def invalid(message: str) -> Ec2Error:
    return Ec2Error("InvalidParameterValue", message)


def combination(message: str) -> Ec2Error:
    return Ec2Error("InvalidParameterCombination", message)


def throttled() -> Ec2Error:
    return Ec2Error("RequestLimitExceeded", "Request limit exceeded.", status=503)


def unavailable() -> Ec2Error:
    return Ec2Error(
        "Unavailable", "The server is overloaded and can't handle the request.", status=503
    )


def internal() -> Ec2Error:
    return Ec2Error("InternalError", "An internal error has occurred.", status=500)
