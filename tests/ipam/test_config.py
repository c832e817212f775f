"""ipamd configuration: the VPC CNI's knob names, strict parsing, file then environment."""

from __future__ import annotations

import dataclasses
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path

import pytest

from ipam.config import KNOBS, BindAddress, IpamdConfig, load_config
from ipam.errors import ConfigError
from ipam.warm import WarmTargets


def test_defaults() -> None:
    config = load_config({})
    assert config == IpamdConfig()
    assert config.warm_prefix_target == 1  # what the shipped aws-k8s-cni.yaml sets
    assert config.warm_ip_target is None and config.minimum_ip_target is None
    assert config.max_eni is None and config.max_pods is None
    assert config.ip_cooldown_period == 30
    assert config.enable_multi_nic is False
    assert config.socket == Path("/run/ultranet/ipamd.sock")
    assert config.state_dir == Path("/var/lib/ultranet")
    assert str(config.metrics_addr) == "127.0.0.1:61678"
    assert str(config.introspection_addr) == "127.0.0.1:61679"
    assert config.imds_endpoint == "http://169.254.169.254"
    assert config.ec2_endpoint is None
    assert (config.ec2_rate, config.ec2_burst) == (5.0, 10)
    assert config.subnet_tag == "kubernetes.io/role/cni"
    assert set(config.sources) == set()


def test_every_field_has_a_knob() -> None:
    fields = {f.name for f in dataclasses.fields(IpamdConfig)} - {"sources"}
    assert fields == {k.field for k in KNOBS.values() if k.field is not None}


def test_every_knob_parsed_from_the_environment() -> None:
    env = {
        "WARM_PREFIX_TARGET": "2",
        "WARM_IP_TARGET": "16",
        "MINIMUM_IP_TARGET": "100",
        "MAX_ENI": "3",
        "IP_COOLDOWN_PERIOD": "0",
        "ENABLE_MULTI_NIC": "true",
        "ENABLE_IPv4": "false",
        "ENABLE_IPv6": "true",
        "ENABLE_V4_EGRESS": "false",
        "ULTRANET_V4_EGRESS_RANGE": "198.18.4.0/22",
        "ENABLE_PREFIX_DELEGATION": "true",
        "WARM_ENI_TARGET": "1",
        "MAX_PODS": "250",
        "ULTRANET_SOCKET": "/run/u/i.sock",
        "ULTRANET_CNI_SOCKET": "/run/u/c.sock",
        "ULTRANET_CNI_SPOOL": "/tmp/spool",
        "ULTRANET_STATE_DIR": "/tmp/state",
        "ULTRANET_METRICS_ADDR": "0.0.0.0:9100",
        "ULTRANET_INTROSPECTION_ADDR": "[::1]:0",
        "ULTRANET_IMDS_ENDPOINT": "http://[fd00:ec2::254]/",
        "ULTRANET_EC2_ENDPOINT": "https://127.0.0.1:4566",
        "ULTRANET_EC2_RATE": "0.5",
        "ULTRANET_EC2_BURST": "3",
        "ULTRANET_SUBNET_TAG": "ultranet.io/pods",
        "ULTRANET_STRAY_SWEEP_INTERVAL": "5",
        "ULTRANET_CNI_CONF_DIR": "/host/etc/cni/net.d",
        "AWS_VPC_ENI_MTU": "1500",
        "AWS_VPC_K8S_CNI_EXTERNALSNAT": "true",
        "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": "198.19.0.0/24",
        "AWS_VPC_K8S_CNI_RANDOMIZESNAT": "none",
        "AWS_VPC_K8S_CNI_CONNMARK": "0x100",
        "AWS_VPC_CNI_NODE_PORT_SUPPORT": "false",
        "AWS_VPC_K8S_CNI_VETHPREFIX": "pod",
        "PATH": "/usr/bin",  # unknown environment variables are ignored
        "WARM_PREFIX_TARGETS": "junk",
    }
    config = load_config(env)
    assert config == IpamdConfig(
        warm_prefix_target=2,
        warm_ip_target=16,
        minimum_ip_target=100,
        max_eni=3,
        ip_cooldown_period=0,
        enable_multi_nic=True,
        enable_ipv4=False,
        enable_ipv6=True,
        enable_v4_egress=False,
        v4_egress_range=IPv4Network("198.18.4.0/22"),
        max_pods=250,
        warm_eni_target=1,
        socket=Path("/run/u/i.sock"),
        cni_socket=Path("/run/u/c.sock"),
        cni_spool=Path("/tmp/spool"),
        state_dir=Path("/tmp/state"),
        metrics_addr=BindAddress(IPv4Address("0.0.0.0"), 9100),
        introspection_addr=BindAddress(IPv6Address("::1"), 0),
        imds_endpoint="http://[fd00:ec2::254]",
        ec2_endpoint="https://127.0.0.1:4566",
        ec2_rate=0.5,
        ec2_burst=3,
        subnet_tag="ultranet.io/pods",
        stray_sweep_interval=5,
        cni_conf_dir=Path("/host/etc/cni/net.d"),
        pod_mtu=1500,
        external_snat=True,
        exclude_snat_cidrs=(IPv4Network("198.19.0.0/24"),),
        randomize_snat="none",
        connmark=0x100,
        node_port_support=False,
        veth_prefix="pod",
    )
    assert set(config.sources) == set(KNOBS)
    assert set(config.sources.values()) == {"env"}
    assert config.warm_targets() == WarmTargets(2, 16, 100, 250)


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KNOBS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WARM_PREFIX_TARGET", "4")
    assert load_config().warm_prefix_target == 4


BOOLS = [("1", True), ("t", True), ("T", True), ("TRUE", True), ("true", True), ("True", True)]
BOOLS += [("0", False), ("f", False), ("F", False), ("FALSE", False), ("false", False)]
BOOLS += [("False", False)]


@pytest.mark.parametrize(("text", "expected"), BOOLS)
def test_booleans_are_strconv_parsebool(text: str, expected: bool) -> None:
    assert load_config({"ENABLE_MULTI_NIC": text}).enable_multi_nic is expected


@pytest.mark.parametrize(
    ("name", "text", "field", "expected"),
    [
        ("WARM_IP_TARGET", "0", "warm_ip_target", None),  # 0 means unset
        ("MINIMUM_IP_TARGET", "0", "minimum_ip_target", None),
        ("WARM_PREFIX_TARGET", "0", "warm_prefix_target", 0),
        ("WARM_PREFIX_TARGET", "+5", "warm_prefix_target", 5),  # strconv.Atoi allows a sign
        ("WARM_PREFIX_TARGET", "007", "warm_prefix_target", 7),
        ("WARM_PREFIX_TARGET", "", "warm_prefix_target", 1),  # empty means not given
        ("MAX_ENI", "-1", "max_eni", None),
        ("MAX_ENI", "1", "max_eni", 1),
        ("ENABLE_PREFIX_DELEGATION", "1", "warm_prefix_target", 1),
        ("ULTRANET_EC2_RATE", "20", "ec2_rate", 20.0),
        ("ULTRANET_EC2_RATE", ".25", "ec2_rate", 0.25),
        (
            "ULTRANET_IMDS_ENDPOINT",
            "http://127.0.0.1:8080/",
            "imds_endpoint",
            "http://127.0.0.1:8080",
        ),
        ("ULTRANET_EC2_ENDPOINT", "", "ec2_endpoint", None),
    ],
)
def test_values(name: str, text: str, field: str, expected: object) -> None:
    assert getattr(load_config({name: text}), field) == expected


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("ENABLE_MULTI_NIC", "yes", "not a boolean"),
        ("AWS_VPC_ENI_MTU", "575", "must be 576..9001"),
        ("AWS_VPC_ENI_MTU", "9002", "must be 576..9001"),
        ("AWS_VPC_ENI_MTU", "jumbo", "not a base-10 integer"),
        ("ULTRANET_CNI_CONF_DIR", "etc/cni/net.d", "must be an absolute path"),
        ("ENABLE_MULTI_NIC", "tRUE", "not a boolean"),
        ("ENABLE_MULTI_NIC", " true", "not a boolean"),
        ("WARM_PREFIX_TARGET", "1.5", "not a base-10 integer"),
        ("WARM_PREFIX_TARGET", " 1", "not a base-10 integer"),
        ("WARM_PREFIX_TARGET", "1_000", "not a base-10 integer"),
        ("WARM_PREFIX_TARGET", "0x10", "not a base-10 integer"),
        ("WARM_PREFIX_TARGET", "\u0661", "not a base-10 integer"),  # an Arabic-Indic digit
        ("WARM_PREFIX_TARGET", "9" * 5000, "integer too large"),
        ("WARM_PREFIX_TARGET", "-1", "must not be negative"),
        ("WARM_IP_TARGET", "-3", "must not be negative"),
        ("MINIMUM_IP_TARGET", "-100", "must not be negative"),
        ("IP_COOLDOWN_PERIOD", "-1", "must not be negative"),
        ("WARM_ENI_TARGET", "-1", "must not be negative"),
        ("MAX_ENI", "0", "at least 1 (the primary ENI), or -1"),
        ("MAX_ENI", "-2", "at least 1 (the primary ENI), or -1"),
        ("MAX_ENI", "many", "not a base-10 integer"),
        ("MAX_PODS", "0", "must be at least 1"),
        ("ULTRANET_EC2_BURST", "0", "must be at least 1"),
        ("ULTRANET_EC2_RATE", "0", "must be greater than 0"),
        ("ULTRANET_EC2_RATE", "-1", "not a decimal number"),
        ("ULTRANET_EC2_RATE", "nan", "not a decimal number"),
        ("ULTRANET_EC2_RATE", "1e3", "not a decimal number"),
        ("ENABLE_PREFIX_DELEGATION", "false", "prefix-delegation mode only"),
        ("ENABLE_PREFIX_DELEGATION", "0", "prefix-delegation mode only"),
        ("ENABLE_PREFIX_DELEGATION", "no", "not a boolean"),
        ("ULTRANET_SOCKET", "ipamd.sock", "must be an absolute path"),
        ("ULTRANET_SOCKET", "/run/" + "s" * 110, "unix socket"),
        ("ULTRANET_STATE_DIR", "var/lib", "must be an absolute path"),
        ("ULTRANET_METRICS_ADDR", "localhost:61678", "is not an IP address"),
        ("ULTRANET_METRICS_ADDR", "127.0.0.1", "expected HOST:PORT"),
        ("ULTRANET_METRICS_ADDR", "::1:61678", "needs brackets"),
        ("ULTRANET_METRICS_ADDR", "[::1]61678", "expected HOST:PORT"),
        ("ULTRANET_METRICS_ADDR", "127.0.0.1:70000", "not a number in 0-65535"),
        ("ULTRANET_INTROSPECTION_ADDR", "127.0.0.1:x", "port 'x' is not a number"),
        ("ULTRANET_INTROSPECTION_ADDR", "127.0.0.1:-1", "port '-1' is not a number"),
        ("ULTRANET_IMDS_ENDPOINT", "169.254.169.254", "http:// or https://"),
        ("ULTRANET_IMDS_ENDPOINT", "ftp://169.254.169.254", "http:// or https://"),
        ("ULTRANET_EC2_ENDPOINT", "http://ec2:99999", "not a URL"),
        ("ULTRANET_EC2_ENDPOINT", "https://ec2/?Action=x", "query or fragment"),
        ("ULTRANET_SUBNET_TAG", " kubernetes.io/role/cni", "EC2 tag key"),
        ("ULTRANET_SUBNET_TAG", "k" * 129, "EC2 tag key"),
    ],
)
def test_bad_values_name_the_knob(name: str, text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({name: text})
    error = info.value
    assert (error.field, error.value) == (name, text)
    assert reason in error.reason
    assert str(error).startswith(f"{name}=")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_json_file(tmp_path: Path) -> None:
    body = {
        "WARM_PREFIX_TARGET": 0,
        "MINIMUM_IP_TARGET": "64",
        "MAX_ENI": -1,
        "ENABLE_MULTI_NIC": True,
        "ULTRANET_EC2_RATE": 2.5,
        "ULTRANET_EC2_ENDPOINT": None,  # null means not given
        "ULTRANET_SOCKET": "/run/x.sock",
    }
    config = load_config({}, write(tmp_path, "ipamd.json", json.dumps(body)))
    assert (config.warm_prefix_target, config.minimum_ip_target, config.max_eni) == (0, 64, None)
    assert config.enable_multi_nic is True
    assert config.ec2_rate == 2.5
    assert config.socket == Path("/run/x.sock")
    assert config.sources["MAX_ENI"] == "file"
    assert "ULTRANET_EC2_ENDPOINT" not in config.sources


@pytest.mark.parametrize("name", ["ipamd.yaml", "ipamd.yml", "IPAMD.YAML"])
def test_yaml_file(tmp_path: Path, name: str) -> None:
    text = """\
# copied from the aws-node DaemonSet
WARM_PREFIX_TARGET: 2
WARM_ENI_TARGET: 1
IP_COOLDOWN_PERIOD: "45"
ENABLE_MULTI_NIC: false
ULTRANET_METRICS_ADDR: "[::]:61678"
ULTRANET_EC2_BURST: 20
"""
    config = load_config({}, write(tmp_path, name, text))
    assert config.warm_prefix_target == 2
    assert config.warm_eni_target == 1
    assert config.ip_cooldown_period == 45
    assert config.enable_multi_nic is False
    assert config.metrics_addr == BindAddress(IPv6Address("::"), 61678)
    assert config.ec2_burst == 20


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config({}, write(tmp_path, "ipamd.yaml", "# nothing\n")) == IpamdConfig()


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "ipamd.yaml", "WARM_PREFIX_TARGET: 2\nWARM_IP_TARGET: 16\nMAX_PODS: 9\n")
    env = {"WARM_PREFIX_TARGET": "3", "WARM_IP_TARGET": "0", "MAX_PODS": ""}
    config = load_config(env, path)
    assert config.warm_prefix_target == 3  # env wins
    assert config.warm_ip_target is None  # env 0 unsets what the file set
    assert config.max_pods == 9  # an empty env value does not hide the file's
    assert dict(config.sources) == {
        "WARM_PREFIX_TARGET": "env",
        "WARM_IP_TARGET": "env",
        "MAX_PODS": "file",
    }


def test_bad_file_value_is_an_error_even_when_env_overrides_it(tmp_path: Path) -> None:
    path = write(tmp_path, "ipamd.json", '{"WARM_PREFIX_TARGET": -1}')
    with pytest.raises(ConfigError, match="WARM_PREFIX_TARGET='-1': must not be negative"):
        load_config({"WARM_PREFIX_TARGET": "1"}, path)


@pytest.mark.parametrize(
    ("name", "text", "field", "reason"),
    [
        (
            "a.json",
            '{"WARM_PREFIX_TARGT": 1}',
            "WARM_PREFIX_TARGT",
            "did you mean WARM_PREFIX_TARGET?",
        ),
        ("a.yaml", "warm_ip_target: 5\n", "warm_ip_target", "did you mean WARM_IP_TARGET?"),
        ("a.yaml", "AWS_VPC_K8S_CNI_LOGLEVEL: DEBUG\n", "AWS_VPC_K8S_CNI_LOGLEVEL", "unknown key"),
        ("a.yaml", "1: 2\n", "1", "unknown key"),
        ("a.json", '{"MAX_ENI": 2, "MAX_ENI": 3}', "MAX_ENI", "given twice"),
        ("a.yaml", "MAX_ENI: 2\nMAX_ENI: 3\n", "MAX_ENI", "given twice"),
        ("a.yaml", "ENABLE_PREFIX_DELEGATION: false\n", "ENABLE_PREFIX_DELEGATION", "only"),
        ("a.yaml", "WARM_PREFIX_TARGET: true\n", "WARM_PREFIX_TARGET", "not a base-10 integer"),
        ("a.yaml", "WARM_PREFIX_TARGET: 1.0\n", "WARM_PREFIX_TARGET", "not a base-10 integer"),
        ("a.yaml", "WARM_IP_TARGET: [1, 2]\n", "WARM_IP_TARGET", "expected a scalar, got list"),
        ("a.yaml", "ULTRANET_SOCKET: 5\n", "ULTRANET_SOCKET", "expected a string"),
        ("a.yaml", "ULTRANET_SUBNET_TAG: on\n", "ULTRANET_SUBNET_TAG", "expected a string"),
        ("a.toml", "WARM_PREFIX_TARGET = 1\n", "config file", "expected a .json, .yaml or .yml"),
        ("a", "{}", "config file", "expected a .json, .yaml or .yml"),
        ("a.json", "{", "config file", "not valid JSON"),
        ("a.yaml", "A: [\n", "config file", "not valid YAML"),
        ("a.yaml", "!!python/object:os.system x\n", "config file", "not valid YAML"),
        ("a.json", "[1]", "config file", "expected a mapping"),
        ("a.yaml", "just text\n", "config file", "expected a mapping"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, text: str, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, write(tmp_path, name, text))
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{field}=")


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, write(tmp_path, "a.yaml", "ZZZ: 1\n"))
    assert "did you mean" not in info.value.reason


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file='.*missing\.json': cannot read"):
        load_config({}, tmp_path / "missing.json")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config({}, tmp_path / "dir.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"ULTRANET_SUBNET_TAG: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config({}, latin1)


def test_effective_reports_values_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "ipamd.yaml", "WARM_IP_TARGET: 16\nULTRANET_SOCKET: /run/a.sock\n")
    config = load_config({"MAX_ENI": "-1", "WARM_ENI_TARGET": "1"}, path)
    effective = config.effective()
    assert list(effective) == list(KNOBS)
    assert effective["WARM_IP_TARGET"] == {"value": 16, "source": "file"}
    assert effective["ULTRANET_SOCKET"] == {"value": "/run/a.sock", "source": "file"}
    assert effective["MAX_ENI"] == {"value": -1, "source": "env"}
    assert effective["ULTRANET_METRICS_ADDR"] == {"value": "127.0.0.1:61678", "source": "default"}
    assert effective["ENABLE_PREFIX_DELEGATION"] == {"value": True, "source": "default"}
    assert effective["WARM_ENI_TARGET"] == {
        "value": 1,
        "source": "env",
        "ignored": "not used in prefix-delegation mode, the only mode ultranet has",
    }
    assert effective["WARM_PREFIX_TARGET"] == {
        "value": 1,
        "source": "default",
        "ignored": "overridden by WARM_IP_TARGET/MINIMUM_IP_TARGET",
    }
    json.dumps(effective)  # served as-is by the introspection endpoint


def test_effective_without_ip_targets_keeps_the_prefix_target() -> None:
    effective = load_config({"WARM_PREFIX_TARGET": "2"}).effective()
    assert effective["WARM_PREFIX_TARGET"] == {"value": 2, "source": "env"}


def test_config_is_frozen_and_hashable() -> None:
    config = load_config({"WARM_PREFIX_TARGET": "2"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.warm_prefix_target = 3  # type: ignore[misc]
    assert hash(config) == hash(IpamdConfig(warm_prefix_target=2))


# -- IPv6 prefix mode: the VPC CNI's isConfigValid, at load ---------------------------------

IPV6 = {"ENABLE_IPv4": "false", "ENABLE_IPv6": "true", "ENABLE_PREFIX_DELEGATION": "true"}


def test_ipv6_mode_with_what_the_vpc_cni_demands() -> None:
    config = load_config(IPV6)
    assert config.ipv6 and not config.enable_ipv4
    assert not load_config({}).ipv6


@pytest.mark.parametrize(
    ("env", "field", "reason"),
    [
        (
            {"ENABLE_IPv6": "true", "ENABLE_PREFIX_DELEGATION": "true"},
            "ENABLE_IPv6",
            "single stack",
        ),
        ({"ENABLE_IPv4": "false"}, "ENABLE_IPv4", "both disabled"),
        ({"ENABLE_IPv4": "false", "ENABLE_IPv6": "true"}, "ENABLE_PREFIX_DELEGATION", "only in"),
        ({**IPV6, "ENABLE_PREFIX_DELEGATION": "false"}, "ENABLE_PREFIX_DELEGATION", "only"),
        ({**IPV6, "ENABLE_IPv6": "yes"}, "ENABLE_IPv6", "not a boolean"),
    ],
)
def test_ipv6_mode_refused_as_the_vpc_cni_refuses(
    env: dict[str, str], field: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    assert caught.value.field == field
    assert reason in str(caught.value)


def test_ipv6_mode_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ipamd.json"
    path.write_text(json.dumps({"ENABLE_IPv4": False, "ENABLE_IPv6": True}))
    with pytest.raises(ConfigError, match="ENABLE_PREFIX_DELEGATION"):
        load_config({}, path)
    assert load_config({"ENABLE_PREFIX_DELEGATION": "true"}, path).ipv6


def test_ipv6_mode_says_the_warm_pool_knobs_do_nothing() -> None:
    effective = load_config({**IPV6, "WARM_IP_TARGET": "5"}).effective()
    for knob in ("WARM_PREFIX_TARGET", "WARM_IP_TARGET", "MINIMUM_IP_TARGET", "MAX_ENI"):
        entry = effective[knob]
        assert isinstance(entry, dict) and "IPv6 mode" in str(entry.get("ignored")), knob
    ipv4_entry = load_config({}).effective()["MAX_ENI"]
    assert isinstance(ipv4_entry, dict) and "ignored" not in ipv4_entry


def test_v4_egress_range_for_ipv6_pods() -> None:
    config = load_config(IPV6)
    assert config.enable_v4_egress and config.v4_egress_range == IPv4Network("169.254.172.0/22")
    assert load_config({**IPV6, "ULTRANET_V4_EGRESS_RANGE": "198.18.4.0/22"}).v4_egress_range == (
        IPv4Network("198.18.4.0/22")
    )
    for bad, why in (
        ("169.254.172.1/22", "host bits"),
        ("fd00::/64", "not an IPv4 CIDR"),
        ("169.254.172.0/31", "too small"),
    ):
        with pytest.raises(ConfigError, match=why):
            load_config({**IPV6, "ULTRANET_V4_EGRESS_RANGE": bad})
    effective = load_config({}).effective()
    entry = effective["ULTRANET_V4_EGRESS_RANGE"]
    assert isinstance(entry, dict) and entry["value"] == "169.254.172.0/22"
    assert "IPv6 mode only" in str(entry["ignored"])
    off = load_config({**IPV6, "ENABLE_V4_EGRESS": "false"}).effective()["ULTRANET_V4_EGRESS_RANGE"]
    assert isinstance(off, dict) and "ENABLE_V4_EGRESS is false" in str(off["ignored"])
