"""IPv6 in the EC2 emulator, through boto3 over HTTP: VPC /56, subnet /64, /128 addresses and
/80 prefixes on interfaces, launch-time prefixes, limits, errors and NAU."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv6Address, IPv6Network
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.lab.ec2env import Ec2Env, ec2_env

UNIQUE_LOCAL = IPv6Network("fd00::/8")


@pytest.fixture
def env() -> Iterator[Ec2Env]:
    with ec2_env() as built:
        yield built


@pytest.fixture
def ec2(env: Ec2Env) -> Any:
    return env.client()


def code_of(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


def give_vpc_ipv6(ec2: Any, env: Ec2Env) -> IPv6Network:
    answer = ec2.associate_vpc_cidr_block(VpcId=env.vpc_id, AmazonProvidedIpv6CidrBlock=True)
    return IPv6Network(answer["Ipv6CidrBlockAssociation"]["Ipv6CidrBlock"])


def give_subnet_ipv6(ec2: Any, subnet_id: str, block: IPv6Network, index: int) -> IPv6Network:
    wanted = list(block.subnets(new_prefix=64))[index]
    answer = ec2.associate_subnet_cidr_block(SubnetId=subnet_id, Ipv6CidrBlock=str(wanted))
    return IPv6Network(answer["Ipv6CidrBlockAssociation"]["Ipv6CidrBlock"])


@pytest.fixture
def dual(env: Ec2Env, ec2: Any) -> tuple[IPv6Network, IPv6Network]:
    """The env's VPC with a /56 and its first subnet with a /64, set up through boto3."""
    vpc_block = give_vpc_ipv6(ec2, env)
    return vpc_block, give_subnet_ipv6(ec2, env.subnet_ids[0], vpc_block, 1)


def test_vpc_gets_a_unique_local_56(env: Ec2Env, ec2: Any) -> None:
    answer = ec2.associate_vpc_cidr_block(VpcId=env.vpc_id, AmazonProvidedIpv6CidrBlock=True)
    association = answer["Ipv6CidrBlockAssociation"]
    block = IPv6Network(association["Ipv6CidrBlock"])
    assert block.prefixlen == 56 and block.subnet_of(UNIQUE_LOCAL)
    assert association["Ipv6CidrBlockState"]["State"] == "associated"
    assert association["AssociationId"].startswith("vpc-cidr-assoc-")
    vpc = ec2.describe_vpcs(VpcIds=[env.vpc_id])["Vpcs"][0]
    assert [a["Ipv6CidrBlock"] for a in vpc["Ipv6CidrBlockAssociationSet"]] == [str(block)]
    found = ec2.describe_vpcs(
        Filters=[{"Name": "ipv6-cidr-block-association.ipv6-cidr-block", "Values": [str(block)]}]
    )["Vpcs"]
    assert [v["VpcId"] for v in found] == [env.vpc_id]


def test_vpc_block_named_must_be_unique_local_56(env: Ec2Env, ec2: Any) -> None:
    for bad in ("2600:1f14:abc:de00::/56", "fd12:3456:789a:1000::/52"):
        with pytest.raises(ClientError) as excinfo:
            ec2.associate_vpc_cidr_block(VpcId=env.vpc_id, Ipv6CidrBlock=bad, Ipv6Pool="lab")
        assert code_of(excinfo) == "InvalidParameterValue", bad
    answer = ec2.associate_vpc_cidr_block(
        VpcId=env.vpc_id, Ipv6CidrBlock="fd12:3456:789a:1000::/56", Ipv6Pool="lab"
    )
    assert answer["Ipv6CidrBlockAssociation"]["Ipv6CidrBlock"] == "fd12:3456:789a:1000::/56"
    with pytest.raises(ClientError) as excinfo:
        ec2.associate_vpc_cidr_block(VpcId=env.vpc_id)
    assert code_of(excinfo) == "MissingParameter"


def test_subnet_gets_a_64_of_the_vpc_block(env: Ec2Env, ec2: Any) -> None:
    vpc_block = give_vpc_ipv6(ec2, env)
    with pytest.raises(ClientError) as excinfo:
        ec2.associate_subnet_cidr_block(SubnetId=env.subnet_ids[0], Ipv6CidrBlock="fd99:1:2:3::/64")
    assert code_of(excinfo) == "InvalidSubnet.Range"
    subnet_block = give_subnet_ipv6(ec2, env.subnet_ids[0], vpc_block, 3)
    assert subnet_block.prefixlen == 64 and subnet_block.subnet_of(vpc_block)
    with pytest.raises(ClientError) as excinfo:
        give_subnet_ipv6(ec2, env.subnet_ids[1], vpc_block, 3)
    assert code_of(excinfo) == "InvalidSubnet.Conflict"
    subnet = ec2.describe_subnets(SubnetIds=[env.subnet_ids[0]])["Subnets"][0]
    (association,) = subnet["Ipv6CidrBlockAssociationSet"]
    assert association["Ipv6CidrBlock"] == str(subnet_block)
    assert association["Ipv6CidrBlockState"]["State"] == "associated"
    assert subnet["AssignIpv6AddressOnCreation"] is False
    found = ec2.describe_subnets(
        Filters=[
            {"Name": "ipv6-cidr-block-association.ipv6-cidr-block", "Values": [str(subnet_block)]}
        ]
    )["Subnets"]
    assert [s["SubnetId"] for s in found] == [env.subnet_ids[0]]


def test_assign_and_unassign_ipv6_prefixes(
    env: Ec2Env, ec2: Any, dual: tuple[IPv6Network, IPv6Network]
) -> None:
    _, subnet_block = dual
    eni_id = env.cloud.enis_of(env.instance_id)[0].eni_id
    answer = ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=2)
    prefixes = [IPv6Network(p) for p in answer["AssignedIpv6Prefixes"]]
    assert len(prefixes) == 2 and len(set(prefixes)) == 2
    assert all(p.prefixlen == 80 and p.subnet_of(subnet_block) for p in prefixes)
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    assert sorted(p["Ipv6Prefix"] for p in eni["Ipv6Prefixes"]) == sorted(map(str, prefixes))
    gone = ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=[str(prefixes[0])])
    assert gone["UnassignedIpv6Prefixes"] == [str(prefixes[0])]
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    assert [p["Ipv6Prefix"] for p in eni["Ipv6Prefixes"]] == [str(prefixes[1])]
    # The freed /80 can be named again; one in use cannot.
    again = ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=[str(prefixes[0])])
    assert again["AssignedIpv6Prefixes"] == [str(prefixes[0])]
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=[str(prefixes[1])])
    assert code_of(excinfo) == "InvalidParameterValue"


def test_assign_and_unassign_ipv6_addresses(
    env: Ec2Env, ec2: Any, dual: tuple[IPv6Network, IPv6Network]
) -> None:
    _, subnet_block = dual
    eni_id = env.cloud.enis_of(env.instance_id)[0].eni_id
    answer = ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6AddressCount=3)
    addresses = [IPv6Address(a) for a in answer["AssignedIpv6Addresses"]]
    assert len(set(addresses)) == 3 and all(a in subnet_block for a in addresses)
    named = str(subnet_block.network_address + 0x1234)
    ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Addresses=[named])
    eni = ec2.describe_network_interfaces(
        Filters=[{"Name": "ipv6-addresses.ipv6-address", "Values": [named]}]
    )["NetworkInterfaces"]
    assert [e["NetworkInterfaceId"] for e in eni] == [eni_id]
    listed = [a["Ipv6Address"] for a in eni[0]["Ipv6Addresses"]]
    assert listed == [*map(str, addresses), named]
    with pytest.raises(ClientError) as excinfo:  # AWS's own first four
        ec2.assign_ipv6_addresses(
            NetworkInterfaceId=eni_id, Ipv6Addresses=[str(subnet_block.network_address + 2)]
        )
    assert code_of(excinfo) == "InvalidParameterValue"
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Addresses=[named])
    assert code_of(excinfo) == "InvalidIPAddress.InUse"
    with pytest.raises(ClientError) as excinfo:
        ec2.unassign_ipv6_addresses(
            NetworkInterfaceId=eni_id, Ipv6Addresses=[named, str(subnet_block.network_address + 9)]
        )
    assert code_of(excinfo) == "InvalidParameterValue"
    gone = ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Addresses=[named])
    assert gone["UnassignedIpv6Addresses"] == [named]


def test_ipv6_request_errors(env: Ec2Env, ec2: Any, dual: tuple[IPv6Network, IPv6Network]) -> None:
    eni_id = env.cloud.enis_of(env.instance_id)[0].eni_id
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "MissingParameter"),
        ({"Ipv6PrefixCount": 1, "Ipv6AddressCount": 1}, "InvalidParameterCombination"),
        ({"Ipv6PrefixCount": 1, "Ipv6Prefixes": ["fd00::/80"]}, "InvalidParameterCombination"),
        ({"Ipv6Prefixes": ["fd00::/64"]}, "InvalidParameterValue"),  # not a /80
        ({"Ipv6Prefixes": ["fd77::/80"]}, "InvalidParameterValue"),  # not in the subnet
        ({"Ipv6Addresses": ["not-an-address"]}, "InvalidParameterValue"),
        # m5.large: 10 IPv6 addresses per interface; each prefix takes one of them.
        ({"Ipv6PrefixCount": 11}, "InvalidParameterValue"),
    ]
    for kwargs, code in cases:
        with pytest.raises(ClientError) as excinfo:
            ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, **kwargs)
        assert code_of(excinfo) == code, kwargs
    assert env.cloud.eni(eni_id).ipv6_slots_used == 0  # nothing half-done
    ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=4)
    ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6AddressCount=6)
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6AddressCount=1)
    assert code_of(excinfo) == "InvalidParameterValue"
    assert "exceed" in excinfo.value.response["Error"]["Message"]


def test_ipv6_needs_a_subnet_block(env: Ec2Env, ec2: Any) -> None:
    eni_id = env.cloud.enis_of(env.instance_id)[0].eni_id
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)
    assert code_of(excinfo) == "InvalidParameterValue"
    assert "no IPv6 CIDR block" in excinfo.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as excinfo:
        ec2.modify_subnet_attribute(
            SubnetId=env.subnet_ids[0], AssignIpv6AddressOnCreation={"Value": True}
        )
    assert code_of(excinfo) == "InvalidParameterValue"


def test_create_interface_with_ipv6_and_delete_returns_it(
    env: Ec2Env, ec2: Any, dual: tuple[IPv6Network, IPv6Network]
) -> None:
    eni = ec2.create_network_interface(SubnetId=env.subnet_ids[0], Ipv6PrefixCount=1)[
        "NetworkInterface"
    ]
    (prefix,) = [p["Ipv6Prefix"] for p in eni["Ipv6Prefixes"]]
    assert eni["Ipv6Addresses"] == []
    ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"])
    other = ec2.create_network_interface(
        SubnetId=env.subnet_ids[0], Ipv6Prefixes=[{"Ipv6Prefix": prefix}]
    )["NetworkInterface"]
    assert [p["Ipv6Prefix"] for p in other["Ipv6Prefixes"]] == [prefix]


def test_assign_on_creation_gives_each_new_interface_one_address(
    env: Ec2Env, ec2: Any, dual: tuple[IPv6Network, IPv6Network]
) -> None:
    ec2.modify_subnet_attribute(
        SubnetId=env.subnet_ids[0], AssignIpv6AddressOnCreation={"Value": True}
    )
    subnet = ec2.describe_subnets(SubnetIds=[env.subnet_ids[0]])["Subnets"][0]
    assert subnet["AssignIpv6AddressOnCreation"] is True
    eni = ec2.create_network_interface(SubnetId=env.subnet_ids[0])["NetworkInterface"]
    assert len(eni["Ipv6Addresses"]) == 1
    # Ipv6AddressCount=0 overrides the subnet's setting (API reference, CreateNetworkInterface).
    bare = ec2.create_network_interface(SubnetId=env.subnet_ids[0], Ipv6AddressCount=0)
    assert bare["NetworkInterface"]["Ipv6Addresses"] == []


def ipv6_launch(ec2: Any, subnet_id: str, instance_type: str, **extra: Any) -> dict[str, Any]:
    """RunInstances as an EKS IPv6 launch template asks: one /80 on the primary interface."""
    spec = {"DeviceIndex": 0, "NetworkCardIndex": 0, "SubnetId": subnet_id, "Ipv6PrefixCount": 1}
    answer = ec2.run_instances(
        InstanceType=instance_type,
        MinCount=1,
        MaxCount=1,
        NetworkInterfaces=[{**spec, **extra}],
    )
    instance: dict[str, Any] = answer["Instances"][0]
    return instance


def test_launch_with_an_ipv6_prefix(
    env: Ec2Env, ec2: Any, dual: tuple[IPv6Network, IPv6Network]
) -> None:
    _, subnet_block = dual
    ec2.modify_subnet_attribute(
        SubnetId=env.subnet_ids[0], AssignIpv6AddressOnCreation={"Value": True}
    )
    instance = ipv6_launch(ec2, env.subnet_ids[0], "m5.large")
    (primary,) = instance["NetworkInterfaces"]
    (prefix,) = [IPv6Network(p["Ipv6Prefix"]) for p in primary["Ipv6Prefixes"]]
    (address,) = [IPv6Address(a["Ipv6Address"]) for a in primary["Ipv6Addresses"]]
    assert prefix.prefixlen == 80 and prefix.subnet_of(subnet_block)
    assert address in subnet_block and address not in prefix
    found = ec2.describe_instances(
        Filters=[{"Name": "network-interface.ipv6-prefixes.ipv6-prefix", "Values": [str(prefix)]}]
    )["Reservations"]
    assert [r["Instances"][0]["InstanceId"] for r in found] == [instance["InstanceId"]]


def test_launch_refuses_ipv6_on_a_subnet_without_it_and_leaves_nothing(
    env: Ec2Env, ec2: Any
) -> None:
    before = len(env.cloud.enis())
    with pytest.raises(ClientError) as excinfo:
        ipv6_launch(ec2, env.subnet_ids[0], "m5.large")
    assert code_of(excinfo) == "InvalidParameterValue"
    assert len(env.cloud.enis()) == before
    assert len(env.cloud.instances()) == 1


def test_ipv6_prefixes_need_a_nitro_type(
    env: Ec2Env, ec2: Any, dual: tuple[IPv6Network, IPv6Network]
) -> None:
    with pytest.raises(ClientError) as excinfo:
        ipv6_launch(ec2, env.subnet_ids[0], "m4.large")
    assert code_of(excinfo) == "InvalidParameterValue"
    assert "Nitro" in excinfo.value.response["Error"]["Message"]


def test_nau_counts_each_ipv6_address_and_prefix(
    env: Ec2Env, ec2: Any, dual: tuple[IPv6Network, IPv6Network]
) -> None:
    eni_id = env.cloud.enis_of(env.instance_id)[0].eni_id
    before = env.cloud.nau_used(env.vpc_id)
    ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=2)
    assert env.cloud.nau_used(env.vpc_id) == before + 2
    ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6AddressCount=3)
    assert env.cloud.nau_used(env.vpc_id) == before + 5
    env.cloud.set_nau_quota(env.vpc_id, before + 5)
    with pytest.raises(ClientError) as excinfo:
        ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)
    assert code_of(excinfo) == "NetworkAddressUsageLimitExceeded"
    # An unattached interface's IPv6 is not counted (nor is its IPv4).
    ec2.create_network_interface(SubnetId=env.subnet_ids[0], Ipv6PrefixCount=3)
    assert env.cloud.nau_used(env.vpc_id) == before + 5


def test_faults_reach_the_ipv6_calls_before_the_state(
    env: Ec2Env, dual: tuple[IPv6Network, IPv6Network]
) -> None:
    """A throttled AssignIpv6Addresses changes nothing, as on EC2; the retry then succeeds."""
    ec2 = env.client(retries=3)  # boto3's standard retry mode, as the node agent's client
    eni_id = env.cloud.enis_of(env.instance_id)[0].eni_id
    env.cloud.faults.throttle_next(2, "AssignIpv6Addresses")
    answer = ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)
    assert len(answer["AssignedIpv6Prefixes"]) == 1
    assert len(env.cloud.eni(eni_id).ipv6_prefixes) == 1  # one /80, not three
    counts = env.cloud.requests.counts()
    assert counts["AssignIpv6Addresses"] == 3
