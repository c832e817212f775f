"""deploy/kustomize and deploy/iam-policy.json, checked offline.

* every rendered object validates against pinned Kubernetes schemas (kubernetes-validate
  bundles them; strict mode refuses unknown fields);
* the invariants deploy/README.md promises: hostNetwork, priority, tolerations, probes,
  capabilities exactly as documented, pinned images, resources, strategies, mounts that
  match the products' default paths and ports;
* the IAM policy allows exactly the EC2 actions ipam/ec2.py calls.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipam.agent import CREATED_BY_TAG, INSTANCE_TAG
from ipam.config import KNOBS, IpamdConfig, load_config
from tests.deploy.conftest import DEPLOY, REPO, containers, find, kustomization, render

# The schema versions are pinned here, and the package version in pyproject's dev extra:
# 1.25 is the oldest release whose DaemonSet surge works with hostNetwork pods, 1.30 the
# one the base targets.
SCHEMA_VERSIONS = ("1.25.0", "1.30.0")
README = (DEPLOY / "README.md").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# container -> capabilities it adds; deploy/README.md's table must say the same.
CAPABILITIES = {
    "install-cni": set(),
    "ultranet-ipamd": {"NET_ADMIN", "NET_RAW", "SYS_ADMIN"},
    "node-setup": {"NET_ADMIN", "NET_RAW"},
    "ultranet-dns": {"NET_BIND_SERVICE"},
}
NODE_HOST_PATHS = {
    "/opt/cni/bin",
    "/etc/cni/net.d",
    "/opt/ultranet",
    "/run/ultranet",
    "/var/lib/ultranet",
    "/run/netns",
    "/run/xtables.lock",
}


def daemonsets(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "DaemonSet"]


def pod_spec(ds: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = ds["spec"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# -- schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_object_validates_against_the_pinned_schema(
    rendered: list[dict[str, Any]], version: str
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in rendered:
        kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_catches_a_typo(rendered: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    ds = json.loads(json.dumps(find(rendered, "DaemonSet", "ultranet-node")))
    pod_spec(ds)["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, SCHEMA_VERSIONS[-1], strict=True)


def test_the_renderer_sees_every_resource_file() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in (DEPLOY / "kustomize").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_everything_lands_in_kube_system(rendered: list[dict[str, Any]]) -> None:
    assert {o["metadata"]["namespace"] for o in rendered} == {"kube-system"}


# -- both DaemonSets -------------------------------------------------------------------------


def test_daemonsets_are_node_critical_on_host_network_everywhere(
    rendered: list[dict[str, Any]],
) -> None:
    names = set()
    for ds in daemonsets(rendered):
        names.add(ds["metadata"]["name"])
        spec = pod_spec(ds)
        assert spec["hostNetwork"] is True
        assert spec["priorityClassName"] == "system-node-critical"
        assert spec["tolerations"] == [{"operator": "Exists"}]  # every taint
        assert spec["dnsPolicy"] == "Default"  # not the cluster DNS they bootstrap
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["serviceAccountName"] == ds["metadata"]["name"]
    assert names == {"ultranet-node", "ultranet-dns"}


def test_capabilities_are_exactly_the_documented_ones(rendered: list[dict[str, Any]]) -> None:
    found = {}
    for ds in daemonsets(rendered):
        for name, c in containers(ds).items():
            sc = c["securityContext"]
            assert sc.get("privileged", False) is False, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            found[name] = set(sc["capabilities"].get("add", []))
    assert found == CAPABILITIES
    documented = {}
    for line in README.splitlines():
        m = re.match(r"\| `([\w-]+)` \| ([A-Z_, ]+|none) \|", line)
        if m:
            caps = m.group(2).strip()
            documented[m.group(1)] = set() if caps == "none" else set(caps.split(", "))
    assert documented == CAPABILITIES


def test_images_are_pinned_to_the_package_version(rendered: list[dict[str, Any]]) -> None:
    version = PYPROJECT["project"]["version"]
    images = {c["image"] for ds in daemonsets(rendered) for c in containers(ds).values()}
    assert len(images) == 1
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert name and tag == version and tag != "latest"
    label = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', _containerfile())
    assert label is not None and label.group(1) == version


def test_every_container_has_requests_and_a_memory_limit(rendered: list[dict[str, Any]]) -> None:
    for ds in daemonsets(rendered):
        for name, c in containers(ds).items():
            assert set(c["resources"]["requests"]) == {"cpu", "memory"}, name
            assert set(c["resources"]["limits"]) == {"memory"}, name  # no CPU throttling


def test_long_running_containers_have_all_three_probes(rendered: list[dict[str, Any]]) -> None:
    for ds in daemonsets(rendered):
        for c in pod_spec(ds)["containers"]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert "httpGet" in c[probe], (c["name"], probe)


def test_commands_exist_in_the_image(rendered: list[dict[str, Any]]) -> None:
    scripts = set(PYPROJECT["project"]["scripts"])
    copied = set(re.findall(r"/usr/local/ultranet/bin/([\w-]+)\n", _containerfile()))
    for ds in daemonsets(rendered):
        for c in containers(ds).values():
            assert c["command"][0] in scripts | copied, c["command"]


# -- ultranet-node ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    return find(rendered, "DaemonSet", "ultranet-node")


def test_node_never_runs_two_daemons_on_a_node(node: dict[str, Any]) -> None:
    assert node["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0},
    }


def test_node_host_paths(node: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in pod_spec(node)["volumes"]}
    host = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert host == NODE_HOST_PATHS
    mounts = {m["name"]: m for c in containers(node).values() for m in c.get("volumeMounts", [])}
    netns = mounts["netns"]
    assert netns["mountPropagation"] == "HostToContainer"  # netns made after we started
    assert volumes["host-python"]["hostPath"]["path"] == mounts["host-python"]["mountPath"]


def test_node_mounts_match_the_products_default_paths(node: dict[str, Any]) -> None:
    from cni import shim

    daemon = containers(node)["ultranet-ipamd"]
    mounted = {m["mountPath"] for m in daemon["volumeMounts"]}
    defaults = IpamdConfig()
    paths = [getattr(defaults, k.field) for k in KNOBS.values() if k.field]
    for path in (p for p in paths if isinstance(p, Path)):
        assert any(path.is_relative_to(m) for m in mounted), path
    assert str(defaults.state_dir) in mounted
    assert Path(shim.SOCKET_PATH.decode()).parent.as_posix() in mounted
    # The daemon's CNI socket and spool (when it has those knobs) are where the shim looks.
    for field, baked in (("cni_socket", shim.SOCKET_PATH), ("cni_spool", shim.SPOOL_DIR)):
        if hasattr(defaults, field):
            assert str(getattr(defaults, field)) == baked.decode()
    assert Path(shim.SPOOL_DIR.decode()).parent.as_posix() in mounted
    init = (DEPLOY / "scripts" / "ultranet-node-init").read_text()
    assert f"--socket {shim.SOCKET_PATH.decode()}" in init
    assert f"--spool-dir {shim.SPOOL_DIR.decode()}" in init


def test_node_probes_use_the_introspection_port_on_loopback(node: dict[str, Any]) -> None:
    daemon = containers(node)["ultranet-ipamd"]
    addr = IpamdConfig().introspection_addr
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = daemon[probe]["httpGet"]
        assert (get["host"], get["port"]) == (str(addr.host), addr.port)
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/ready",
    }


def test_node_metrics_port_is_annotated_and_bound_to_the_node_ip(node: dict[str, Any]) -> None:
    daemon = containers(node)["ultranet-ipamd"]
    annotations = node["spec"]["template"]["metadata"]["annotations"]
    port = IpamdConfig().metrics_addr.port
    assert annotations["prometheus.io/port"] == str(port)
    assert daemon["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    env = env_of(daemon)
    assert env["ULTRANET_METRICS_ADDR"] == f"$(HOST_IP):{port}"
    host_ip = next(e for e in daemon["env"] if e["name"] == "HOST_IP")
    assert host_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    # $(HOST_IP) expands only when HOST_IP is defined earlier in the list.
    names = [e["name"] for e in daemon["env"]]
    assert names.index("HOST_IP") < names.index("ULTRANET_METRICS_ADDR")


def test_node_configmap_holds_the_defaults_under_the_vpc_cni_names(
    rendered: list[dict[str, Any]], node: dict[str, Any]
) -> None:
    data = find(rendered, "ConfigMap", "ultranet-ipamd")["data"]
    defaults = IpamdConfig()
    # Knobs the DaemonSet fixes: the metrics address (node IP), the introspection address
    # (the probes) and every path (the hostPath mounts and the shim's baked-in paths).
    fixed = {"ULTRANET_METRICS_ADDR", "ULTRANET_INTROSPECTION_ADDR", "ULTRANET_CNI_CONF_DIR"} | {
        env
        for env, knob in KNOBS.items()
        if knob.field and isinstance(getattr(defaults, knob.field), Path)
    }
    assert set(data) | fixed == set(KNOBS)
    assert not set(data) & fixed
    assert fixed <= set(README.replace("`", " ").split()) | {"ULTRANET_METRICS_ADDR"}
    assert load_config(env=data) == IpamdConfig()
    (source,) = containers(node)["ultranet-ipamd"]["envFrom"]
    assert source == {"configMapRef": {"name": "ultranet-ipamd"}}


def test_node_init_writes_into_the_mounted_host_dirs(node: dict[str, Any]) -> None:
    init = containers(node)["install-cni"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    script = (DEPLOY / "scripts" / "ultranet-node-init").read_text()
    assert f"bin_dir=${{ULTRANET_CNI_BIN_DIR:-{mounts['cni-bin']}}}" in script
    assert "--no-conflist" in script
    assert "cni-net" not in mounts  # the conflist is the daemon's to write
    assert env_of(init)["ULTRANET_HOST_PYTHON_ROOT"] == mounts["host-python"]


def test_the_daemon_writes_the_conflist_into_the_hosts_cni_config_dir(
    node: dict[str, Any],
) -> None:
    daemon = containers(node)["ultranet-ipamd"]
    mounts = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}
    assert env_of(daemon)["ULTRANET_CNI_CONF_DIR"] == mounts["cni-net"]
    volumes = {v["name"]: v for v in node["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cni-net"]["hostPath"]["path"] == "/etc/cni/net.d"


# -- ultranet-dns ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    return find(rendered, "DaemonSet", "ultranet-dns")


@pytest.fixture(scope="module")
def dns_config(rendered: list[dict[str, Any]]) -> Any:
    from dnscache.config import parse

    doc = yaml.safe_load(find(rendered, "ConfigMap", "ultranet-dns")["data"]["dns.yaml"])
    return parse(doc, cpu_count=192)


def test_dns_surges_so_a_node_never_loses_dns(dns: dict[str, Any]) -> None:
    assert dns["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    # hostNetwork turns containerPorts into hostPorts, which a surge pod could not get.
    for c in containers(dns).values():
        assert "ports" not in c, c["name"]


def test_dns_config_is_node_local_on_the_link_local_address(dns_config: Any) -> None:
    from ipaddress import IPv4Address

    assert dns_config.listen == ((IPv4Address("169.254.20.10"), 53),)
    assert dns_config.node_local is None  # the init container owns interface and rules
    assert dns_config.workers == 2  # bounded, not one per core
    assert dns_config.lameduck == 0.0


def test_dns_init_sets_up_what_the_server_listens_on(dns: dict[str, Any], dns_config: Any) -> None:
    args = containers(dns)["node-setup"]["command"][1:]
    ((address, port),) = dns_config.listen
    assert f"--address={address}" in args and f"--port={port}" in args
    assert "--interface=nodelocaldns" in args


def test_dns_probes_and_annotation_use_the_metrics_port(dns: dict[str, Any]) -> None:
    server = containers(dns)["ultranet-dns"]
    assert "--metrics=$(HOST_IP):9253" in server["command"]
    assert "--config=/etc/ultranet/dns.yaml" in server["command"]
    annotations = dns["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9253"
    paths = {p: server[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    assert paths == {"livenessProbe": "/health", "readinessProbe": "/ready"}
    assert {server[p]["httpGet"]["port"] for p in paths} == {9253}
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert "/etc/ultranet" in mounts


# -- RBAC ------------------------------------------------------------------------------------


def test_no_rbac_because_nothing_talks_to_the_api_server(rendered: list[dict[str, Any]]) -> None:
    rbac = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    assert not [o for o in rendered if o["kind"] in rbac]
    for sa in (o for o in rendered if o["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    markers = re.compile(
        r"KUBERNETES_SERVICE_HOST|/api/v1/|serviceaccount/token|^\s*(from|import) kubernetes",
        re.M,
    )
    for package in ("ipam", "cni", "dnscache"):
        for path in (REPO / package).rglob("*.py"):
            assert not markers.search(path.read_text()), path


# -- IAM -------------------------------------------------------------------------------------


def ec2_actions_called() -> set[str]:
    """The EC2 actions ipam/ec2.py calls, by both names it uses, cross-checked.

    Every request goes through ``self._call(ACTION, ...)`` or ``self._pages(ACTION, ...)``
    with a boto3 ``self._ec2.<method>`` call inside; the method names are mapped to actions
    with botocore's own EC2 model, and the two sets must agree.
    """
    from botocore import xform_name
    from botocore.session import get_session

    tree = ast.parse((REPO / "ipam" / "ec2.py").read_text())
    labels, methods = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        owner = func.value
        if (
            isinstance(owner, ast.Name)
            and owner.id == "self"
            and func.attr in ("_call", "_pages")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            labels.add(node.args[0].value)
        if (
            isinstance(owner, ast.Attribute)
            and owner.attr == "_ec2"
            and isinstance(owner.value, ast.Name)
            and owner.value.id == "self"
        ):
            methods.add(func.attr)
    model = get_session().get_service_model("ec2")
    by_method = {xform_name(op): op for op in model.operation_names}
    assert methods <= set(by_method), methods - set(by_method)
    actions = {by_method[m] for m in methods}
    assert labels == actions
    assert actions  # the parse found the client at all
    return actions


def policy() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DEPLOY / "iam-policy.json").read_text())
    return doc


def _list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_iam_policy_allows_exactly_the_ec2_actions_the_daemon_calls() -> None:
    doc = policy()
    assert doc["Version"] == "2012-10-17"
    allowed = set()
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow"
        allowed |= set(_list(st["Action"]))
    assert allowed == {f"ec2:{a}" for a in ec2_actions_called()}


def test_iam_mutations_are_scoped() -> None:
    for st in policy()["Statement"]:
        actions = _list(st["Action"])
        resources = _list(st["Resource"])
        if all(a.startswith("ec2:Describe") for a in actions):
            assert resources == ["*"]  # Describe* has no resource-level permissions
            continue
        assert "*" not in resources, st["Sid"]
        for resource in resources:
            assert re.fullmatch(r"arn:aws:ec2:\*:\*:[a-z-]+/\*", resource), resource
        if "ec2:CreateTags" in actions:
            assert resources == ["arn:aws:ec2:*:*:network-interface/*"]
            assert st["Condition"]["StringEquals"] == {"ec2:CreateAction": "CreateNetworkInterface"}
            keys = st["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"]
            assert set(keys) == {INSTANCE_TAG, CREATED_BY_TAG}
        if "ec2:DeleteNetworkInterface" in actions:
            assert st["Condition"]["StringEquals"] == {
                f"ec2:ResourceTag/{CREATED_BY_TAG}": "ultranet-ipamd"
            }


def test_iam_conditions_match_the_tags_the_agent_sets() -> None:
    """The policy's created-by value is what ipam/agent.py puts on the ENIs it creates."""
    tree = ast.parse((REPO / "ipam" / "agent.py").read_text())
    values = {
        v.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for k, v in zip(node.keys, node.values, strict=True)
        if isinstance(k, ast.Name) and k.id == "CREATED_BY_TAG" and isinstance(v, ast.Constant)
    }
    assert values == {"ultranet-ipamd"}
    create = next(s for s in policy()["Statement"] if s["Sid"] == "CreateEniOnlyTaggedAsOurs")
    assert create["Condition"]["StringEquals"] == {
        f"aws:RequestTag/{CREATED_BY_TAG}": "ultranet-ipamd"
    }


def test_iam_readme_explains_every_statement_and_action() -> None:
    for st in policy()["Statement"]:
        assert f"`{st['Sid']}`" in README, st["Sid"]
    for action in ec2_actions_called():
        assert f"`ec2:{action}`" in README, action


# -- helpers ---------------------------------------------------------------------------------


def _containerfile() -> str:
    return (DEPLOY / "Containerfile").read_text()


def test_render_refuses_kustomize_features_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(ValueError, match="patches"):
        render(tmp_path)
