"""The node agent in IPv6 prefix mode (``ENABLE_IPv6=true``).

What the VPC CNI does in IPv6 mode (``aws/amazon-vpc-cni-k8s``, ``pkg/ipamd/ipamd.go``:
``nodeInit``, ``StartNodeIPPoolManager``; ``pkg/awsutils/awsutils.go`` assigns the
primary ENI's prefix), and so this agent:

* the primary ENI carries one IPv6 /80 (prefix delegation); pods take /128s from it, and
  there is no warm pool, no secondary ENI and nothing to release: 2^48 addresses last;
* at start the /80 comes from IMDS (``network/interfaces/macs/<mac>/ipv6-prefix``). A node
  launched with one (``Ipv6PrefixCount=1`` in its launch template) is ready without a
  single EC2 call; otherwise one ``AssignIpv6Addresses Ipv6PrefixCount=1`` on the primary
  ENI, through the same rate limit, retries and throttle pacer as every EC2 call, retried
  by the pool manager's back-off until it succeeds. Until then ADD answers code 11;
* allocations go through the same datastore and journal as IPv4 (group commit, snapshot,
  torn-tail and crash rules), so a restart restores them; a journal address outside the
  /80 IMDS shows is checked against EC2 before it is dropped, as in IPv4;
* the reconcile compares IMDS with the /80 held; if IMDS stops listing it, EC2 decides,
  and a /80 EC2 says is gone takes its pods' allocations with it (counted as force-removed);
* the host gets what the VPC CNI's init container sets in IPv6 mode
  (``cmd/aws-vpc-cni-init/main.go``, ``configureIPv6Settings``): IPv6 on, forwarding on,
  and ``accept_ra=2`` on the primary interface so it keeps its router-advertised default
  route with forwarding on (:meth:`Ipv6NodeAgent.configure_host`, called by the daemon);
* with ``ENABLE_V4_EGRESS`` (default true, as in the VPC CNI) each allocation also holds a
  node-local IPv4 of ``ULTRANET_V4_EGRESS_RANGE`` for the pod's egress-only interface, and
  the node SNATs that range to its primary IPv4 (:meth:`ipam.egress.Egress.apply_v4_egress`,
  at start), as the VPC CNI's ``egress-cni`` plugin and its ``snat`` package do.

Everything else (socket API, CNI backend, commits, metrics names) is the
:class:`~ipam.agent.NodeAgent`'s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from ipam import warm
from ipam.agent import AgentError, AgentStatus, CardState, NodeAgent, NodeIdentity
from ipam.imds import ImdsInterface
from ipam.pool6 import OFFSETS, Ipv6PrefixPool

log = logging.getLogger("ultranet.ipamd")


class Ipv6NodeAgent(NodeAgent):
    """``ultranet-ipamd`` on an ``ENABLE_IPv6`` node."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.config.ipv6:
            raise AgentError("Ipv6NodeAgent needs ENABLE_IPv6=true")
        self._imds.read_ipv6 = True
        self._primary_mac = ""
        self._primary_ipv4: IPv4Address | None = None

    @property
    def pool6(self) -> Ipv6PrefixPool:
        if not isinstance(self.pool, Ipv6PrefixPool):
            raise AgentError("the agent has not started")
        return self.pool

    # -- start ------------------------------------------------------------------------

    def _build_pool(self, node: NodeIdentity, interfaces: list[ImdsInterface]) -> None:
        primary = next((i for i in interfaces if (i.network_card, i.device_number) == (0, 0)), None)
        if primary is None:
            raise AgentError("IMDS lists no primary interface (card 0, device 0)")
        self._primary_mac = primary.mac
        self._primary_ipv4 = primary.primary_ip
        pool = Ipv6PrefixPool(
            primary.interface_id,
            cooldown_s=float(self.config.ip_cooldown_period),
            egress_range=self.config.v4_egress_range if self.config.enable_v4_egress else None,
        )
        self.cards[0] = CardState(0, 1, {0})
        if primary.ipv6_prefixes:
            self._adopt_prefix(pool, primary.ipv6_prefixes, "IMDS")
        self.pool = pool

    def _adopt_prefix(
        self, pool: Ipv6PrefixPool, listed: tuple[IPv6Network, ...], source: str
    ) -> None:
        chosen = pool.prefix if pool.prefix in listed else min(listed)
        if pool.prefix is None:
            pool.set_prefix(chosen)
            log.info("%s: pods take /128s from %s (from %s)", pool.eni_id, chosen, source)
        if len(listed) > 1:
            log.warning(
                "%s holds %d IPv6 prefixes (%s); pods use %s only",
                pool.eni_id,
                len(listed),
                ", ".join(str(p) for p in listed),
                chosen,
            )

    async def _apply_egress(self, vpc_cidrs: tuple[IPv4Network, ...]) -> None:
        """The node-local IPv4 range SNAT'd to the node's primary IPv4 (``ENABLE_V4_EGRESS``);
        the IPv4 node's SNAT and connection marks do not apply here."""
        if self._egress is None or not self.config.enable_v4_egress:
            return
        if self._primary_ipv4 is None:
            raise AgentError("IPv4 egress: IMDS lists no local-ipv4s on the primary ENI")
        changed = await asyncio.to_thread(
            self._egress.apply_v4_egress, self.config.v4_egress_range, self._primary_ipv4
        )
        if changed:
            log.info(
                "IPv4 egress: %s SNAT'd to %s, %d change(s)",
                self.config.v4_egress_range,
                self._primary_ipv4,
                len(changed),
            )

    async def _reconcile_with_ec2(self) -> None:
        """The journal names addresses IMDS does not show a /80 for: EC2 decides."""
        listed = await self._ec2_prefixes()
        if listed:
            self._adopt_prefix(self.pool6, listed, "EC2")

    async def _ec2_prefixes(self) -> tuple[IPv6Network, ...]:
        ec2 = await self._ec2()
        (state,) = await asyncio.to_thread(ec2.describe_network_interfaces, [self.pool6.eni_id])
        return state.ipv6_prefixes

    def configure_host(
        self, sys_class_net: Path = Path("/sys/class/net"), proc_sys: Path = Path("/proc/sys")
    ) -> dict[str, str]:
        """IPv6 on, forwarding on, ``accept_ra=2`` on the primary interface (found by its
        MAC), and with ``ENABLE_V4_EGRESS`` IPv4 forwarding (as the VPC CNI's egress plugin
        turns it on), in this process's namespace; returns what was written."""
        primary = next(
            (
                link.name
                for link in sys_class_net.iterdir()
                if (link / "address").is_file()
                and (link / "address").read_text().strip() == self._primary_mac
            ),
            None,
        )
        if primary is None:
            raise AgentError(f"no link has the primary ENI's MAC {self._primary_mac}")
        values = {
            "net/ipv6/conf/all/disable_ipv6": "0",
            "net/ipv6/conf/all/forwarding": "1",
            f"net/ipv6/conf/{primary}/accept_ra": "2",
        }
        if self.config.enable_v4_egress:
            # The pods' node-local IPv4 is forwarded to the primary ENI and SNAT'd there.
            values["net/ipv4/ip_forward"] = "1"
        try:
            for key, value in values.items():
                (proc_sys / key).write_text(value)
        except OSError as err:
            raise AgentError(f"cannot set the host's IPv6 sysctls: {err}") from err
        log.info("host IPv6: forwarding on, accept_ra=2 on %s", primary)
        return values

    # -- the pool: one /80, nothing to keep warm -----------------------------------------

    def plan(self, card: int) -> warm.Plan:
        if card != 0:
            raise AgentError(f"network card {card} is not managed in IPv6 mode")
        if self.pool6.prefix is None:
            return warm.Plan(1, 0, 0, f"{self.pool6.eni_id} has no IPv6 /80 yet")
        return warm.Plan(0, 0, 0, f"pods take /128s from {self.pool6.prefix}")

    def _plan_all_steady(self) -> bool:
        plan = self.plan(0)
        self.cards[0].last_plan = plan
        return not plan.add_prefixes

    def _not_ready_reason(self) -> str:
        return self.plan(0).reason

    async def _step(self) -> None:
        pool = self.pool6
        if pool.prefix is None:
            ec2 = await self._ec2()
            log.info("%s: no IPv6 /80 yet: assigning one", pool.eni_id)
            assigned = await asyncio.to_thread(ec2.assign_ipv6_prefix, pool.eni_id)
            if not assigned:
                raise AgentError(f"AssignIpv6Addresses gave {pool.eni_id} no prefix")
            self._adopt_prefix(pool, tuple(assigned), "AssignIpv6Addresses")
        self._update_metrics()
        if self._plan_all_steady():
            self._mark_ready()

    async def _reconcile(self) -> None:
        """IMDS's /80s of the primary ENI against the one held; EC2 decides a difference."""
        pool = self.pool6
        assert self.datastore is not None
        self._reconciled_at = self._clock()
        listed = (await self._read_primary()).ipv6_prefixes
        if pool.prefix is None:
            if listed:
                self._adopt_prefix(pool, listed, "IMDS")
            return
        if pool.prefix in listed:
            return
        from_ec2 = await self._ec2_prefixes()
        if pool.prefix in from_ec2:
            return  # IMDS lags
        lost = pool.drop_prefix(self._clock())
        self.datastore.drop(lost)
        self.metrics.force_removed.inc(len(lost))
        log.warning(
            "EC2 says %s no longer holds its IPv6 prefix: dropped %d allocation(s)",
            pool.eni_id,
            len(lost),
        )
        if from_ec2:
            self._adopt_prefix(pool, from_ec2, "EC2")
        if self.datastore.journal.staged:
            await asyncio.shield(self._durable())
        self._update_metrics()

    async def _read_primary(self) -> ImdsInterface:
        """The primary interface's keys, read on a worker thread that ``stop`` waits for."""
        read = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self._imds.interface, self._primary_mac, ipv6=True)
        )
        self._imds_reads.add(read)  # type: ignore[arg-type]
        read.add_done_callback(self._imds_reads.discard)
        return await asyncio.shield(read)

    # -- numbers ----------------------------------------------------------------------

    async def status(self) -> AgentStatus:
        usage = self.pool6.usage(self._clock())
        steady = self._plan_all_steady()
        reason = "IPv6 /80 held" if steady else self._not_ready_reason()
        return AgentStatus(self._ready.is_set(), reason, {0: usage.free}, (0,))

    def _update_metrics(self) -> None:
        if not isinstance(self.pool, Ipv6PrefixPool):
            return
        usage = self.pool.usage(self._clock())
        self.metrics.assigned.labels("0").set(usage.assigned)
        self.metrics.total.labels("0").set(usage.prefixes * (OFFSETS - 1))
        self.metrics.cooldown.labels("0").set(usage.cooldown)
        self.metrics.prefixes.labels("0").set(usage.prefixes)
        self.metrics.enis.labels("0").set(1)

    def introspect(self) -> dict[str, Any]:
        pool = self.pool6
        assert self.node is not None
        usage = pool.usage(self._clock())
        return {
            "instance_id": self.node.instance_id,
            "instance_type": self.node.instance_type.name,
            "mode": "ipv6",
            "ready": self._ready.is_set(),
            "ec2_used": self.ec2_used,
            "cards": {
                "0": {
                    "assigned": usage.assigned,
                    "cooldown": usage.cooldown,
                    "prefixes": usage.prefixes,
                    "plan": self.plan(0).reason,
                    "enis": [
                        {
                            "eni_id": pool.eni_id,
                            "device": 0,
                            "ipv6_prefixes": [str(pool.prefix)] if pool.prefix else [],
                        }
                    ],
                }
            },
            "allocations": [
                {
                    "key": str(a.key),
                    "pod": str(a.pod),
                    "addresses": [f"{lease.card}:{lease.address}" for lease in a.leases],
                    **({"egress_v4": str(a.egress_v4)} if a.egress_v4 is not None else {}),
                }
                for a in pool.allocations()
            ],
            "v4_egress": (
                {"range": str(pool.egress_range), "snat_to": str(self._primary_ipv4)}
                if pool.egress_range is not None
                else None
            ),
            "config": self.config.effective(),
        }


def agent_class(ipv6: bool) -> type[NodeAgent]:
    """The agent for the node's address family (``IpamdConfig.ipv6``)."""
    return Ipv6NodeAgent if ipv6 else NodeAgent
