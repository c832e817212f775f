"""The AWS VPC CNI's node daemon, as far as EC2 sees it: the baseline of a fleet run.

Plays the call sequence of ``ipam.nau.vpccni_calls`` (read from the VPC CNI's source:
each step below names the function it stands for) against the emulated account, through
real boto3 over HTTP, one client and one IMDS view per node, so it meets the same
throttling as ultranet's agents in the same run:

* start (``ipamd.New`` -> ``nodeInit``): IMDS, ``DescribeNetworkInterfaces`` of every
  attached ENI (``DescribeAllENIs``, up to 12 tries), ``CreateTags`` on each ENI lacking
  the node tag (``TagENI``, 5 tries with back-off), ``ModifyNetworkInterfaceAttribute``
  (security groups) on each ENI (``RefreshSGIDs``' first run), then an
  ``AssignPrivateIpAddresses`` if the pool is below ``WARM_PREFIX_TARGET``
  (``handlePreScaling``; on failure one more asking for 1 prefix). A failed start exits
  the daemon, and the kubelet restarts it after its crash-loop back-off (10 s, doubled,
  at most 300 s): the node is not Ready until a start succeeds;
* then a pool pass every 5 s (``StartNodeIPPoolManager``): a top-up when too low, a new
  ENI when every ENI is full (``tryAllocateENI``: DescribeSubnets, CreateNetworkInterface,
  DescribeInstances, AttachNetworkInterface, ModifyNetworkInterfaceAttribute; an ENI that
  could not be attached is deleted, one that could not be marked DeleteOnTermination is
  detached and deleted, as ``AllocENI`` does), a release of prefixes beyond the target at
  most every 30 s;
* the leaked-ENI sweep's ``DescribeNetworkInterfaces``, at a random 0-300 s after start;
* every EC2 request through the Go SDK's standard retryer (``vpccni_calls.SDK``: 3
  attempts, full-jitter back-off, a per-client retry quota).

A pod's address comes from the in-memory datastore (the CNI ADD path makes no EC2 call),
which rewrites its checkpoint file on every assignment (``datastore.AssignPodIPv4Address``
-> ``writeBackingStoreUnsafe``); when none is free the ADD fails and the kubelet retries,
as with ultranet.

A restart (the DaemonSet rolled: a new aws-node process) is a new ``VpcCniAgent`` on the
same checkpoint: a new SDK client with a full retry quota, ``nodeInit`` again (IMDS,
``DescribeAllENIs``, ``CreateTags`` only on an ENI lacking the node tag, a security-group
``ModifyNetworkInterfaceAttribute`` on every ENI since ``RefreshSGIDs``' cache starts
empty), the pods of the checkpoint re-attached to the prefixes IMDS lists
(``ReadBackingStore``: an address in none of them is dropped as stale), the pool passes and
their 30 s release timer from zero, and the leaked-ENI sweep drawn again (``awsutils.New``).

Departures, by design: no host networking (the runner's in-memory host is not used); no
IMDS-versus-datastore reconcile (the emulator's IMDS is never stale, so it would make no
EC2 call); every pod of the checkpoint is alive (``ReadBackingStore`` drops those whose
host veth is gone; there are no veths here); a failed release puts its prefixes back in
the datastore at once, where the VPC CNI's reconcile would re-add them 60 s later after a
DescribeNetworkInterfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from ipam.datastore_errors import PoolExhausted
from ipam.imds import ImdsClient, ImdsInterface
from ipam.nau.vpccni_calls import (
    ADDRESSES_PER_PREFIX,
    SDK,
    TIMERS,
    NodeShape,
    free_prefixes,
    pool_too_low,
    prefixes_to_assign,
    prefixes_to_release,
)

log = logging.getLogger("ultranet.fleet.vpccni")

NODE_TAG = "node.k8s.amazonaws.com/instance_id"  # awsutils.go: eniNodeTagKey
CREATED_AT_TAG = "node.k8s.amazonaws.com/createdAt"
SUBNET_DISCOVERY_TAG = "kubernetes.io/role/cni"
ENI_DESCRIPTION_PREFIX = "aws-K8S-"
INSUFFICIENT = frozenset({"InsufficientCidrBlocks", "InsufficientFreeAddressesInSubnet"})
# aws-sdk-go-v2 aws/retry/standard.go: DefaultThrottleErrorCodes (the EC2 subset)
SDK_THROTTLE_CODES = frozenset(
    {"Throttling", "ThrottlingException", "RequestLimitExceeded", "EC2ThrottledException"}
)
TRANSPORT_ERROR = "RequestError"  # no HTTP answer: the SDK's timeout / connection error
ENI_NOT_FOUND = "InvalidNetworkInterfaceID.NotFound"
# awsutils.go: an ENI that AllocENI created but could not attach and mark
# DeleteOnTermination is detached (FreeENI) and deleted (deleteENI), each through
# retry.NWithBackoff: maxENIEC2APIRetries tries, back-off x2 up to maxENIBackoffDelay.
ENI_API_TRIES = 12  # maxENIEC2APIRetries
ENI_BACKOFF_MAX_S = 60.0  # maxENIBackoffDelay
DETACH_BACKOFF = (0.2, 0.15)  # freeENI: NewSimpleBackoff(200 ms, max, jitter 0.15, 2)
DELETE_BACKOFF = (0.5, 0.15)  # deleteENI: NewSimpleBackoff(500 ms, max, jitter 0.15, 2)
SLEEP_AFTER_DETACH_S = 2.0  # FreeENI: "it does take awhile for EC2 to detach ENI"
CHECKPOINT_VERSION = "vpc-cni-ipam/1"  # datastore.CheckpointFormatVersion


def _write_atomically(path: Path, data: Any) -> None:
    """checkpoint.go's Checkpoint: a temporary file in the same directory, fsync'd, then
    renamed over the last one."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as out:
        json.dump(data, out)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class CallStats(Protocol):
    """The runner's per-node counters (``runner.NodeStats``)."""

    def request(self, action: str, latency_s: float, error_code: str | None) -> None: ...
    def retry(self, action: str, code: str, delay_s: float) -> None: ...
    def slept(self, due_at: float, lateness_s: float) -> None: ...


class Ec2CallFailed(Exception):
    """An EC2 request failed after the SDK's retries; ``code`` is EC2's error code."""

    def __init__(self, action: str, code: str, why: str = "") -> None:
        self.action = action
        self.code = code
        super().__init__(f"{action}: {code}{f' ({why})' if why else ''}")


class InitFailed(Exception):
    """nodeInit returned an error: aws-k8s-agent exits 1 and is restarted."""


@dataclass(frozen=True, slots=True)
class VpcCniSettings:
    shape: NodeShape
    leaked_eni_cleanup: bool = True  # DISABLE_LEAKED_ENI_CLEANUP unset
    cleanup_delay_max_s: float = TIMERS.leaked_eni_cleanup_delay_max_s
    restart_backoff_s: float = TIMERS.restart_backoff_s


@dataclass(frozen=True, slots=True)
class VpcCniStatus:
    reason: str


@dataclass(slots=True)
class _Eni:
    eni_id: str
    device: int
    # prefix -> {address: the pod's key}, the datastore's CidrInfo.IPAddresses
    used: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def prefixes(self) -> int:
        return len(self.used)


class VpcCniAgent:
    """One node's aws-node, EC2-wise. Same surface as ``ipam.agent.NodeAgent`` where the
    fleet runner touches it: start, wait_ready, ready_at, allocate, status, stop."""

    def __init__(
        self,
        imds: ImdsClient,
        client_factory: Callable[[str], Any],
        stats: CallStats,
        settings: VpcCniSettings,
        rng: random.Random,
        checkpoint: Path | None = None,
    ) -> None:
        self.imds = imds
        self.checkpoint = checkpoint  # None: the datastore keeps no backing store
        self._checkpoint_lock = asyncio.Lock()
        self._client_factory = client_factory
        self._client: Any = None
        self.stats = stats
        self.settings = settings
        self._rng = rng
        self.ready_at: float | None = None
        self.init_failures = 0
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._enis: list[_Eni] = []
        self._instance_id = ""
        self._vpc_id = ""
        self._az = ""
        self._subnet_id = ""
        self._groups: tuple[str, ...] = ()
        self._quota = SDK.quota_tokens
        self._last_decrease = -1e9
        self._cleanup_done = not settings.leaked_eni_cleanup
        self._insufficient_until = 0.0

    # -- the runner's surface ----------------------------------------------------------

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run(), name="vpc-cni"))

    async def wait_ready(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True

    async def allocate(self, key: Any, ref: Any, *, multi_nic: bool, origin: str) -> None:
        """CNI ADD (datastore.AssignPodIPv4Address): the pod's address if it has one, else
        the first free address of the first prefix with one, checkpointed before the
        answer (a failed write unwinds it); none free is the error the kubelet retries."""
        pod = str(key)
        if pod in self.allocations_held():
            return
        for eni in self._enis:
            for prefix, used in eni.used.items():
                if len(used) < ADDRESSES_PER_PREFIX:
                    network = ipaddress.IPv4Network(prefix)
                    address = next(str(a) for a in network if str(a) not in used)
                    used[address] = pod
                    try:
                        await self._checkpoint()
                    except OSError:
                        del used[address]
                        raise
                    return
        raise PoolExhausted([0], "vpc-cni datastore has no free address")

    def allocations_held(self) -> dict[str, str]:
        """Pod key -> its address, as the datastore holds them."""
        return {
            pod: address
            for eni in self._enis
            for used in eni.used.values()
            for address, pod in used.items()
        }

    async def status(self) -> VpcCniStatus:
        settled = self._ready.is_set() and self._cleanup_done and not self._wants_change()
        return VpcCniStatus("warm pool met" if settled else "warming")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.imds.close()  # its keep-alive connection, as the daemon's exit would

    # -- the daemon ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self.settings.restart_backoff_s
        while True:
            try:
                await self._node_init()
                break
            except InitFailed as err:
                self.init_failures += 1
                log.warning("aws-node start failed (%s); restarting in %.0f s", err, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, TIMERS.restart_backoff_max_s)
        self.ready_at = time.monotonic()
        self._ready.set()
        if self.settings.leaked_eni_cleanup:
            delay = self._rng.uniform(0, self.settings.cleanup_delay_max_s)
            self._tasks.append(asyncio.create_task(self._leaked_eni_sweep(delay)))
        await self._pool_manager()

    async def _node_init(self) -> None:
        """ipamd.New -> nodeInit. Every restart starts from IMDS again (the datastore's
        prefixes come from IMDS; the security-group cache starts empty)."""
        if self._client is None:
            self._client = await asyncio.to_thread(self._client_factory, "us-west-2")
        identity = await asyncio.to_thread(self.imds.identity)
        interfaces = await asyncio.to_thread(
            partial(self.imds.interfaces, primary_mac=identity.primary_mac)
        )
        primary = next(i for i in interfaces if i.mac == identity.primary_mac)
        self._instance_id = identity.instance_id
        self._az = identity.availability_zone
        self._vpc_id, self._subnet_id = primary.vpc_id, primary.subnet_id
        managed = [i for i in interfaces if i.network_card == 0 and not i.maybe_efa_only]
        # awsutils.DescribeAllENIs: one request for every attached ENI, 12 tries
        ids = [i.interface_id for i in interfaces]
        described = None
        for attempt in range(TIMERS.describe_all_enis_tries):
            try:
                described = await self._call("DescribeNetworkInterfaces", NetworkInterfaceIds=ids)
                break
            except Ec2CallFailed:
                await self._sleep(attempt * TIMERS.describe_all_enis_sleep_s)
        if described is None:
            raise InitFailed("DescribeAllENIs failed")
        tags = {
            ni["NetworkInterfaceId"]: {t["Key"]: t.get("Value", "") for t in ni.get("TagSet", [])}
            for ni in described.get("NetworkInterfaces", [])
        }
        for interface in managed:  # nodeInit -> TagENI
            if tags.get(interface.interface_id, {}).get(NODE_TAG) != self._instance_id:
                await self._tag(interface.interface_id)
        self._enis = [self._eni(i) for i in managed]  # setupENI
        await self._restore()  # ReadBackingStore (via ReadAllDataStores)
        # RefreshSGIDs: the cache starts empty, so every group is "added"; errors ignored
        self._groups = primary.security_group_ids
        if self._groups:
            for eni in self._enis:
                with contextlib.suppress(Ec2CallFailed):
                    await self._call(
                        "ModifyNetworkInterfaceAttribute",
                        NetworkInterfaceId=eni.eni_id,
                        Groups=list(self._groups),
                    )
        # handlePreScaling -> increaseDatastorePool
        if self._too_low():
            try:
                await self._increase()
            except Ec2CallFailed as err:
                if err.code not in INSUFFICIENT:
                    raise InitFailed(f"increase datastore pool: {err}") from err

    def _eni(self, interface: ImdsInterface) -> _Eni:
        return _Eni(
            interface.interface_id,
            interface.device_number,
            {str(p): {} for p in interface.ipv4_prefixes},
        )

    # -- the datastore's backing store (datastore.go) ------------------------------------

    async def _checkpoint(self) -> None:
        """writeBackingStoreUnsafe -> Checkpoint: the whole datastore, one write at a time,
        each of the datastore as it is when its turn comes. Off the event loop: each
        aws-node writes on its own machine, here every agent shares this one loop."""
        if self.checkpoint is None:
            return
        async with self._checkpoint_lock:
            allocations = [
                {"ipamKey": pod, "ipv4": address}
                for pod, address in self.allocations_held().items()
            ]
            data = {"version": CHECKPOINT_VERSION, "allocations": allocations}
            await asyncio.to_thread(_write_atomically, self.checkpoint, data)

    async def _restore(self) -> None:
        """ReadBackingStore: each allocation back on the prefix that holds its address;
        one in no prefix of the ENIs IMDS lists is dropped ("presuming stale/dead"); no
        file is a new node. The file is rewritten: dropped entries leave it."""
        if self.checkpoint is None:
            return
        try:
            data = await asyncio.to_thread(_read_json, self.checkpoint)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            raise InitFailed(f"ipam state recovery from {self.checkpoint}: {err}") from err
        if data.get("version") != CHECKPOINT_VERSION:
            raise InitFailed(f"checkpoint version {data.get('version')!r}")
        prefixes = {
            ipaddress.IPv4Network(prefix): used
            for eni in self._enis
            for prefix, used in eni.used.items()
        }
        for allocation in data["allocations"]:
            address = ipaddress.IPv4Address(allocation["ipv4"])
            used = next((u for net, u in prefixes.items() if address in net), None)
            if used is None:
                log.info(
                    "vpc-cni: %s uses unknown address %s: stale", allocation["ipamKey"], address
                )
                continue
            used[str(address)] = allocation["ipamKey"]
        await self._checkpoint()

    async def _tag(self, eni_id: str) -> None:
        """TagENI: retry.NWithBackoff(500 ms, x2, jitter 0.3), 5 tries."""
        try:
            await self._with_backoff(
                partial(
                    self._call,
                    "CreateTags",
                    Resources=[eni_id],
                    Tags=[{"Key": NODE_TAG, "Value": self._instance_id}],
                ),
                TIMERS.tag_tries,
                TIMERS.tag_backoff_s,
                TIMERS.tag_jitter,
            )
        except Ec2CallFailed as err:
            raise InitFailed(f"tag ENI {eni_id}: {err}") from err

    async def _with_backoff(
        self, send: Callable[[], Any], tries: int, first_s: float, jitter: float
    ) -> Any:
        """retry.NWithBackoff with a SimpleBackoff (x2, capped at a minute): ``tries``
        calls of ``send``, sleeping between them, not after the last; its last error."""
        delay = first_s
        for attempt in range(tries):
            try:
                return await send()
            except Ec2CallFailed:
                if attempt == tries - 1:
                    raise
                spread = delay * jitter
                await self._sleep(delay + self._rng.uniform(-spread, spread))
                delay = min(delay * TIMERS.tag_backoff_factor, ENI_BACKOFF_MAX_S)
        raise AssertionError("unreachable: the last try returns or raises")

    async def _sleep(self, delay: float) -> None:
        """A timer of the agent's own (back-off, pool pass), its lateness recorded: on this
        machine a sleep ends late when the event loop is busy, and the model replays that."""
        due = time.monotonic() + delay
        await asyncio.sleep(delay)
        self.stats.slept(due, time.monotonic() - due)

    # -- the pool --------------------------------------------------------------------------

    def _counts(self) -> tuple[int, int]:
        total = sum(e.prefixes for e in self._enis)
        assigned = sum(len(used) for e in self._enis for used in e.used.values())
        return total, assigned

    def _free(self) -> int:
        return sum(1 for e in self._enis for used in e.used.values() if not used)

    def _too_low(self) -> bool:
        total, assigned = self._counts()
        shape = self.settings.shape
        return pool_too_low(total, assigned, shape.warm_prefix_target, shape.max_pods)

    def _wants_change(self) -> bool:
        if self._too_low():
            # A full node (no ENI room, no slot left) cannot grow: nothing pending.
            shape = self.settings.shape
            room = any(e.prefixes < shape.max_prefixes_per_eni for e in self._enis)
            return room or len(self._enis) < shape.max_enis
        return prefixes_to_release(self._free(), self.settings.shape.warm_prefix_target) > 0

    async def _pool_manager(self) -> None:
        """StartNodeIPPoolManager: sleep 2.5 s, pool pass, sleep 2.5 s, reconcile."""
        await self._sleep(TIMERS.first_pass_after_s)
        while True:
            await self._pool_pass()
            await self._sleep(TIMERS.pool_pass_s)

    async def _pool_pass(self) -> None:
        """updateIPPoolIfRequired."""
        target = self.settings.shape.warm_prefix_target
        if self._too_low():
            if time.monotonic() < self._insufficient_until:
                return
            try:
                await self._increase()
            except Ec2CallFailed as err:
                log.info("vpc-cni top-up failed: %s", err)
            return
        over = prefixes_to_release(self._free(), target)
        now = time.monotonic()
        if over and now - self._last_decrease > TIMERS.decrease_interval_s:
            self._last_decrease = now
            await self._release(over)

    async def _increase(self) -> None:
        """increaseDatastorePool: tryAssignPrefixes, else tryAllocateENI."""
        shape = self.settings.shape
        total, assigned = self._counts()
        need = prefixes_to_assign(free_prefixes(total, assigned), shape.warm_prefix_target)
        for eni in self._enis:
            if eni.prefixes >= shape.max_prefixes_per_eni:
                continue
            count = min(shape.max_prefixes_per_eni - eni.prefixes, need)
            try:
                answer = await self._assign(eni.eni_id, count)
            except Ec2CallFailed as err:
                if err.code in INSUFFICIENT:
                    self._insufficient_until = (
                        time.monotonic() + TIMERS.insufficient_cidr_cooldown_s
                    )
                log.info("vpc-cni: %s; trying 1 prefix", err)
                answer = await self._assign(eni.eni_id, 1)
            for prefix in answer.get("AssignedIpv4Prefixes", []):
                eni.used.setdefault(prefix["Ipv4Prefix"], {})
            return
        if len(self._enis) < shape.max_enis:
            with contextlib.suppress(Ec2CallFailed):  # an ENI failure never fails init
                await self._allocate_eni(min(need, shape.max_prefixes_per_eni))

    async def _assign(self, eni_id: str, count: int) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call(
            "AssignPrivateIpAddresses", NetworkInterfaceId=eni_id, Ipv4PrefixCount=count
        )
        return answer

    async def _release(self, over: int) -> None:
        """decreaseDatastorePool -> tryUnassignCidrsFromAll -> DeallocCidrs."""
        for eni in reversed(self._enis):
            free = [p for p, used in eni.used.items() if not used][:over]
            if not free:
                continue
            for prefix in free:
                del eni.used[prefix]
            try:
                await self._call(
                    "UnassignPrivateIpAddresses", NetworkInterfaceId=eni.eni_id, Ipv4Prefixes=free
                )
            except Ec2CallFailed as err:
                log.info("vpc-cni release failed: %s", err)
                for prefix in free:  # the reconcile would add them back (see module doc)
                    eni.used[prefix] = {}
            over -= len(free)
            if over <= 0:
                return

    async def _allocate_eni(self, prefixes: int) -> None:
        """tryAllocateENI -> AllocENI (createENI, attachENI, DeleteOnTermination) ->
        WaitForENIAndIPsAttached (IMDS)."""
        subnets = [self._subnet_id]
        try:  # getVpcSubnets: most free addresses first, own subnet or CNI-tagged ones
            answer = await self._call(
                "DescribeSubnets",
                Filters=[
                    {"Name": "vpc-id", "Values": [self._vpc_id]},
                    {"Name": "availability-zone", "Values": [self._az]},
                ],
            )
            found = sorted(
                answer.get("Subnets", []),
                key=lambda s: -int(s.get("AvailableIpAddressCount", 0)),
            )
            subnets = [
                s["SubnetId"]
                for s in found
                if s["SubnetId"] == self._subnet_id
                or any(t["Key"] == SUBNET_DISCOVERY_TAG for t in s.get("Tags", []))
            ]
        except Ec2CallFailed as err:
            log.info("vpc-cni DescribeSubnets failed (%s): the primary ENI's subnet", err)
        eni_id = ""
        for subnet_id in subnets:
            try:
                created = await self._call(
                    "CreateNetworkInterface",
                    Description=ENI_DESCRIPTION_PREFIX + self._instance_id,
                    Groups=list(self._groups),
                    SubnetId=subnet_id,
                    Ipv4PrefixCount=prefixes,
                    TagSpecifications=[
                        {
                            "ResourceType": "network-interface",
                            "Tags": [
                                {"Key": NODE_TAG, "Value": self._instance_id},
                                {"Key": CREATED_AT_TAG, "Value": str(int(time.time()))},
                            ],
                        }
                    ],
                )
                eni_id = created["NetworkInterface"]["NetworkInterfaceId"]
                break
            except Ec2CallFailed as err:
                log.info("vpc-cni CreateNetworkInterface in %s failed: %s", subnet_id, err)
        if not eni_id:
            raise Ec2CallFailed("CreateNetworkInterface", "every subnet failed")
        try:  # attachENI: awsGetFreeDeviceNumber, then attach; on failure deleteENI
            instances = await self._call("DescribeInstances", InstanceIds=[self._instance_id])
            used = {
                ni["Attachment"]["DeviceIndex"]
                for r in instances["Reservations"]
                for inst in r["Instances"]
                for ni in inst.get("NetworkInterfaces", [])
                if ni.get("Attachment", {}).get("NetworkCardIndex", 0) == 0
            }
            device = next(i for i in range(100) if i not in used)
            attached = await self._call(
                "AttachNetworkInterface",
                DeviceIndex=device,
                InstanceId=self._instance_id,
                NetworkInterfaceId=eni_id,
                NetworkCardIndex=0,
            )
        except Ec2CallFailed:
            with contextlib.suppress(Ec2CallFailed):  # logged, AllocENI fails anyway
                await self._delete_eni(eni_id)
            raise
        try:
            await self._call(
                "ModifyNetworkInterfaceAttribute",
                NetworkInterfaceId=eni_id,
                Attachment={"AttachmentId": attached["AttachmentId"], "DeleteOnTermination": True},
            )
        except Ec2CallFailed:
            with contextlib.suppress(Ec2CallFailed):
                await self._free_eni(eni_id)
            raise
        delay = 0.1  # waitForENIAndIPsAttached: 100 ms back-off x2, 12 tries, via IMDS
        for _ in range(TIMERS.describe_all_enis_tries):
            interfaces = await asyncio.to_thread(self.imds.interfaces)
            match = [i for i in interfaces if i.interface_id == eni_id and i.ipv4_prefixes]
            if match:
                self._enis.append(self._eni(match[0]))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
        raise Ec2CallFailed("WaitForENIAndIPsAttached", "not in IMDS")

    async def _delete_eni(self, eni_id: str) -> None:
        """deleteENI: DeleteNetworkInterface, 12 tries; already gone counts as done."""

        async def delete() -> None:
            try:
                await self._call("DeleteNetworkInterface", NetworkInterfaceId=eni_id)
            except Ec2CallFailed as err:
                if err.code != ENI_NOT_FOUND:
                    raise

        await self._with_backoff(delete, ENI_API_TRIES, *DELETE_BACKOFF)

    async def _free_eni(self, eni_id: str) -> None:
        """FreeENI: the attachment from DescribeNetworkInterfaces (one call), detach (12
        tries), 2 s for EC2 to detach, then deleteENI."""
        try:
            described = await self._call("DescribeNetworkInterfaces", NetworkInterfaceIds=[eni_id])
        except Ec2CallFailed as err:
            if err.code == ENI_NOT_FOUND:
                return
            raise
        interfaces = described.get("NetworkInterfaces", [])
        attachment = interfaces[0].get("Attachment", {}) if interfaces else {}
        if attachment.get("AttachmentId"):
            await self._with_backoff(
                partial(
                    self._call, "DetachNetworkInterface", AttachmentId=attachment["AttachmentId"]
                ),
                ENI_API_TRIES,
                *DETACH_BACKOFF,
            )
        await asyncio.sleep(SLEEP_AFTER_DETACH_S)
        await self._delete_eni(eni_id)

    async def _leaked_eni_sweep(self, delay: float) -> None:
        """cleanUpLeakedENIs' first run: one filtered, paginated DescribeNetworkInterfaces."""
        await asyncio.sleep(delay)
        with contextlib.suppress(Ec2CallFailed):
            await self._call(
                "DescribeNetworkInterfaces",
                Filters=[
                    {"Name": "tag-key", "Values": [NODE_TAG]},
                    {"Name": "status", "Values": ["available"]},
                    {"Name": "vpc-id", "Values": [self._vpc_id]},
                ],
                MaxResults=1000,
            )
        self._cleanup_done = True

    # -- the SDK ---------------------------------------------------------------------------

    async def _call(self, action: str, **params: Any) -> Any:
        """One EC2 operation through the Go SDK's standard retryer."""
        from botocore import xform_name
        from botocore.exceptions import BotoCoreError, ClientError

        method = getattr(self._client, xform_name(action))
        last_cost = 0
        for attempt in range(1, SDK.max_attempts + 1):
            started = time.monotonic()
            status = 0
            try:
                answer = await asyncio.to_thread(partial(method, **params))
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", "Unknown"))
                status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            except BotoCoreError:
                code = TRANSPORT_ERROR
            else:
                self.stats.request(action, time.monotonic() - started, None)
                refund = SDK.success_refund if attempt == 1 else last_cost
                self._quota = min(SDK.quota_tokens, self._quota + refund)
                return answer
            self.stats.request(action, time.monotonic() - started, code)
            retryable = (
                code == TRANSPORT_ERROR
                or status in SDK.retryable_status
                or code in SDK_THROTTLE_CODES
            )
            if not retryable or attempt == SDK.max_attempts:
                raise Ec2CallFailed(action, code)
            cost = SDK.timeout_retry_cost if code == TRANSPORT_ERROR else SDK.retry_cost
            if self._quota < cost:
                raise Ec2CallFailed(action, code, "retry quota exceeded")
            self._quota -= cost
            last_cost = cost
            bound = SDK.backoff_bound_s(attempt)
            delay = bound if SDK.backoff_is_fixed(attempt) else self._rng.uniform(0, bound)
            self.stats.retry(action, code, delay)
            await self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")
