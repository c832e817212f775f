"""``ultranet-ipamd``: the node daemon. Configuration comes from the environment (the VPC
CNI's names) over an optional file; see ``ipam/README.md``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ipam.config import IpamdConfig, load_config
from ipam.errors import ConfigError, UltranetError

if TYPE_CHECKING:
    from cni.keys import IpamKey
    from cni.plumbing import Plumbing
    from ipam.agent import NodeAgent
    from ipam.hostnet import HostNetwork


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultranet-ipamd",
        description="Node IPAM daemon: /28 prefixes on every managed network card, warm, "
        "crash-safe. Configure with the VPC CNI's environment variables "
        "(WARM_PREFIX_TARGET, WARM_IP_TARGET, MINIMUM_IP_TARGET, MAX_ENI, "
        "IP_COOLDOWN_PERIOD, ENABLE_MULTI_NIC, ...) or a JSON/YAML file of the same keys.",
    )
    parser.add_argument("--config", type=Path, help="JSON or YAML file; the environment wins")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="print the effective configuration and exit",
    )
    parser.add_argument(
        "--uninstall-egress",
        action="store_true",
        help="remove the SNAT and connmark rules and chains (AWS-SNAT-CHAIN-0, "
        "AWS-CONNMARK-CHAIN-0, the primary-ENI marks) and the fwmark rule the daemon "
        "installs, then exit; run it after the daemon is gone for good",
    )
    return parser


async def run(config: IpamdConfig, stop: asyncio.Event) -> int:
    from cni.handler import CniHandler, HandlerConfig
    from cni.plumbing import Plumbing
    from cni.transport import CniServer, replay_spool, serve
    from ipam.agent6 import Ipv6NodeAgent, agent_class
    from ipam.cni_backend import AgentBackend, host_veth_alive
    from ipam.egress import Egress, egress_config
    from ipam.server import ApiServer, HttpServer, introspection_routes, metrics_routes

    def hostnet() -> HostNetwork:
        from ipam.hostnet import HostNetwork  # on the netlink thread, overlapping IMDS reads

        return HostNetwork()

    log = logging.getLogger("ultranet.ipamd")
    # Egress as the VPC CNI: an IPv4 node's SNAT and connection marks; an IPv6 node's
    # SNAT of its pods' node-local IPv4s (ENABLE_V4_EGRESS).
    wants_egress = config.enable_v4_egress if config.ipv6 else True
    egress = Egress(egress_config(config)) if wants_egress else None
    agent = agent_class(config.ipv6)(
        config, hostnet=hostnet, pod_alive=host_veth_alive(config.veth_prefix), egress=egress
    )
    servers: list[ApiServer | HttpServer] = []
    cni_server: CniServer | None = None
    plumbing: Plumbing | None = None
    conflist: asyncio.Task[None] | None = None
    sweeps: asyncio.Task[None] | None = None
    try:
        await agent.start()
        if isinstance(agent, Ipv6NodeAgent):
            agent.configure_host()  # forwarding on before the first pod
        api = ApiServer(agent, config.socket)
        await api.start()
        servers.append(api)
        for address, routes in (
            (config.metrics_addr, metrics_routes(agent)),
            (config.introspection_addr, introspection_routes(agent)),
        ):
            http = HttpServer(str(address.host), address.port, routes)
            await http.start()
            servers.append(http)
        plumbing = await Plumbing.open()
        handler = CniHandler(
            AgentBackend(agent),
            plumbing,
            HandlerConfig(
                enable_multi_nic=config.enable_multi_nic,
                spool_dir=config.cni_spool,
                max_interfaces=len(agent.pool.cards) if agent.pool is not None else 1,
                v4_egress_range=(
                    config.v4_egress_range if config.ipv6 and config.enable_v4_egress else None
                ),
            ),
        )
        # DELs the shim spooled while no daemon listened: done before new ADDs arrive.
        still_failing = await replay_spool(config.cni_spool, handler.handle)
        if still_failing:
            log.warning("%d spooled DEL(s) still fail; kept for the next start", len(still_failing))
        # Before the first ADD: veths a DEL answered for but a crash kept, and rules of
        # pods that went while no daemon ran.
        await sweep_strays(agent, plumbing, log)
        cni_server = await serve(config.cni_socket, handler.handle, agent.metrics.cni_command)
        if config.stray_sweep_interval > 0:
            sweeps = asyncio.create_task(
                _sweep_periodically(agent, plumbing, config.stray_sweep_interval, log)
            )
        log.info("serving IPAM on %s and CNI on %s", config.socket, config.cni_socket)
        failed: list[BaseException] = []
        if config.cni_conf_dir is not None:
            conflist = asyncio.create_task(_conflist_when_ready(agent, config, log))

            def conflist_done(task: asyncio.Task[None]) -> None:
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    failed.append(error)  # the node would never turn Ready: exit, loudly
                    stop.set()

            conflist.add_done_callback(conflist_done)
        await stop.wait()
        if failed:
            raise failed[0]
        return 0
    finally:
        if sweeps is not None:
            sweeps.cancel()
        if conflist is not None:
            conflist.cancel()
        if cni_server is not None:
            cni_server.close()
            await cni_server.wait_closed()
        if plumbing is not None:
            await plumbing.close()
        for server in reversed(servers):
            await server.close()
        await agent.stop()


async def sweep_strays(agent: NodeAgent, plumbing: Plumbing, log: logging.Logger) -> None:
    """What pods left behind without a DEL that finished, in this order, so each step's
    leftovers are the next one's: CNI allocations none of whose host veths exists (the
    pod's namespace went, and no DEL came: a runtime that never sends it, or crashed
    first), released into cooldown; host veths of ours no allocation accounts for (a
    DEL answered before a crash took its queued deletion, a deletion the kernel
    refused); host rules 512/1536 of addresses no allocation holds and no route reaches.
    Safe beside ADDs: the plumbing never takes what an ADD in flight has or makes.
    The daemon writes the conflist, so its vethPrefix is AWS_VPC_K8S_CNI_VETHPREFIX."""
    from ipam.cni_backend import accounted_addresses, accounted_veths

    durable: list[asyncio.Future[None]] = []

    def release(key: IpamKey) -> None:
        _, done = agent.release_staged(key)
        if done is not None:
            durable.append(done)

    veth_prefix = agent.config.veth_prefix
    released = await plumbing.release_vanished(
        veth_prefix,
        lambda: [(a.key, len(a.leases)) for a in agent.allocations() if a.origin == "cni"],
        release,
    )
    await asyncio.gather(*durable)  # journaled before their rules go
    agent.metrics.stray_allocations_released.inc(len(released))
    if released:
        log.warning(
            "released %d allocation(s) whose pod's host veths are gone: %s",
            len(released),
            ", ".join(str(key) for key in released),
        )
    reaped = await plumbing.reap_strays(
        veth_prefix, lambda: accounted_veths(agent.allocations(), veth_prefix)
    )
    agent.metrics.stray_veths_reaped.inc(len(reaped))
    if reaped:
        log.warning("reaped %d stray veth(s) no allocation accounts for", len(reaped))
    rules = await plumbing.reap_stray_rules(lambda: accounted_addresses(agent.allocations()))
    agent.metrics.stray_rules_reaped.inc(len(rules))
    if rules:
        log.warning("reaped %d stray host rule(s) no allocation accounts for", len(rules))


async def _sweep_periodically(
    agent: NodeAgent, plumbing: Plumbing, interval: int, log: logging.Logger
) -> None:
    """:func:`sweep_strays` every ``interval`` seconds (ULTRANET_STRAY_SWEEP_INTERVAL)
    while the daemon serves: strays also appear between restarts. A sweep that fails is
    logged and counted, and the next one tries again."""
    from pyroute2.netlink.exceptions import NetlinkError

    while True:
        await asyncio.sleep(interval)  # a timer: nothing to wait for but the interval
        try:
            await sweep_strays(agent, plumbing, log)
        except (NetlinkError, OSError, UltranetError) as err:
            agent.metrics.stray_sweeps.labels("failed").inc()
            log.error("stray sweep failed; the next in %d s: %s", interval, err)
        else:
            agent.metrics.stray_sweeps.labels("ok").inc()


async def _conflist_when_ready(agent: NodeAgent, config: IpamdConfig, log: logging.Logger) -> None:
    """Write the CNI conflist once the warm pool is first met, as the VPC CNI's aws-node
    copies its conflist only once ipamd answers: until then the kubelet keeps the node
    NetworkNotReady and schedules no pod that would only get "try again later"."""
    from cni.install import install_conflist

    assert config.cni_conf_dir is not None
    while not await agent.wait_ready(3600):
        pass
    try:
        path = await asyncio.to_thread(
            install_conflist,
            config.cni_conf_dir,
            mtu=config.pod_mtu,
            veth_prefix=config.veth_prefix,
        )
    except OSError as err:
        raise UltranetError(
            f"cannot write the CNI conflist in {config.cni_conf_dir}: {err}"
        ) from err
    log.info("warm pool met: wrote %s", path)


def _uninstall_egress(config: IpamdConfig) -> int:
    from ipam.egress import Egress, egress_config

    try:
        changed = Egress(egress_config(config)).remove()
    except UltranetError as err:
        print(f"ultranet-ipamd: {err}", file=sys.stderr)
        return 1
    for line in changed:
        print(f"ultranet-ipamd: removed: {line}")
    print(f"ultranet-ipamd: egress uninstalled ({len(changed)} change(s))")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(os.environ, args.config)
    except ConfigError as err:
        print(f"ultranet-ipamd: {err}", file=sys.stderr)
        return 2
    if args.check_config:
        import json

        print(json.dumps(config.effective(), indent=2, default=str))
        return 0
    if args.uninstall_egress:
        return _uninstall_egress(config)

    # The journal's fdatasync runs on a worker thread; with the default 5 ms GIL switch
    # interval a busy event loop keeps that thread from reporting back for up to 5 ms, and
    # every allocation in the batch waits with it.
    sys.setswitchinterval(0.0005)

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await run(config, stop)

    try:
        return asyncio.run(serve())
    except UltranetError as err:
        print(f"ultranet-ipamd: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
