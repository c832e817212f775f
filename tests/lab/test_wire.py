"""The EC2 wire codec, checked against botocore itself rather than hand-written XML.

Requests are serialized by botocore's own EC2 serializer and must decode to the very
params that went in; responses are parsed by botocore's own EC2 parser and must come back
as the very result that was rendered. If the codec and boto3 disagree on one name, type
or nesting, a round trip here breaks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.awsrequest import AWSResponse, create_request_object, prepare_request_dict
from botocore.compat import HTTPHeaders
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.model import ListShape, OperationModel, Shape, StructureShape
from botocore.parsers import create_parser
from botocore.serialize import create_serializer

from tools.lab.ec2 import wire
from tools.lab.ec2.wire import (
    WireError,
    decode_params,
    parse_form,
    render_error,
    render_response,
)

MODEL = botocore.session.get_session().get_service_model("ec2")
SERIALIZER = create_serializer("ec2", include_validation=True)
PARSER = create_parser("ec2")
ATTACHED_AT = datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC)


def operation(action: str) -> OperationModel:
    return MODEL.operation_model(action)


def boto_body(action: str, params: Mapping[str, Any]) -> bytes:
    """The form body boto3 would POST for these params, encoded the way botocore does."""
    request_dict = SERIALIZER.serialize_to_request(params, operation(action))
    prepare_request_dict(request_dict, endpoint_url="https://ec2.us-west-2.amazonaws.com")
    body = create_request_object(request_dict).prepare().body
    assert body is not None
    return body if isinstance(body, bytes) else body.encode("utf-8")


def decode_as_server(action: str, body: bytes) -> dict[str, Any]:
    flat = parse_form(body)
    assert flat.pop("Action") == action
    assert flat.pop("Version") == MODEL.api_version
    return decode_params(action, flat)


def boto_parse(action: str, xml: bytes, status: int = 200) -> dict[str, Any]:
    response = {"body": xml, "headers": {}, "status_code": status}
    output_shape = operation(action).output_shape
    # For shapeless outputs (CreateTags) botocore's client passes None, as here; the
    # stubs only allow a Shape.
    parsed: dict[str, Any] = PARSER.parse(response, output_shape)  # type: ignore[arg-type]
    return parsed


# -- requests: botocore serializes, the codec decodes ----------------------------------------

REQUESTS: list[tuple[str, dict[str, Any]]] = [
    (
        "DescribeNetworkInterfaces",
        {
            "NetworkInterfaceIds": ["eni-0a1", "eni-0a2", "eni-0a3"],
            "Filters": [
                {"Name": "attachment.instance-id", "Values": ["i-0abc", "i-0def"]},
                {"Name": "tag:cluster.k8s.amazonaws.com/name", "Values": ["lab"]},
            ],
            "MaxResults": 5,
            "NextToken": "eyJvZmZzZXQiOiA1fQ==",
            "DryRun": False,
        },
    ),
    (
        "CreateNetworkInterface",
        {
            "SubnetId": "subnet-0a",
            "Description": "aws-K8S-i-0abc: ünïcode & = + % ?",
            "Groups": ["sg-01", "sg-02"],
            "InterfaceType": "efa",
            "Ipv4PrefixCount": 2,
            "SecondaryPrivateIpAddressCount": 3,
            "TagSpecifications": [
                {
                    "ResourceType": "network-interface",
                    "Tags": [
                        {"Key": "node.k8s.amazonaws.com/instance_id", "Value": "i-0abc"},
                        {"Key": "empty", "Value": ""},
                    ],
                }
            ],
        },
    ),
    (
        "AttachNetworkInterface",
        {
            "NetworkInterfaceId": "eni-0a1",
            "InstanceId": "i-0abc",
            "DeviceIndex": 1,
            "NetworkCardIndex": 3,
        },
    ),
    (
        "AssignPrivateIpAddresses",
        {
            "NetworkInterfaceId": "eni-0a1",
            "Ipv4Prefixes": ["10.0.16.0/28", "10.0.16.16/28"],
            "Ipv4PrefixCount": 1,
            "PrivateIpAddresses": ["10.0.0.5", "10.0.0.6"],
            "SecondaryPrivateIpAddressCount": 2,
            "AllowReassignment": True,
        },
    ),
    (
        "UnassignPrivateIpAddresses",
        {
            "NetworkInterfaceId": "eni-0a1",
            "PrivateIpAddresses": ["10.0.0.5"],
            "Ipv4Prefixes": ["10.0.16.0/28"],
        },
    ),
    (
        "CreateSubnetCidrReservation",
        {
            "SubnetId": "subnet-0a",
            "Cidr": "10.0.64.0/18",
            "ReservationType": "prefix",
            "Description": "pod prefixes",
            "TagSpecifications": [
                {"ResourceType": "subnet-cidr-reservation", "Tags": [{"Key": "k", "Value": "v"}]}
            ],
        },
    ),
    (
        "ModifyNetworkInterfaceAttribute",
        {
            "NetworkInterfaceId": "eni-0a1",
            "Attachment": {"AttachmentId": "eni-attach-0a1", "DeleteOnTermination": False},
            "SourceDestCheck": {"Value": False},
            "Description": {"Value": "renamed"},
            "Groups": ["sg-03"],
        },
    ),
    (
        "CreateTags",
        {
            "Resources": ["eni-0a1", "subnet-0a"],
            "Tags": [{"Key": "owner", "Value": "lab"}, {"Key": "tier", "Value": "pods"}],
        },
    ),
    (
        "DescribeInstanceTypes",
        {
            "InstanceTypes": ["p5.48xlarge", "m5.large"],
            "Filters": [{"Name": "network-info.efa-supported", "Values": ["true"]}],
            "MaxResults": 100,
        },
    ),
    (
        "DescribeSubnets",
        {
            "SubnetIds": ["subnet-0a", "subnet-0b"],
            "Filters": [{"Name": "vpc-id", "Values": ["vpc-01"]}],
        },
    ),
    (
        "DescribeInstances",
        {
            "InstanceIds": ["i-0abc"],
            "Filters": [{"Name": "instance-state-name", "Values": ["running", "pending"]}],
            "MaxResults": 10,
            "NextToken": "t",
        },
    ),
    # RunInstances reaches the model's two explicit queryNames: the request says
    # NetworkInterface.1.PrivateIpAddresses.1, not ...PrivateIpAddressesSet.1 as the
    # locationName would suggest. It also carries a timestamp deep inside.
    (
        "RunInstances",
        {
            "ImageId": "ami-0lab",
            "MinCount": 1,
            "MaxCount": 1,
            "NetworkInterfaces": [
                {
                    "DeviceIndex": 0,
                    "SubnetId": "subnet-0a",
                    "PrivateIpAddresses": [
                        {"PrivateIpAddress": "10.0.0.10", "Primary": True},
                        {"PrivateIpAddress": "10.0.0.11", "Primary": False},
                    ],
                    "Ipv6Addresses": [{"Ipv6Address": "2600:1f14::10"}],
                    "Ipv4PrefixCount": 1,
                }
            ],
            "InstanceMarketOptions": {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "persistent",
                    "InstanceInterruptionBehavior": "stop",
                    "ValidUntil": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
                },
            },
        },
    ),
    ("ModifyInstanceAttribute", {"InstanceId": "i-0abc", "UserData": {"Value": b"\x00#!/bin/sh"}}),
]


@pytest.mark.parametrize(("action", "params"), REQUESTS, ids=[action for action, _ in REQUESTS])
def test_botocore_request_decodes_to_the_params_boto3_was_given(
    action: str, params: dict[str, Any]
) -> None:
    assert decode_as_server(action, boto_body(action, params)) == params


def test_decoded_values_have_model_types() -> None:
    run_instances = dict(REQUESTS)["RunInstances"]
    params = decode_as_server("RunInstances", boto_body("RunInstances", run_instances))
    interface = params["NetworkInterfaces"][0]
    assert type(interface["DeviceIndex"]) is int
    assert interface["PrivateIpAddresses"][0]["Primary"] is True
    valid_until = params["InstanceMarketOptions"]["SpotOptions"]["ValidUntil"]
    assert isinstance(valid_until, datetime) and valid_until.utcoffset() == UTC.utcoffset(None)


def test_list_indices_may_have_gaps_and_sort_numerically() -> None:
    flat = {"NetworkInterfaceId.10": "d", "NetworkInterfaceId.3": "c", "NetworkInterfaceId.1": "a"}
    assert decode_params("DescribeNetworkInterfaces", flat) == {
        "NetworkInterfaceIds": ["a", "c", "d"]
    }


def test_naive_and_offset_timestamps_decode_to_utc() -> None:
    prefix = "InstanceMarketOptions.SpotOptions.ValidUntil"
    base = {"ImageId": "ami-0lab", "MinCount": "1", "MaxCount": "1"}
    for text in ("2030-01-02T03:04:05", "2030-01-02T05:04:05+02:00"):
        params = decode_params("RunInstances", {**base, prefix: text})
        valid_until = params["InstanceMarketOptions"]["SpotOptions"]["ValidUntil"]
        assert valid_until == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert valid_until.tzinfo is UTC


def test_parse_form_merges_query_and_body_and_keeps_blanks() -> None:
    flat = parse_form(b"Action=CreateTags&Tag.1.Value=&Tag.1.Key=a%2Fb+c", "Action=Other&X=1")
    assert flat == {"Action": "CreateTags", "X": "1", "Tag.1.Value": "", "Tag.1.Key": "a/b c"}
    assert parse_form(b"A=1&A=2") == {"A": "2"}


def test_parse_form_refuses_bytes_that_are_not_utf8() -> None:
    with pytest.raises(WireError) as caught:
        parse_form(b"Description=%ff")
    assert caught.value.code == "MalformedQueryString"


# -- request errors -------------------------------------------------------------------------


def test_unknown_action() -> None:
    with pytest.raises(WireError) as caught:
        decode_params("DescribeUnicorns", {})
    assert caught.value.code == "InvalidAction"
    assert caught.value.message == "The action DescribeUnicorns is not valid for this web service."
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "key",
    [
        "Bogus",
        "Filter.1.Nmae",
        "NetworkInterfaceIds.1",  # the member name; EC2 wants the query name
        "NetworkInterfaceId",  # a list without an index
        "NetworkInterfaceId.0",
        "NetworkInterfaceId.01",
        "NetworkInterfaceId.x",
        "NetworkInterfaceId.-1",
        "MaxResults.1",  # past a scalar
        "Filter.1",  # a structure given a value
        "Action",  # stripped by the caller, so here it is just unknown
    ],
)
def test_unknown_parameter(key: str) -> None:
    with pytest.raises(WireError) as caught:
        decode_params("DescribeNetworkInterfaces", {key: "x"})
    assert caught.value.code == "UnknownParameter"
    assert caught.value.message == f"The parameter {key} is not recognized"


@pytest.mark.parametrize(
    ("action", "key", "value"),
    [
        ("DescribeNetworkInterfaces", "MaxResults", "five"),
        ("DescribeNetworkInterfaces", "MaxResults", "5.0"),
        ("DescribeNetworkInterfaces", "MaxResults", ""),
        ("DescribeNetworkInterfaces", "DryRun", "yes"),
        ("AssignPrivateIpAddresses", "AllowReassignment", "1"),
        ("RunInstances", "InstanceMarketOptions.SpotOptions.ValidUntil", "tomorrow"),
        ("ModifyInstanceAttribute", "UserData.Value", "not base64!"),
    ],
)
def test_invalid_parameter_value(action: str, key: str, value: str) -> None:
    with pytest.raises(WireError) as caught:
        decode_params(action, {key: value})
    assert caught.value.code == "InvalidParameterValue"
    assert key in caught.value.message and f"({value})" in caught.value.message


@pytest.mark.parametrize(
    ("action", "flat", "missing"),
    [
        ("CreateNetworkInterface", {"Description": "x"}, "SubnetId"),
        ("AttachNetworkInterface", {"NetworkInterfaceId": "e", "InstanceId": "i"}, "DeviceIndex"),
        ("CreateTags", {"ResourceId.1": "eni-0a1"}, "Tag"),
    ],
)
def test_missing_required_parameter_is_named_as_on_the_wire(
    action: str, flat: dict[str, str], missing: str
) -> None:
    with pytest.raises(WireError) as caught:
        decode_params(action, flat)
    assert caught.value.code == "MissingParameter"
    assert caught.value.message == f"The request must contain the parameter {missing}"


# -- responses: the codec renders, botocore parses ------------------------------------------


def eni(index: int) -> dict[str, Any]:
    address = f"10.0.{index // 200}.{index % 200 + 10}"
    return {
        "Attachment": {
            "AttachTime": ATTACHED_AT,
            "AttachmentId": f"eni-attach-{index:04x}",
            "DeleteOnTermination": index == 0,
            "DeviceIndex": index % 8,
            "NetworkCardIndex": index % 4,
            "InstanceId": "i-0abc",
            "InstanceOwnerId": "123456789012",
            "Status": "attached",
        },
        "AvailabilityZone": "us-west-2a",
        "Description": "aws-K8S-i-0abc <primary> & \"quoted\" 'ü'",
        "Groups": [{"GroupId": "sg-01", "GroupName": "nodes"}],
        "InterfaceType": "interface",
        "Ipv6Addresses": [],
        "MacAddress": f"02:00:00:00:{index // 256:02x}:{index % 256:02x}",
        "NetworkInterfaceId": f"eni-{index:04x}",
        "OwnerId": "123456789012",
        "PrivateDnsName": "ip-10-0-0-10.us-west-2.compute.internal",
        "PrivateIpAddress": address,
        "PrivateIpAddresses": [
            {"Primary": True, "PrivateIpAddress": address},
            {"Primary": False, "PrivateIpAddress": "10.0.250.1"},
        ],
        "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.16.0/28"}, {"Ipv4Prefix": "10.0.16.16/28"}],
        "RequesterManaged": False,
        "SourceDestCheck": True,
        "Status": "in-use",
        "SubnetId": "subnet-0a",
        "TagSet": [{"Key": "cluster.k8s.amazonaws.com/name", "Value": "lab"}],
        "VpcId": "vpc-01",
    }


RESPONSES: list[tuple[str, dict[str, Any]]] = [
    ("DescribeNetworkInterfaces", {"NetworkInterfaces": [eni(0), eni(1)], "NextToken": "n2"}),
    ("DescribeNetworkInterfaces", {"NetworkInterfaces": []}),
    (
        "DescribeInstanceTypes",
        {
            "InstanceTypes": [
                {
                    "InstanceType": "p5.48xlarge",
                    "CurrentGeneration": True,
                    "VCpuInfo": {"DefaultVCpus": 192},
                    "MemoryInfo": {"SizeInMiB": 2097152},
                    "NetworkInfo": {
                        "NetworkPerformance": "3200 Gigabit",
                        "MaximumNetworkInterfaces": 64,
                        "MaximumNetworkCards": 32,
                        "DefaultNetworkCardIndex": 0,
                        "NetworkCards": [
                            {
                                "NetworkCardIndex": card,
                                "NetworkPerformance": "100 Gigabit",
                                "MaximumNetworkInterfaces": 2,
                                "BaselineBandwidthInGbps": 100.0,
                                "PeakBandwidthInGbps": 12.5,
                            }
                            for card in range(3)
                        ],
                        "Ipv4AddressesPerInterface": 50,
                        "Ipv6AddressesPerInterface": 50,
                        "Ipv6Supported": True,
                        "EnaSupport": "required",
                        "EfaSupported": True,
                        "EfaInfo": {"MaximumEfaInterfaces": 32},
                        "EncryptionInTransitSupported": True,
                    },
                }
            ],
            "NextToken": "n2",
        },
    ),
    (
        "DescribeSubnets",
        {
            "Subnets": [
                {
                    "AvailabilityZone": "us-west-2a",
                    "AvailabilityZoneId": "usw2-az1",
                    "AvailableIpAddressCount": 16379,
                    "CidrBlock": "10.0.0.0/18",
                    "DefaultForAz": False,
                    "MapPublicIpOnLaunch": False,
                    "State": "available",
                    "SubnetId": "subnet-0a",
                    "VpcId": "vpc-01",
                    "OwnerId": "123456789012",
                    "AssignIpv6AddressOnCreation": False,
                    "Ipv6CidrBlockAssociationSet": [],
                    "Tags": [{"Key": "Name", "Value": "pods-a"}],
                    "SubnetArn": "arn:aws:ec2:us-west-2:123456789012:subnet/subnet-0a",
                }
            ]
        },
    ),
    (
        "AssignPrivateIpAddresses",
        {
            "NetworkInterfaceId": "eni-0a1",
            "AssignedPrivateIpAddresses": [{"PrivateIpAddress": "10.0.0.5"}],
            "AssignedIpv4Prefixes": [{"Ipv4Prefix": "10.0.16.32/28"}],
        },
    ),
    (
        "CreateSubnetCidrReservation",
        {
            "SubnetCidrReservation": {
                "SubnetCidrReservationId": "scr-0a",
                "SubnetId": "subnet-0a",
                "Cidr": "10.0.64.0/18",
                "ReservationType": "prefix",
                "OwnerId": "123456789012",
                "Description": "pod prefixes",
                "Tags": [{"Key": "k", "Value": "v"}],
            }
        },
    ),
    (
        "DescribeInstances",
        {
            "Reservations": [
                {
                    "ReservationId": "r-0a",
                    "OwnerId": "123456789012",
                    "Groups": [],
                    "Instances": [
                        {
                            "InstanceId": "i-0abc",
                            "InstanceType": "p5.48xlarge",
                            "ImageId": "ami-0lab",
                            "LaunchTime": datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC),
                            "Placement": {"AvailabilityZone": "us-west-2a", "Tenancy": "default"},
                            "State": {"Code": 16, "Name": "running"},
                            "PrivateIpAddress": "10.0.0.10",
                            "SubnetId": "subnet-0a",
                            "VpcId": "vpc-01",
                            "SourceDestCheck": True,
                            "NetworkInterfaces": [
                                {
                                    "NetworkInterfaceId": "eni-0a1",
                                    "Attachment": {
                                        "AttachmentId": "eni-attach-0a1",
                                        "AttachTime": ATTACHED_AT,
                                        "DeleteOnTermination": True,
                                        "DeviceIndex": 0,
                                        "NetworkCardIndex": 0,
                                        "Status": "attached",
                                    },
                                    "Groups": [{"GroupId": "sg-01", "GroupName": "nodes"}],
                                    "InterfaceType": "interface",
                                    "MacAddress": "02:00:00:00:00:01",
                                    "PrivateIpAddress": "10.0.0.10",
                                    "PrivateIpAddresses": [
                                        {"Primary": True, "PrivateIpAddress": "10.0.0.10"}
                                    ],
                                    "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.16.0/28"}],
                                    "SourceDestCheck": True,
                                    "Status": "in-use",
                                }
                            ],
                            "Tags": [{"Key": "Name", "Value": "node-0"}],
                        }
                    ],
                }
            ]
        },
    ),
    ("AttachNetworkInterface", {"AttachmentId": "eni-attach-0a1", "NetworkCardIndex": 2}),
    ("CreateNetworkInterface", {"NetworkInterface": eni(7), "ClientToken": "tok"}),
    ("DeleteSecurityGroup", {"Return": True, "GroupId": "sg-01"}),
    ("DeleteNetworkInterface", {}),
    ("CreateTags", {}),
]


@pytest.mark.parametrize(
    ("action", "result"), RESPONSES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(RESPONSES)]
)
def test_rendered_response_parses_back_to_the_result(action: str, result: dict[str, Any]) -> None:
    parsed = boto_parse(action, render_response(action, result, "req-1"))
    assert parsed.pop("ResponseMetadata")["RequestId"] == "req-1"
    assert parsed == result


def test_response_document_looks_like_ec2() -> None:
    xml = render_response("AttachNetworkInterface", {"AttachmentId": "a-1"}, "req-1").decode()
    assert xml == (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<AttachNetworkInterfaceResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        "<requestId>req-1</requestId><attachmentId>a-1</attachmentId>"
        "</AttachNetworkInterfaceResponse>"
    )
    tagged = render_response("DescribeNetworkInterfaces", {"NetworkInterfaces": [eni(0)]}, "r")
    assert b"<networkInterfaceSet><item>" in tagged
    assert b"<attachTime>2024-05-01T12:30:15.000Z</attachTime>" in tagged


def test_none_members_are_left_out() -> None:
    xml = render_response("AttachNetworkInterface", {"AttachmentId": None}, "r")
    assert b"attachmentId" not in xml


def test_render_error_parses_as_a_client_error() -> None:
    xml = render_error("InvalidSubnetID.NotFound", "The subnet 'subnet-<x>' does not exist", "r9")
    parsed = boto_parse("DescribeSubnets", xml, status=400)
    assert parsed["Error"]["Code"] == "InvalidSubnetID.NotFound"
    assert parsed["Error"]["Message"] == "The subnet 'subnet-<x>' does not exist"
    assert parsed["ResponseMetadata"]["RequestId"] == "r9"


# -- response errors: emulator bugs are loud ------------------------------------------------


def test_unknown_top_level_key_raises() -> None:
    with pytest.raises(ValueError, match="'Interfaces'.*DescribeNetworkInterfacesResult"):
        render_response("DescribeNetworkInterfaces", {"Interfaces": []}, "r")


def test_unknown_nested_key_raises_with_its_path() -> None:
    broken = eni(0)
    broken["Attachment"] = {**broken["Attachment"], "CardIndex": 1}
    with pytest.raises(
        ValueError, match=r"NetworkInterfaces\[1\]\.Attachment: unknown member\(s\) 'CardIndex'"
    ):
        render_response("DescribeNetworkInterfaces", {"NetworkInterfaces": [eni(1), broken]}, "r")


def test_result_for_an_action_without_output_raises() -> None:
    with pytest.raises(ValueError, match="CreateTags"):
        render_response("CreateTags", {"Return": True}, "r")


@pytest.mark.parametrize(
    "result",
    [
        {"AttachmentId": 7},
        {"NetworkCardIndex": "2"},
        {"NetworkCardIndex": True},
        {"AttachmentId": ["a"]},
    ],
)
def test_wrong_value_types_raise(result: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="AttachNetworkInterface"):
        render_response("AttachNetworkInterface", result, "r")


def test_render_unknown_action_is_invalid_action() -> None:
    with pytest.raises(WireError) as caught:
        render_response("DescribeUnicorns", {}, "r")
    assert caught.value.code == "InvalidAction"


def test_a_thousand_interfaces_render_quickly() -> None:
    result = {"NetworkInterfaces": [eni(index) for index in range(1000)]}
    started = time.perf_counter()
    xml = render_response("DescribeNetworkInterfaces", result, "r")
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"rendering took {elapsed:.2f}s"
    assert boto_parse("DescribeNetworkInterfaces", xml)["NetworkInterfaces"][999] == eni(999)


def test_codec_covers_the_whole_ec2_model() -> None:
    """Every structure of every operation builds its name tables: no map, no flattened list
    and no two members sharing a query name, in the botocore that is installed."""
    visited: set[tuple[bool, str]] = set()

    def visit(shape: Shape, is_request: bool) -> None:
        if isinstance(shape, ListShape):
            visit(shape.member, is_request)
        elif isinstance(shape, StructureShape) and (is_request, shape.name) not in visited:
            visited.add((is_request, shape.name))
            if is_request:
                wire._request_table(shape)
            else:
                wire._response_table(shape)
            for member in shape.members.values():
                visit(member, is_request)

    for action in MODEL.operation_names:
        model = operation(action)
        if model.input_shape is not None:
            visit(model.input_shape, True)
        if model.output_shape is not None:
            visit(model.output_shape, False)
    assert len(visited) > 1000


# -- end to end: a real boto3 client, the codec standing in for EC2 -------------------------


class _RawBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def test_boto3_client_against_the_codec() -> None:
    client = boto3.client(
        "ec2",
        endpoint_url="http://ec2.lab.invalid",
        region_name="us-west-2",
        aws_access_key_id="lab",
        aws_secret_access_key="lab",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    seen: list[dict[str, Any]] = []

    def answer(request: Any, **_: Any) -> AWSResponse:
        body = request.body if isinstance(request.body, bytes) else request.body.encode()
        flat = parse_form(body)
        action = flat.pop("Action")
        flat.pop("Version")
        params = decode_params(action, flat)
        seen.append(params)
        if params.get("DryRun"):
            message = "Request would have succeeded, but DryRun flag is set."
            xml = render_error("DryRunOperation", message, "e2e")
            return AWSResponse(request.url, 412, HTTPHeaders(), _RawBody(xml))
        xml = render_response(action, {"NetworkInterfaces": [eni(3)]}, "e2e")
        return AWSResponse(request.url, 200, HTTPHeaders(), _RawBody(xml))

    # A before-send handler that returns a response short-circuits the HTTP call; the
    # stubs type every handler as returning None.
    client.meta.events.register("before-send.ec2.*", answer)  # type: ignore[arg-type]

    response = client.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": ["i-0abc"]}]
    )
    assert seen[-1] == {"Filters": [{"Name": "attachment.instance-id", "Values": ["i-0abc"]}]}
    assert response["NetworkInterfaces"] == [eni(3)]
    assert response["ResponseMetadata"]["RequestId"] == "e2e"

    with pytest.raises(ClientError) as caught:
        client.describe_network_interfaces(NetworkInterfaceIds=["eni-0a1"], DryRun=True)
    assert seen[-1] == {"NetworkInterfaceIds": ["eni-0a1"], "DryRun": True}
    assert caught.value.response["Error"]["Code"] == "DryRunOperation"
