"""The demo's IPv6 node, beside the IPv4 one: an EKS IPv6 cluster's node, run by ultranet.

A second lab (its own VPC, with a unique-local /56 and a /64 per subnet) launches an
m5.large whose primary ENI gets one /80 at launch, as a launch template's
``Ipv6PrefixCount=1`` gives it; ``ultranet-ipamd`` starts there with the VPC CNI's
``ENABLE_IPv6=true``, ``ENABLE_IPv4=false`` and ``ENABLE_PREFIX_DELEGATION=true`` and is
ready from IMDS alone: the EC2 emulator's request counters show the EC2 calls it made.
Pods start through containerd's CRI as the IPv4 node's do (the libcni driver when
containerd cannot start), each gets a /128 of the /80, and resolves the node's name
through ``ultranet-dns`` in node-local mode on an IPv6 address (NODE_LOCAL_ADDRESS_V6), over
IPv6. Where this build gives IPv6 pods an IPv4 egress (the VPC CNI's ``egress-cni``: a
node-local IPv4 on a second pod interface, SNAT'd to the node's primary IPv4), a pod
connects to an IPv4 "internet" host beyond the lab's VPC router, which reports the source
it saw; otherwise the demo says that step is not shown and why.

Everything is registered on the demo's ExitStack before it starts, so it goes with the
rest at the end, on failure and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any

from tools.demo.node import (
    Options,
    Report,
    _allocations,
    _session,
    install_cni,
    median,
    signals_held,
    start_ipamd,
    start_runtime,
)
from tools.demo.progress import DemoError, Progress
from tools.demo.runtime import CriPods, Pod
from tools.demo.services import (
    NODE_LOCAL_ADDRESS_V6,
    ZONE,
    Answer,
    NodeDns,
    Upstream,
    dig_from_pod,
    host_name,
    query_from_pod,
)

IPV6_STEPS = 5  # the steps run_ipv6_node shows
INSTANCE_TYPE = "m5.large"
# The pod interface the VPC CNI's egress-cni plugin adds for IPv4 (its EgressIPv4InterfaceName).
V4_EGRESS_IFNAME = "v4if0"
# What an IPv6 node is told, as on an EKS IPv6 cluster's aws-node (the VPC CNI refuses IPv6
# without prefix delegation).
IPV6_NODE_ENV = {
    "ENABLE_IPv6": "true",
    "ENABLE_IPv4": "false",
    "ENABLE_PREFIX_DELEGATION": "true",
    "ENABLE_V4_EGRESS": "true",  # the default, said out loud
    # The pods' node-local IPv4s: the VPC CNI's 169.254.172.0/22 by default; in the lab, one
    # of the lab's own ranges, beside the internet host's 198.18.0.0/24.
    "ULTRANET_V4_EGRESS_RANGE": "198.18.4.0/22",
}


@dataclass(slots=True)
class Ipv6Report:
    """What the IPv6 node's summary prints."""

    lab_id: str = ""
    instance_id: str = ""
    node_ipv4: str = ""
    node_ipv6: str = ""
    prefix: str = ""  # the primary ENI's /80
    prefix_source: str = ""  # "at launch", or "assigned by ultranet-ipamd"
    vpc_block: str = ""  # the VPC's /56
    ready_after_s: float = 0.0
    start_calls: Counter[str] = field(default_factory=Counter)  # EC2 requests to ready
    nau: int = 0  # at ready
    nau_with_pods: int = 0
    runtime: str = ""
    add_call: str = ""
    pods: list[Pod] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    dig: str = ""  # "dig @... NAME AAAA from pod-000: ADDRESS", or why not
    dns_metrics: dict[str, float] = field(default_factory=dict)
    dns_slowest: str = ""
    egress: str = ""  # what the egress step found


def resource_name(instance_id: str) -> str:
    """EC2's resource-based hostname, the name an IPv6 subnet's instances get (AAAA)."""
    return f"{instance_id}.{ZONE}"


def run_ipv6_node(
    options: Options, progress: Progress, stack: ExitStack, report: Report, base: Path
) -> None:
    from tools.lab.lab import Lab, LabConfig

    six = report.ipv6 = Ipv6Report()
    with progress.step(
        "ipv6-node",
        f"IPv6 node: {INSTANCE_TYPE} launched with a /80 (ENABLE_IPv6=true, "
        "ENABLE_PREFIX_DELEGATION=true), ultranet-ipamd up",
    ) as step:
        # As an EKS IPv6 node's launch template: the /80, no IPv4 prefix (the primary ENI
        # keeps its primary IPv4 in the dual-stack subnet, which egress SNATs to).
        config = LabConfig(
            instance_type=INSTANCE_TYPE, prefixes_per_card=0, ipv6=True, ipv6_prefixes=1
        )
        lab = Lab(config)
        six.lab_id = lab.lab_id
        report.lab_ids.append(lab.lab_id)
        stack.callback(lab.close)
        with signals_held():
            lab.start()
        six.instance_id = lab.instance_id
        at_launch = [str(p) for p in _primary_eni(lab).ipv6_prefixes]
        daemon, cni_env = start_ipamd(lab, base / "ipamd", IPV6_NODE_ENV, stack, report)
        status = daemon.wait_ready(timeout=60)
        daemon.wait_cni_socket()
        six.start_calls = lab.cloud.requests.counts()
        primary = _primary_eni(lab)  # as the daemon left it (a /80 it had to assign, say)
        if len(primary.ipv6_prefixes) != 1:
            raise DemoError(f"the primary ENI holds {primary.ipv6_prefixes}, not one /80")
        six.node_ipv4 = str(primary.primary_ip)
        six.node_ipv6 = str(primary.ipv6_addresses[0])
        six.prefix = str(primary.ipv6_prefixes[0])
        six.vpc_block = str(lab.cloud.vpc(lab.vpc_id).ipv6_cidrs[0])
        six.prefix_source = "at launch" if six.prefix in at_launch else "assigned by ultranet-ipamd"
        step.note(
            f"lab {lab.lab_id}: namespaces {lab.vpc_ns}, {lab.node_ns}; instance "
            f"{lab.instance_id}; VPC {six.vpc_block}; primary ENI {primary.eni_id}: "
            f"{six.node_ipv4}, {six.node_ipv6}/128 and the /80 {six.prefix} "
            f"({six.prefix_source})"
        )
        six.ready_after_s = float(str(status.get("ready_after_s", 0)))
        six.nau = lab.cloud.nau_used(lab.vpc_id)
        calls = sum(six.start_calls.values())
        step.note(
            f"ready in {six.ready_after_s:.2f} s ({status.get('reason')}): pods take /128s "
            f"from {six.prefix}; EC2 calls for the IPv6 node's start: {calls} "
            f"(the emulator's request counters: "
            f"{', '.join(f'{a} {n}' for a, n in six.start_calls.items()) or 'none'})"
        )
        _shim, bin_dir, conf_dir, conf = install_cni(base / "cni", cni_env)

    with progress.step(
        "ipv6-pods", f"IPv6 node: its container runtime, {options.ipv6_pods} pods"
    ) as step:
        runtime = start_runtime(
            lab, base, (bin_dir, conf_dir, conf), cni_env, options.containerd, stack, report, step
        )
        step.note(
            "pods: RunPodSandbox via containerd CRI"
            if isinstance(runtime, CriPods)
            else "pods: netns + CNI ADD via libcni (FALLBACK, containerd could not start)"
        )
        six.runtime, six.add_call = runtime.label, runtime.add_call
        prefix = IPv6Network(six.prefix)
        for i in range(options.ipv6_pods):
            pod = Pod(i, False, name_prefix="pod6")
            six.pods.append(pod)
            try:
                runtime.add(pod)
            except DemoError as err:
                raise DemoError(f"{err}\nultranet-ipamd log:\n{daemon.log_tail()}") from err
            step.count(i + 1, options.ipv6_pods, f"last {pod.add_ms:.0f} ms")
            ipv6 = [(n, a) for n, a in pod.addresses if ip_address(a).version == 6]
            if len(ipv6) != 1 or IPv6Address(ipv6[0][1]) not in prefix:
                raise DemoError(f"{pod.name} got {pod.addresses}, not one /128 of {prefix}")
            step.note(f"{pod.name}  {ipv6[0][0]} {ipv6[0][1]}/128 (in {prefix})")
        six.nau_with_pods = lab.cloud.nau_used(lab.vpc_id)

    node_name = resource_name(six.instance_id)
    with progress.step(
        "ipv6-dns",
        f"IPv6 pods resolve names over IPv6 through ultranet-dns on [{NODE_LOCAL_ADDRESS_V6}]:53",
    ) as step:
        if ip_address(NODE_LOCAL_ADDRESS_V6) in IPv6Network(six.vpc_block):
            raise DemoError(f"the VPC's {six.vpc_block} holds {NODE_LOCAL_ADDRESS_V6}")
        records = {node_name: six.node_ipv6, host_name(six.node_ipv4): six.node_ipv4}
        upstream = Upstream(lab.node_ns, records, base / "upstream.log")
        stack.callback(upstream.stop)
        upstream.start()
        _session(upstream, report)
        port = upstream.wait_ready()
        workers = min(2, os.cpu_count() or 1)
        dns = NodeDns(lab.node_ns, f"127.0.0.1:{port}", workers, base, NODE_LOCAL_ADDRESS_V6)
        stack.callback(dns.stop)
        dns.start()
        _session(dns, report)
        dns.wait_ready()
        step.note(
            f"ultranet-dns: {workers} workers on [{NODE_LOCAL_ADDRESS_V6}]:53 in node-local "
            f"mode (its bridge, ip6tables NOTRACK rules); upstream 127.0.0.1:{port} in the node"
        )
        timed: list[tuple[float, str, int]] = []  # (ms, pod, which of its queries)
        for n, pod in enumerate(six.pods):
            answers = query_from_pod(
                pod.ns, NODE_LOCAL_ADDRESS_V6, [node_name] * options.queries_per_pod, "AAAA"
            )
            for a in answers:
                if a.rcode != "NOERROR" or a.addresses != (six.node_ipv6,):
                    raise DemoError(f"{pod.name} asked {a.name} AAAA: {a.rcode} {a.addresses}")
            six.answers += answers
            timed += [(a.ms, pod.name, k) for k, a in enumerate(answers, 1)]
            step.count(n + 1, len(six.pods))
        dug = dig_from_pod(six.pods[0].ns, node_name, NODE_LOCAL_ADDRESS_V6, "AAAA")
        if dug is None:
            six.dig = "dig is not installed (bind9-dnsutils); the dnslib answers above stand"
        elif dug != six.node_ipv6:
            raise DemoError(f"dig AAAA answered {dug!r}, expected {six.node_ipv6}")
        else:
            six.dig = (
                f"dig @{NODE_LOCAL_ADDRESS_V6} {node_name.rstrip('.')} AAAA from "
                f"{six.pods[0].name}: {dug}"
            )
        six.dns_metrics = dns.scrape()
        ms, who, nth = max(timed)
        six.dns_slowest = f"max {ms:.1f} ms ({who}'s query {nth})"
        step.note(
            f"{len(six.answers)} AAAA answers over IPv6 from {len(six.pods)} pods, all NOERROR "
            f"with the node's {six.node_ipv6}; client-side p50 "
            f"{median([a.ms for a in six.answers]):.2f} ms, {six.dns_slowest}"
        )
        step.note(six.dig)

    with progress.step(
        "ipv6-egress", "IPv6 pod -> IPv4 host beyond the VPC router (egress)"
    ) as step:
        six.egress = egress_from_pod(lab, six.pods[0], six.node_ipv4)
        step.note(six.egress)

    how = "StopPodSandbox + RemovePodSandbox" if isinstance(runtime, CriPods) else "CNI DEL"
    with progress.step("ipv6-del", f"IPv6 node: {len(six.pods)} pods stop ({how})") as step:
        for n, pod in enumerate(six.pods):
            runtime.delete(pod)
            step.count(n + 1, len(six.pods))
        held = asyncio.run(_allocations(daemon.socket))
        step.note(f"ultranet-ipamd (IPv6) holds {held} allocations after DEL")
        if held:
            raise DemoError(f"the IPv6 node's ultranet-ipamd still holds {held} allocations")


def _primary_eni(lab: Any) -> Any:
    for eni in lab.cloud.enis_of(lab.instance_id):
        if eni.attachment.network_card_index == 0 and eni.attachment.device_index == 0:
            return eni
    raise DemoError(f"no primary ENI on {lab.instance_id}")


def pod_ipv4(pod_ns: str) -> str | None:
    """The pod's IPv4 address on V4_EGRESS_IFNAME, or None when it has none."""
    from tools.lab import netns

    with netns.iproute(pod_ns) as ipr:  # not IPRoute(netns=...): that forks this program
        links = ipr.link_lookup(ifname=V4_EGRESS_IFNAME)
        if not links:
            return None
        for addr in ipr.get_addr(family=socket.AF_INET, index=links[0]):
            return str(addr.get("address"))
    return None


def egress_from_pod(lab: Any, pod: Pod, node_ipv4: str) -> str:
    """One TCP connection from ``pod`` to an IPv4 host beyond the VPC router, which notes
    the source it sees; the line to print."""
    from tools.lab import netns
    from tools.lab.egress import add_internet

    v4 = pod_ipv4(pod.ns)
    if v4 is None:
        raise DemoError(f"{pod.name} has no {V4_EGRESS_IFNAME} though ENABLE_V4_EGRESS=true")
    with signals_held():  # it creates a namespace (see signals_held)
        internet = add_internet(lab.vpc_ns, f"{netns.PREFIX}{lab.lab_id}-inet")
    listener = netns.listening_socket(internet.ns, str(internet.address), 0)
    port = listener.getsockname()[1]
    seen: list[str] = []

    def serve() -> None:
        listener.settimeout(15)
        try:
            conn, peer = listener.accept()
        except TimeoutError:
            return
        with conn:
            seen.append(peer[0])
            conn.sendall(b"hello from the internet\n")

    server = threading.Thread(target=serve, name="demo-internet", daemon=True)
    server.start()

    def connect() -> bytes:
        with socket.create_connection((str(internet.address), port), timeout=10) as sock:
            return sock.recv(64)

    try:
        reply = netns.run_in(pod.ns, connect)
    except OSError as err:
        raise DemoError(
            f"{pod.name} ({V4_EGRESS_IFNAME} {v4}) could not reach {internet.address}:{port}: {err}"
        ) from err
    finally:
        server.join(20)
        listener.close()
    if not seen or seen[0] != node_ipv4:
        raise DemoError(
            f"the internet host saw {seen or 'nothing'}, not the node's IPv4 {node_ipv4}"
        )
    return (
        f"{pod.name} ({V4_EGRESS_IFNAME} {v4}) -> {internet.address}:{port} across the VPC "
        f"router: the host saw source {seen[0]} (the node's primary IPv4), answered "
        f"{reply.decode().strip()!r}"
    )


def summary6(six: Ipv6Report, write: Any) -> None:
    write("\n== the IPv6 node (ENABLE_IPv6=true, ENABLE_PREFIX_DELEGATION=true) ==")
    calls = sum(six.start_calls.values())
    write(
        f"{six.instance_id} ({INSTANCE_TYPE}): /80 {six.prefix} on its primary ENI "
        f"({six.prefix_source}); ready in {six.ready_after_s:.2f} s with {calls} EC2 calls "
        f"(the emulator's counters); NAU in its VPC: {six.nau} (primary IPv4, IPv6 /128, /80), "
        f"{six.nau_with_pods} with {len(six.pods)} pods"
    )
    inside = [p for p in six.pods if _in_prefix(p, six.prefix)]
    distinct = {a for p in six.pods for _, a in p.addresses}
    ms = [p.add_ms for p in six.pods]
    write(
        f"{len(six.pods)} pods via {six.runtime} ({six.add_call} p50 {median(ms):.1f} ms): "
        f"{len(distinct)} distinct /128s, {len(inside)} inside the /80"
    )
    for pod in six.pods:
        for name, address in pod.addresses:
            write(f"  {pod.name}  {name} {address}/128")
    m = six.dns_metrics
    write(
        f"DNS over IPv6: {len(six.answers)} AAAA queries to [{NODE_LOCAL_ADDRESS_V6}]:53, "
        f"ultranet-dns counted {m.get('coredns_dns_requests_total', 0.0):.0f} requests, "
        f"{m.get('coredns_cache_hits_total', 0.0):.0f} cache hits, "
        f"{m.get('ultranet_dns_upstream_queries_total', 0.0):.0f} upstream queries; "
        f"client-side p50 {median([a.ms for a in six.answers]):.2f} ms, {six.dns_slowest}"
    )
    write(f"  {six.dig}")
    write(f"IPv4 egress: {six.egress}")


def _in_prefix(pod: Pod, prefix: str) -> bool:
    return all(ip_address(a) in IPv6Network(prefix) for _, a in pod.addresses)
