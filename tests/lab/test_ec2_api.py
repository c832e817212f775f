"""Every EC2 action of the emulator, through boto3 over HTTP, with EC2's semantics."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.lab.ec2env import CNI_TAG, Ec2Env, ec2_env
from tools.lab.ec2.faults import FaultKind, FaultRule
from tools.lab.ec2.state import LaunchInterface


@pytest.fixture
def env() -> Iterator[Ec2Env]:
    with ec2_env() as built:
        yield built


@pytest.fixture
def ec2(env: Ec2Env) -> Any:
    return env.client()


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


def enis_of(ec2: Any, instance_id: str) -> list[dict[str, Any]]:
    pages = ec2.get_paginator("describe_network_interfaces").paginate(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
    )
    return [eni for page in pages for eni in page["NetworkInterfaces"]]


def free_addresses(ec2: Any, subnet_id: str) -> int:
    subnet = ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"][0]
    return int(subnet["AvailableIpAddressCount"])


# -- DescribeInstanceTypes -------------------------------------------------------------


def test_describe_instance_types_gives_p5_network_cards_and_efa(ec2: Any) -> None:
    info = ec2.describe_instance_types(InstanceTypes=["p5.48xlarge"])["InstanceTypes"][0]
    network = info["NetworkInfo"]
    assert network["MaximumNetworkCards"] == 32
    assert network["MaximumNetworkInterfaces"] == 64
    assert network["Ipv4AddressesPerInterface"] == 50
    assert network["EfaSupported"] is True
    assert network["EfaInfo"]["MaximumEfaInterfaces"] == 32
    cards = network["NetworkCards"]
    assert [c["NetworkCardIndex"] for c in cards] == list(range(32))
    assert all(c["MaximumNetworkInterfaces"] == 2 for c in cards)


def test_describe_instance_types_pages_through_the_whole_catalogue(ec2: Any) -> None:
    from ipam.instance_types import catalog

    pages = ec2.get_paginator("describe_instance_types").paginate(
        PaginationConfig={"PageSize": 100}
    )
    names = [t["InstanceType"] for page in pages for t in page["InstanceTypes"]]
    assert len(names) == len(set(names)) == len(catalog())


def test_describe_instance_types_filters_with_wildcards(ec2: Any) -> None:
    found = ec2.describe_instance_types(
        Filters=[
            {"Name": "instance-type", "Values": ["p5*"]},
            {"Name": "network-info.efa-supported", "Values": ["true"]},
        ]
    )["InstanceTypes"]
    names = {t["InstanceType"] for t in found}
    assert "p5.48xlarge" in names
    assert all(n.startswith("p5") for n in names)


def test_unknown_instance_type_is_refused_by_name(ec2: Any) -> None:
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_instance_types(InstanceTypes=["p5.48xlarg"])
    assert error_code(excinfo) == "InvalidInstanceType"
    assert "p5.48xlarg" in str(excinfo.value)


# -- DescribeSubnets and DescribeInstances -----------------------------------------------


def test_subnets_lose_five_addresses_and_answer_tag_filters(env: Ec2Env, ec2: Any) -> None:
    fresh = ec2.describe_subnets(SubnetIds=[env.subnet_ids[1]])["Subnets"][0]
    assert fresh["CidrBlock"] == "100.64.16.0/24"
    assert fresh["AvailableIpAddressCount"] == 256 - 5
    assert fresh["AvailabilityZoneId"] == "usw2-az1"
    tagged = ec2.describe_subnets(
        Filters=[
            {"Name": "vpc-id", "Values": [env.vpc_id]},
            {"Name": "availability-zone", "Values": ["us-west-2a"]},
            {"Name": f"tag:{CNI_TAG}", "Values": ["1"]},
        ]
    )["Subnets"]
    assert sorted(s["SubnetId"] for s in tagged) == sorted(env.subnet_ids[:2])
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_subnets(SubnetIds=["subnet-00000000000000000"])
    assert error_code(excinfo) == "InvalidSubnetID.NotFound"
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_subnets(Filters=[{"Name": "no-such-filter", "Values": ["x"]}])
    assert error_code(excinfo) == "InvalidParameterValue"


def test_describe_instances_shows_the_primary_interface(env: Ec2Env, ec2: Any) -> None:
    reservations = ec2.describe_instances(InstanceIds=[env.instance_id])["Reservations"]
    instance = reservations[0]["Instances"][0]
    assert instance["InstanceType"] == "m5.large"
    assert instance["State"]["Name"] == "running"
    (primary,) = instance["NetworkInterfaces"]
    assert primary["Attachment"]["DeviceIndex"] == 0
    assert primary["Attachment"]["NetworkCardIndex"] == 0
    assert primary["PrivateIpAddress"] == instance["PrivateIpAddress"]
    assert len(primary["Ipv4Prefixes"]) == 1
    by_type = ec2.describe_instances(Filters=[{"Name": "instance-type", "Values": ["m5.*"]}])
    assert [r["Instances"][0]["InstanceId"] for r in by_type["Reservations"]] == [env.instance_id]
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_instances(InstanceIds=["i-00000000000000000"])
    assert error_code(excinfo) == "InvalidInstanceID.NotFound"


# -- CreateNetworkInterface ---------------------------------------------------------------


def test_create_network_interface_with_prefixes_groups_and_tags(env: Ec2Env, ec2: Any) -> None:
    before = free_addresses(ec2, env.subnet_ids[1])
    eni = ec2.create_network_interface(
        SubnetId=env.subnet_ids[1],
        Groups=["sg-1", "sg-2"],
        Description="ultranet pods",
        Ipv4PrefixCount=2,
        TagSpecifications=[
            {"ResourceType": "network-interface", "Tags": [{"Key": "owner", "Value": "ipamd"}]}
        ],
    )["NetworkInterface"]
    assert eni["Status"] == "available"
    assert eni["InterfaceType"] == "interface"
    assert [g["GroupId"] for g in eni["Groups"]] == ["sg-1", "sg-2"]
    assert eni["TagSet"] == [{"Key": "owner", "Value": "ipamd"}]
    (primary,) = eni["PrivateIpAddresses"]
    assert primary["Primary"] is True
    subnet = IPv4Network("100.64.16.0/24")
    prefixes = [IPv4Network(p["Ipv4Prefix"]) for p in eni["Ipv4Prefixes"]]
    assert len(prefixes) == 2
    for prefix in prefixes:
        assert prefix.prefixlen == 28 and prefix.subnet_of(subnet)
    assert free_addresses(ec2, env.subnet_ids[1]) == before - 1 - 2 * 16
    again = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni["NetworkInterfaceId"]])
    assert again["NetworkInterfaces"][0]["Ipv4Prefixes"] == eni["Ipv4Prefixes"]


def test_create_network_interface_with_secondary_addresses(env: Ec2Env, ec2: Any) -> None:
    eni = ec2.create_network_interface(SubnetId=env.subnet_ids[1], SecondaryPrivateIpAddressCount=3)
    addresses = eni["NetworkInterface"]["PrivateIpAddresses"]
    assert [a["Primary"] for a in addresses] == [True, False, False, False]
    assert len({a["PrivateIpAddress"] for a in addresses}) == 4


def test_prefixes_and_addresses_cannot_be_combined(env: Ec2Env, ec2: Any) -> None:
    before = free_addresses(ec2, env.subnet_ids[1])
    with pytest.raises(ClientError) as excinfo:
        ec2.create_network_interface(
            SubnetId=env.subnet_ids[1], Ipv4PrefixCount=1, SecondaryPrivateIpAddressCount=1
        )
    assert error_code(excinfo) == "InvalidParameterCombination"
    eni_id = ec2.create_network_interface(SubnetId=env.subnet_ids[1])["NetworkInterface"][
        "NetworkInterfaceId"
    ]
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=eni_id, Ipv4PrefixCount=1, PrivateIpAddresses=["100.64.16.77"]
        )
    assert error_code(excinfo) == "InvalidParameterCombination"
    assert free_addresses(ec2, env.subnet_ids[1]) == before - 1  # only the second ENI's primary


def test_client_token_makes_create_idempotent(env: Ec2Env, ec2: Any) -> None:
    first = ec2.create_network_interface(SubnetId=env.subnet_ids[1], ClientToken="token-1")
    second = ec2.create_network_interface(SubnetId=env.subnet_ids[1], ClientToken="token-1")
    third = ec2.create_network_interface(SubnetId=env.subnet_ids[1], ClientToken="token-2")
    ids = [r["NetworkInterface"]["NetworkInterfaceId"] for r in (first, second, third)]
    assert ids[0] == ids[1] != ids[2]
    with pytest.raises(ClientError) as excinfo:
        ec2.create_network_interface(
            SubnetId=env.subnet_ids[1], ClientToken="token-1", Description="other"
        )
    assert error_code(excinfo) == "IdempotentParameterMismatch"


def test_efa_only_interfaces_carry_no_ip(env: Ec2Env, ec2: Any) -> None:
    eni = ec2.create_network_interface(SubnetId=env.subnet_ids[1], InterfaceType="efa-only")[
        "NetworkInterface"
    ]
    assert eni["InterfaceType"] == "efa-only"
    assert "PrivateIpAddress" not in eni and eni["PrivateIpAddresses"] == []
    with pytest.raises(ClientError) as excinfo:
        ec2.create_network_interface(
            SubnetId=env.subnet_ids[1], InterfaceType="efa-only", Ipv4PrefixCount=1
        )
    assert error_code(excinfo) == "InvalidParameterCombination"
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4PrefixCount=1
        )
    assert error_code(excinfo) == "InvalidParameterCombination"


def test_create_network_interface_refuses_bad_input(env: Ec2Env, ec2: Any) -> None:
    with pytest.raises(ClientError) as excinfo:
        ec2.create_network_interface(SubnetId="subnet-00000000000000000")
    assert error_code(excinfo) == "InvalidSubnetID.NotFound"
    with pytest.raises(ClientError) as excinfo:
        ec2.create_network_interface(SubnetId=env.subnet_ids[1], InterfaceType="trunk-ish")
    assert error_code(excinfo) == "InvalidParameterValue"
    with pytest.raises(ClientError) as excinfo:
        ec2.create_network_interface(SubnetId=env.subnet_ids[1], PrivateIpAddress="100.64.16.2")
    assert error_code(excinfo) == "InvalidParameterValue"  # the subnet's DNS address
    taken = ec2.create_network_interface(SubnetId=env.subnet_ids[1])["NetworkInterface"]
    with pytest.raises(ClientError) as excinfo:
        ec2.create_network_interface(
            SubnetId=env.subnet_ids[1], PrivateIpAddress=taken["PrivateIpAddress"]
        )
    assert error_code(excinfo) == "InvalidIPAddress.InUse"
    with pytest.raises(ClientError) as excinfo:
        ec2.create_network_interface(SubnetId=env.subnet_ids[1], PrivateIpAddress="100.64.99.9")
    assert error_code(excinfo) == "InvalidParameterValue"  # not in the subnet


# -- Attach, detach, delete ---------------------------------------------------------------


def test_attach_enforces_the_per_card_limit(env: Ec2Env, ec2: Any) -> None:
    def new_eni() -> str:
        created = ec2.create_network_interface(SubnetId=env.subnet_ids[0])
        return str(created["NetworkInterface"]["NetworkInterfaceId"])

    for device in (1, 2):  # m5.large: three interfaces on its one card
        answer = ec2.attach_network_interface(
            NetworkInterfaceId=new_eni(), InstanceId=env.instance_id, DeviceIndex=device
        )
        assert answer["AttachmentId"].startswith("eni-attach-")
        assert answer["NetworkCardIndex"] == 0
    extra = new_eni()
    for device in (1, 3):  # taken, or the next free index as the VPC CNI picks it
        with pytest.raises(ClientError) as excinfo:
            ec2.attach_network_interface(
                NetworkInterfaceId=extra, InstanceId=env.instance_id, DeviceIndex=device
            )
        assert error_code(excinfo) == "AttachmentLimitExceeded"
    with pytest.raises(ClientError) as excinfo:
        ec2.attach_network_interface(
            NetworkInterfaceId=extra, InstanceId=env.instance_id, DeviceIndex=1, NetworkCardIndex=1
        )
    assert error_code(excinfo) == "InvalidParameterValue"  # m5.large has one card
    assert "NetworkCardIndex 1" in str(excinfo.value)
    assert [e["Attachment"]["DeviceIndex"] for e in enis_of(ec2, env.instance_id)] == [0, 1, 2]


def test_attach_refuses_in_use_other_az_and_efa_on_a_non_efa_type(env: Ec2Env, ec2: Any) -> None:
    primary = enis_of(ec2, env.instance_id)[0]["NetworkInterfaceId"]
    with pytest.raises(ClientError) as excinfo:
        ec2.attach_network_interface(
            NetworkInterfaceId=primary, InstanceId=env.instance_id, DeviceIndex=1
        )
    assert error_code(excinfo) == "InvalidNetworkInterface.InUse"
    other_az = ec2.create_network_interface(SubnetId=env.subnet_ids[2])["NetworkInterface"]
    with pytest.raises(ClientError) as excinfo:
        ec2.attach_network_interface(
            NetworkInterfaceId=other_az["NetworkInterfaceId"],
            InstanceId=env.instance_id,
            DeviceIndex=1,
        )
    assert error_code(excinfo) == "InvalidParameterCombination"
    efa = ec2.create_network_interface(SubnetId=env.subnet_ids[0], InterfaceType="efa")
    with pytest.raises(ClientError) as excinfo:
        ec2.attach_network_interface(
            NetworkInterfaceId=efa["NetworkInterface"]["NetworkInterfaceId"],
            InstanceId=env.instance_id,
            DeviceIndex=1,
        )
    assert error_code(excinfo) == "InvalidParameterCombination"


def test_p5_launches_efa_on_every_card_and_enforces_card_limits() -> None:
    launch = (
        LaunchInterface(0, 0),
        LaunchInterface(0, 1, interface_type="efa"),
        *(LaunchInterface(card, 1, interface_type="efa") for card in range(1, 32)),
    )
    with ec2_env("p5.48xlarge", interfaces=launch) as env:
        ec2 = env.client()
        seen = enis_of(ec2, env.instance_id)
        assert len(seen) == 33
        efa = [e for e in seen if e["InterfaceType"] == "efa"]
        assert sorted(e["Attachment"]["NetworkCardIndex"] for e in efa) == list(range(32))
        # An ENA interface fits beside each card's EFA; a third on a card does not.
        second = ec2.create_network_interface(SubnetId=env.subnet_ids[0])["NetworkInterface"]
        ec2.attach_network_interface(
            NetworkInterfaceId=second["NetworkInterfaceId"],
            InstanceId=env.instance_id,
            DeviceIndex=0,
            NetworkCardIndex=5,
        )
        third = ec2.create_network_interface(SubnetId=env.subnet_ids[0])["NetworkInterface"]
        with pytest.raises(ClientError) as excinfo:
            ec2.attach_network_interface(
                NetworkInterfaceId=third["NetworkInterfaceId"],
                InstanceId=env.instance_id,
                DeviceIndex=0,
                NetworkCardIndex=5,
            )
        assert error_code(excinfo) == "AttachmentLimitExceeded"
        # EFAs come with the launch: a running instance takes none, and gives none back.
        late = ec2.create_network_interface(SubnetId=env.subnet_ids[0], InterfaceType="efa")
        with pytest.raises(ClientError) as excinfo:
            ec2.attach_network_interface(
                NetworkInterfaceId=late["NetworkInterface"]["NetworkInterfaceId"],
                InstanceId=env.instance_id,
                DeviceIndex=0,
                NetworkCardIndex=7,
            )
        assert error_code(excinfo) == "IncorrectInstanceState"
        with pytest.raises(ClientError) as excinfo:
            ec2.detach_network_interface(AttachmentId=efa[3]["Attachment"]["AttachmentId"])
        assert error_code(excinfo) == "IncorrectInstanceState"


def test_launch_beyond_the_efa_limit_is_refused_whole() -> None:
    with ec2_env("p5.48xlarge", interfaces=(LaunchInterface(0, 0),)) as env:
        too_many = [
            LaunchInterface(0, 0),
            *(
                LaunchInterface(c, d, interface_type="efa")
                for c in range(17)
                for d in (0, 1)
                if (c, d) != (0, 0)
            ),
        ]
        from tools.lab.ec2.errors import Ec2Error

        enis_before = len(env.cloud.enis())
        with pytest.raises(Ec2Error) as excinfo:
            env.cloud.launch_instance("p5.48xlarge", env.subnet_ids[0], interfaces=too_many)
        assert excinfo.value.code == "AttachmentLimitExceeded"
        assert len(env.cloud.enis()) == enis_before


def test_detach_and_delete_follow_ec2_rules(env: Ec2Env, ec2: Any) -> None:
    primary = enis_of(ec2, env.instance_id)[0]
    with pytest.raises(ClientError) as excinfo:
        ec2.detach_network_interface(AttachmentId=primary["Attachment"]["AttachmentId"])
    assert error_code(excinfo) == "OperationNotPermitted"
    with pytest.raises(ClientError) as excinfo:
        ec2.detach_network_interface(AttachmentId="eni-attach-00000000000000000")
    assert error_code(excinfo) == "InvalidAttachmentID.NotFound"

    before = free_addresses(ec2, env.subnet_ids[0])
    eni = ec2.create_network_interface(SubnetId=env.subnet_ids[0], Ipv4PrefixCount=3)
    eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
    attachment = ec2.attach_network_interface(
        NetworkInterfaceId=eni_id, InstanceId=env.instance_id, DeviceIndex=1
    )["AttachmentId"]
    with pytest.raises(ClientError) as excinfo:
        ec2.delete_network_interface(NetworkInterfaceId=eni_id)
    assert error_code(excinfo) == "InvalidNetworkInterface.InUse"
    ec2.detach_network_interface(AttachmentId=attachment)
    detached = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"]
    assert detached[0]["Status"] == "available" and "Attachment" not in detached[0]
    ec2.delete_network_interface(NetworkInterfaceId=eni_id)
    assert free_addresses(ec2, env.subnet_ids[0]) == before  # its addresses went back
    with pytest.raises(ClientError) as excinfo:
        ec2.delete_network_interface(NetworkInterfaceId=eni_id)
    assert error_code(excinfo) == "InvalidNetworkInterfaceID.NotFound"


# -- Assign and unassign ------------------------------------------------------------------


def test_a_prefix_takes_one_address_slot(env: Ec2Env, ec2: Any) -> None:
    primary = enis_of(ec2, env.instance_id)[0]["NetworkInterfaceId"]
    # m5.large: 10 slots; the primary address and the launch prefix hold two.
    got = ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=8)
    assert len(got["AssignedIpv4Prefixes"]) == 8
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=1)
    assert error_code(excinfo) == "PrivateIpAddressLimitExceeded"
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=primary, SecondaryPrivateIpAddressCount=1
        )
    assert error_code(excinfo) == "PrivateIpAddressLimitExceeded"
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[primary])["NetworkInterfaces"][0]
    assert len(eni["Ipv4Prefixes"]) == 9


def test_assign_and_unassign_addresses_and_prefixes(env: Ec2Env, ec2: Any) -> None:
    eni_id = ec2.create_network_interface(SubnetId=env.subnet_ids[1])["NetworkInterface"][
        "NetworkInterfaceId"
    ]
    named = ec2.assign_private_ip_addresses(
        NetworkInterfaceId=eni_id, Ipv4Prefixes=["100.64.16.32/28"]
    )
    assert named["AssignedIpv4Prefixes"] == [{"Ipv4Prefix": "100.64.16.32/28"}]
    with pytest.raises(ClientError) as excinfo:  # overlaps the one just assigned
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4Prefixes=["100.64.16.32/28"])
    assert error_code(excinfo) == "InvalidParameterValue"
    ips = ec2.assign_private_ip_addresses(
        NetworkInterfaceId=eni_id, PrivateIpAddresses=["100.64.16.100", "100.64.16.101"]
    )
    assert [a["PrivateIpAddress"] for a in ips["AssignedPrivateIpAddresses"]] == [
        "100.64.16.100",
        "100.64.16.101",
    ]
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=0)
    assert error_code(excinfo) == "MissingParameter"

    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    primary = eni["PrivateIpAddress"]
    with pytest.raises(ClientError) as excinfo:
        ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=[primary])
    assert error_code(excinfo) == "InvalidParameterValue"
    with pytest.raises(ClientError) as excinfo:
        ec2.unassign_private_ip_addresses(
            NetworkInterfaceId=eni_id, Ipv4Prefixes=["100.64.16.48/28"]
        )
    assert error_code(excinfo) == "InvalidParameterValue"
    ec2.unassign_private_ip_addresses(
        NetworkInterfaceId=eni_id,
        PrivateIpAddresses=["100.64.16.100"],
        Ipv4Prefixes=["100.64.16.32/28"],
    )
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    assert "Ipv4Prefixes" not in eni
    assert [a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"]] == [primary, "100.64.16.101"]


def test_allow_reassignment_moves_an_address(env: Ec2Env, ec2: Any) -> None:
    first, second = (
        ec2.create_network_interface(SubnetId=env.subnet_ids[1])["NetworkInterface"][
            "NetworkInterfaceId"
        ]
        for _ in range(2)
    )
    ec2.assign_private_ip_addresses(NetworkInterfaceId=first, PrivateIpAddresses=["100.64.16.50"])
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=second, PrivateIpAddresses=["100.64.16.50"]
        )
    assert error_code(excinfo) == "InvalidIPAddress.InUse"
    ec2.assign_private_ip_addresses(
        NetworkInterfaceId=second, PrivateIpAddresses=["100.64.16.50"], AllowReassignment=True
    )
    owners = ec2.describe_network_interfaces(
        Filters=[{"Name": "addresses.private-ip-address", "Values": ["100.64.16.50"]}]
    )["NetworkInterfaces"]
    assert [e["NetworkInterfaceId"] for e in owners] == [second]
    # A request that fails part way moves nothing.
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=first,
            PrivateIpAddresses=["100.64.16.50", "100.64.99.1"],
            AllowReassignment=True,
        )
    assert error_code(excinfo) == "InvalidParameterValue"
    owners = ec2.describe_network_interfaces(
        Filters=[{"Name": "addresses.private-ip-address", "Values": ["100.64.16.50"]}]
    )["NetworkInterfaces"]
    assert [e["NetworkInterfaceId"] for e in owners] == [second]


def fragment(ec2: Any, subnet_id: str, cidr: str, skip: set[IPv4Network]) -> str:
    """Put one address in every /28 of the subnet outside ``skip``; returns the ENI."""
    eni_id = str(
        ec2.create_network_interface(SubnetId=subnet_id)["NetworkInterface"]["NetworkInterfaceId"]
    )
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    primary = IPv4Network(f"{eni['PrivateIpAddress']}/28", strict=False)
    targets = []
    for block in IPv4Network(cidr).subnets(new_prefix=28):
        if block in skip or block == primary:
            continue
        targets.append(str(block.network_address + 5))
    ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=targets)
    return eni_id


def test_listing_an_address_twice_is_refused_and_changes_nothing(env: Ec2Env, ec2: Any) -> None:
    eni_id = ec2.create_network_interface(SubnetId=env.subnet_ids[1])["NetworkInterface"][
        "NetworkInterfaceId"
    ]
    ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=["100.64.16.60"])
    with pytest.raises(ClientError) as excinfo:
        ec2.unassign_private_ip_addresses(
            NetworkInterfaceId=eni_id, PrivateIpAddresses=["100.64.16.60", "100.64.16.60"]
        )
    assert error_code(excinfo) == "InvalidParameterValue"
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=eni_id, Ipv4Prefixes=["100.64.16.64/28", "100.64.16.64/28"]
        )
    assert error_code(excinfo) == "InvalidParameterValue"
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    assert "100.64.16.60" in [a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"]]
    assert "Ipv4Prefixes" not in eni


def test_a_full_subnet_refuses_prefixes_as_ec2_does(env: Ec2Env, ec2: Any) -> None:
    small = env.cloud.create_subnet(env.vpc_id, "100.64.40.0/26", "us-west-2a").subnet_id
    eni = ec2.create_network_interface(SubnetId=small)["NetworkInterface"]
    primary = IPv4Address(eni["PrivateIpAddress"])
    usable = [a for a in IPv4Network("100.64.40.0/26")][4:-1]
    fill = [str(a) for a in usable if a != primary][:-10]  # leave ten addresses free
    ec2.assign_private_ip_addresses(
        NetworkInterfaceId=eni["NetworkInterfaceId"], PrivateIpAddresses=fill
    )
    assert free_addresses(ec2, small) == 10
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=eni["NetworkInterfaceId"], PrivateIpAddresses=[], Ipv4PrefixCount=1
        )
    assert error_code(excinfo) == "InvalidParameterValue"
    assert "sufficient free Ipv4 addresses or prefixes" in str(excinfo.value)


def test_fragmented_subnet_answers_insufficient_cidr_blocks(env: Ec2Env, ec2: Any) -> None:
    fragment(ec2, env.subnet_ids[1], "100.64.16.0/24", skip=set())
    free = free_addresses(ec2, env.subnet_ids[1])
    assert free > 200  # plenty of addresses, no aligned free /28
    eni_id = ec2.create_network_interface(SubnetId=env.subnet_ids[1])["NetworkInterface"][
        "NetworkInterfaceId"
    ]
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=1)
    assert error_code(excinfo) == "InsufficientCidrBlocks"
    assert "100.64.16.0/24" in str(excinfo.value)
    assert free_addresses(ec2, env.subnet_ids[1]) == free - 1  # only the new primary


def test_a_prefix_reservation_cures_fragmentation(env: Ec2Env, ec2: Any) -> None:
    reserved = IPv4Network("100.64.16.64/27")
    made = ec2.create_subnet_cidr_reservation(
        SubnetId=env.subnet_ids[1], Cidr=str(reserved), ReservationType="prefix"
    )["SubnetCidrReservation"]
    assert made["ReservationType"] == "prefix" and made["Cidr"] == str(reserved)
    fragment(ec2, env.subnet_ids[1], "100.64.16.0/24", skip=set(reserved.subnets(new_prefix=28)))
    eni_id = ec2.create_network_interface(SubnetId=env.subnet_ids[1])["NetworkInterface"][
        "NetworkInterfaceId"
    ]
    got = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=2)
    prefixes = {IPv4Network(p["Ipv4Prefix"]) for p in got["AssignedIpv4Prefixes"]}
    assert prefixes == set(reserved.subnets(new_prefix=28))
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=1)
    assert error_code(excinfo) == "InsufficientCidrBlocks"
    listed = ec2.get_subnet_cidr_reservations(SubnetId=env.subnet_ids[1])
    assert [r["Cidr"] for r in listed["SubnetIpv4CidrReservations"]] == [str(reserved)]


def test_explicit_reservations_are_never_auto_assigned(env: Ec2Env, ec2: Any) -> None:
    # Reserve all but one /28 of a /24: automatic picks must all land in that one block.
    open_block = IPv4Network("100.64.16.16/28")
    ec2.create_subnet_cidr_reservation(
        SubnetId=env.subnet_ids[1], Cidr="100.64.16.32/27", ReservationType="explicit"
    )
    ec2.create_subnet_cidr_reservation(
        SubnetId=env.subnet_ids[1], Cidr="100.64.16.64/26", ReservationType="explicit"
    )
    ec2.create_subnet_cidr_reservation(
        SubnetId=env.subnet_ids[1], Cidr="100.64.16.128/25", ReservationType="explicit"
    )
    with pytest.raises(ClientError) as excinfo:  # overlaps an existing reservation
        ec2.create_subnet_cidr_reservation(
            SubnetId=env.subnet_ids[1], Cidr="100.64.16.128/28", ReservationType="prefix"
        )
    assert error_code(excinfo) == "InvalidParameterValue"
    eni = ec2.create_network_interface(SubnetId=env.subnet_ids[1], SecondaryPrivateIpAddressCount=5)
    addresses = [
        IPv4Address(a["PrivateIpAddress"]) for a in eni["NetworkInterface"]["PrivateIpAddresses"]
    ]
    low = IPv4Network("100.64.16.0/28")
    assert all(a in open_block or a in low for a in addresses)
    eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
    with pytest.raises(ClientError) as excinfo:  # the only unreserved block is now in use
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=1)
    assert error_code(excinfo) == "InsufficientCidrBlocks"
    # Naming an address inside an explicit reservation is what it is for.
    ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=["100.64.16.200"])


# -- NAU ------------------------------------------------------------------------------------


def test_nau_counts_attached_interfaces_and_enforces_the_quota(env: Ec2Env, ec2: Any) -> None:
    cloud = env.cloud
    assert cloud.nau_used(env.vpc_id) == 2  # primary ENI: its address and one prefix
    eni_id = ec2.create_network_interface(SubnetId=env.subnet_ids[0], Ipv4PrefixCount=2)[
        "NetworkInterface"
    ]["NetworkInterfaceId"]
    assert cloud.nau_used(env.vpc_id) == 2  # not attached: not counted
    cloud.set_nau_quota(env.vpc_id, 5)
    with pytest.raises(ClientError) as excinfo:  # 1 interface + 1 address + 2 prefixes = 4
        ec2.attach_network_interface(
            NetworkInterfaceId=eni_id, InstanceId=env.instance_id, DeviceIndex=1
        )
    assert error_code(excinfo) == "NetworkAddressUsageLimitExceeded"
    assert enis_of(ec2, env.instance_id)[-1]["Attachment"]["DeviceIndex"] == 0  # nothing changed
    cloud.set_nau_quota(env.vpc_id, 7)
    ec2.attach_network_interface(
        NetworkInterfaceId=eni_id, InstanceId=env.instance_id, DeviceIndex=1
    )
    assert cloud.nau_used(env.vpc_id) == 6
    ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=1)
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=1)
    assert error_code(excinfo) == "NetworkAddressUsageLimitExceeded"
    assert cloud.nau_used(env.vpc_id) == 7


def test_launch_over_the_nau_quota_leaves_nothing_behind(env: Ec2Env) -> None:
    cloud = env.cloud
    cloud.set_nau_quota(env.vpc_id, 10)
    free_before = cloud.subnet(env.subnet_ids[1]).space.stats().free
    enis_before = len(cloud.enis())
    from tools.lab.ec2.errors import Ec2Error

    with pytest.raises(Ec2Error) as excinfo:
        cloud.launch_instance(
            "m5.large",
            env.subnet_ids[1],
            interfaces=[
                LaunchInterface(0, 0, ipv4_prefix_count=4),
                LaunchInterface(0, 1, ipv4_prefix_count=4),
            ],
        )
    assert excinfo.value.code == "NetworkAddressUsageLimitExceeded"
    assert cloud.subnet(env.subnet_ids[1]).space.stats().free == free_before
    assert len(cloud.enis()) == enis_before
    assert len(cloud.instances()) == 1


# -- Tags, attributes, describe filters and pages ---------------------------------------------


def test_tags_and_attribute_changes(env: Ec2Env, ec2: Any) -> None:
    eni_id = ec2.create_network_interface(SubnetId=env.subnet_ids[0])["NetworkInterface"][
        "NetworkInterfaceId"
    ]
    ec2.create_tags(Resources=[eni_id, env.subnet_ids[0]], Tags=[{"Key": "cluster", "Value": "c1"}])
    tagged = ec2.describe_network_interfaces(Filters=[{"Name": "tag:cluster", "Values": ["c*"]}])
    assert [e["NetworkInterfaceId"] for e in tagged["NetworkInterfaces"]] == [eni_id]
    with pytest.raises(ClientError) as excinfo:
        ec2.create_tags(Resources=["eni-00000000000000000"], Tags=[{"Key": "a", "Value": "b"}])
    assert error_code(excinfo) == "InvalidNetworkInterfaceID.NotFound"
    ec2.delete_tags(Resources=[eni_id], Tags=[{"Key": "cluster"}])
    assert (
        ec2.describe_network_interfaces(Filters=[{"Name": "tag-key", "Values": ["cluster"]}])[
            "NetworkInterfaces"
        ]
        == []
    )

    ec2.modify_network_interface_attribute(NetworkInterfaceId=eni_id, Description={"Value": "pods"})
    ec2.modify_network_interface_attribute(
        NetworkInterfaceId=eni_id, SourceDestCheck={"Value": False}
    )
    ec2.modify_network_interface_attribute(NetworkInterfaceId=eni_id, Groups=["sg-9"])
    attachment = ec2.attach_network_interface(
        NetworkInterfaceId=eni_id, InstanceId=env.instance_id, DeviceIndex=1
    )["AttachmentId"]
    ec2.modify_network_interface_attribute(
        NetworkInterfaceId=eni_id,
        Attachment={"AttachmentId": attachment, "DeleteOnTermination": True},
    )
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    assert eni["Description"] == "pods"
    assert eni["SourceDestCheck"] is False
    assert [g["GroupId"] for g in eni["Groups"]] == ["sg-9"]
    assert eni["Attachment"]["DeleteOnTermination"] is True
    with pytest.raises(ClientError) as excinfo:
        ec2.modify_network_interface_attribute(
            NetworkInterfaceId=eni_id, Description={"Value": "x"}, SourceDestCheck={"Value": True}
        )
    assert error_code(excinfo) == "InvalidParameterCombination"


def test_describe_network_interfaces_pages_and_filters(env: Ec2Env, ec2: Any) -> None:
    made = {
        ec2.create_network_interface(SubnetId=env.subnet_ids[1])["NetworkInterface"][
            "NetworkInterfaceId"
        ]
        for _ in range(12)
    }
    pages = list(
        ec2.get_paginator("describe_network_interfaces").paginate(
            Filters=[{"Name": "status", "Values": ["available"]}],
            PaginationConfig={"PageSize": 5},
        )
    )
    assert [len(p["NetworkInterfaces"]) for p in pages] == [5, 5, 2]
    assert {e["NetworkInterfaceId"] for p in pages for e in p["NetworkInterfaces"]} == made
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_network_interfaces(NetworkInterfaceIds=sorted(made)[:2], MaxResults=5)
    assert error_code(excinfo) == "InvalidParameterCombination"
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_network_interfaces(MaxResults=5, NextToken="not-a-token")
    assert error_code(excinfo) == "InvalidParameterValue"
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_network_interfaces(NetworkInterfaceIds=["eni-00000000000000000"])
    assert error_code(excinfo) == "InvalidNetworkInterfaceID.NotFound"


# -- Faults, the request log, and the wire ------------------------------------------------------


def test_throttling_is_retried_by_boto3_and_counted(env: Ec2Env) -> None:
    env.cloud.faults.throttle_next(2, "DescribeSubnets")
    patient = env.client(retries=3)
    env.cloud.requests.clear()
    patient.describe_subnets(SubnetIds=[env.subnet_ids[0]])
    assert env.cloud.requests.counts()["DescribeSubnets"] == 3
    env.cloud.faults.throttle_next(1, "DescribeSubnets")
    with pytest.raises(ClientError) as excinfo:
        env.client(retries=1).describe_subnets()
    assert error_code(excinfo) == "RequestLimitExceeded"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    errors = [r.error_code for r in env.cloud.requests.records()]
    assert errors == [
        "RequestLimitExceeded",
        "RequestLimitExceeded",
        None,
        "RequestLimitExceeded",
    ]


def test_transient_server_errors(env: Ec2Env, ec2: Any) -> None:
    env.cloud.faults.add(FaultRule(FaultKind.INTERNAL, "DescribeInstances", count=1))
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_instances()
    assert error_code(excinfo) == "InternalError"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert ec2.describe_instances()["Reservations"]  # the fault was for one call
    env.cloud.faults.add(FaultRule(FaultKind.UNAVAILABLE, count=1))
    with pytest.raises(ClientError) as excinfo:
        ec2.describe_subnets()
    assert error_code(excinfo) == "Unavailable"


def test_token_bucket_throttles_like_ec2(env: Ec2Env, ec2: Any) -> None:
    env.cloud.faults.rate_limit("DescribeNetworkInterfaces", rate_per_s=2.0, burst=3)
    answered = 0
    for _ in range(5):
        try:
            ec2.describe_network_interfaces()
            answered += 1
        except ClientError as err:
            assert err.response["Error"]["Code"] == "RequestLimitExceeded"
    assert answered == 3  # the burst, then nothing until the bucket refills
    ec2.describe_subnets()  # other actions have their own bucket (none here)
    env.clock.advance(1.0)  # two tokens back
    ec2.describe_network_interfaces()
    ec2.describe_network_interfaces()
    with pytest.raises(ClientError):
        ec2.describe_network_interfaces()
