"""The node agent's host networking in memory, for fleets too large for namespaces.

A fleet of thousands of agents in one process cannot give each a network namespace, so
each gets a ``MemoryHost``: it does what ``ipam.hostnet.HostNetwork`` is asked to do (find
the link of an ENI by MAC, set ENIs up, tear them down) against a table of links that
follows the emulated cloud, and records the result. A link exists from the moment EC2
attaches the ENI to the instance until it detaches it, as the kernel hot-plugs it on an
instance; ``LinkTable`` learns that from the cloud's events.

It is an ``ipam.hostnet.HostNetworkPort`` (``find_link``, ``setup_eni``, ``setup_enis``,
``teardown_eni``, ``close``), with the same errors: ``LinkNotFound`` when no link has the
ENI's MAC. (``tests/ipam/recording_hostnet.py`` records routes and rules for the agent's
logic tests; this one only needs links to follow EC2, for thousands of nodes.)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from tools.lab.events import EniView

if TYPE_CHECKING:
    from ipam.hostnet import EniLink


class Links(Protocol):
    """Where an instance's links come from: ``LinkTable``, or a proxy to one elsewhere."""

    def link(self, instance_id: str, mac: str) -> str | None: ...


class LinkTable:
    """MAC -> (instance, link name) for every attached ENI; a ``CloudListener``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[str, tuple[str, str]] = {}

    def eni_attached(self, eni: EniView) -> None:
        with self._lock:
            # eth<n> in attachment order per card, as the lab node names them
            self._links[eni.mac] = (eni.instance_id, f"eth{eni.network_card}.{eni.device_index}")

    def eni_detached(self, eni: EniView) -> None:
        with self._lock:
            self._links.pop(eni.mac, None)

    def eni_addresses_changed(self, eni: EniView) -> None:
        pass  # addresses live in the VPC fabric, not on the host's links

    def link(self, instance_id: str, mac: str) -> str | None:
        with self._lock:
            found = self._links.get(mac)
        if found is None or found[0] != instance_id:
            return None
        return found[1]


class MemoryHost:
    """One instance's host networking: configured ENIs recorded, links from ``links``."""

    def __init__(self, links: Links, instance_id: str) -> None:
        self._links = links
        self._instance_id = instance_id
        self.configured: dict[str, EniLink] = {}  # ENI id -> what was set up for it
        self.setups = 0
        self.teardowns = 0
        self.closed = False

    def find_link(self, mac: str) -> str | None:
        return self._links.link(self._instance_id, mac)

    def setup_eni(self, eni: EniLink) -> None:
        from ipam.hostnet import LinkNotFound

        if self.find_link(eni.mac) is None:
            raise LinkNotFound(eni.eni_id, eni.mac)
        self.configured[eni.eni_id] = eni
        self.setups += 1

    def setup_enis(self, enis: Sequence[EniLink]) -> None:
        for eni in enis:
            self.setup_eni(eni)

    def teardown_eni(self, eni: EniLink) -> None:
        self.configured.pop(eni.eni_id, None)
        self.teardowns += 1

    def close(self) -> None:
        self.closed = True
