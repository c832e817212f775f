"""The node daemon's Prometheus metrics, on a registry of its own.

Names are ``ultranet_ipamd_*``. The VPC CNI's equivalents, for users moving dashboards:
``awscni_assigned_ip_addresses`` → ``ultranet_ipamd_addresses_assigned``,
``awscni_total_ip_addresses`` → ``ultranet_ipamd_addresses_total``,
``awscni_aws_api_latency_ms`` → ``ultranet_ipamd_ec2_request_seconds``,
``awscni_aws_api_error_count`` → ``ultranet_ipamd_ec2_errors_total``,
``awscni_add_ip_req_count`` / ``awscni_del_ip_req_count`` → the ``_count`` of
``ultranet_ipamd_cni_command_seconds{command="ADD"|"DEL"}``, which also times the whole
command (the VPC CNI counts requests but times none). Each gauge has a ``card`` label,
because a p5.48xlarge has 32 pools, not one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ALLOCATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
JOURNAL_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
# A whole CNI command: a DEL or a warm ADD takes milliseconds; an ADD that waits for an
# address or a multi-NIC pod's many veths, tens to hundreds.
CNI_COMMAND_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
EC2_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class IpamdMetrics:
    """Every metric the daemon exports; also an ``Ec2Stats`` for the EC2 client."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "ultranet_ipamd_"
        self.assigned = Gauge(
            p + "addresses_assigned", "Addresses held by pods", ["card"], registry=r
        )
        self.total = Gauge(
            p + "addresses_total", "Addresses in the card's prefixes", ["card"], registry=r
        )
        self.cooldown = Gauge(
            p + "addresses_cooldown",
            "Released addresses still in IP_COOLDOWN_PERIOD",
            ["card"],
            registry=r,
        )
        self.prefixes = Gauge(p + "prefixes", "/28 prefixes held", ["card"], registry=r)
        self.enis = Gauge(p + "enis", "ENIs carrying pod addresses", ["card"], registry=r)
        self.ready = Gauge(
            p + "ready", "1 when every managed card meets its warm target", registry=r
        )
        self.allocation_seconds = Histogram(
            p + "allocation_seconds",
            "Time from request to durable answer, by operation",
            ["op"],
            buckets=ALLOCATION_BUCKETS,
            registry=r,
        )
        self.cni_command_seconds = Histogram(
            p + "cni_command_seconds",
            "CNI commands answered, from request read to answer sent, by command and "
            "code (0: success, else the CNI error code)",
            ["command", "code"],
            buckets=CNI_COMMAND_BUCKETS,
            registry=r,
        )
        self.journal_sync_seconds = Histogram(
            p + "journal_sync_seconds",
            "Journal group commits (write + fdatasync), by where they ran",
            ["mode"],
            buckets=JOURNAL_BUCKETS,
            registry=r,
        )
        self.allocation_errors = Counter(
            p + "allocation_errors_total", "Allocations refused, by reason", ["reason"], registry=r
        )
        self.ec2_requests = Counter(
            p + "ec2_requests_total", "EC2 API requests (each attempt)", ["action"], registry=r
        )
        self.ec2_errors = Counter(
            p + "ec2_errors_total", "EC2 API errors by code", ["action", "code"], registry=r
        )
        self.ec2_seconds = Histogram(
            p + "ec2_request_seconds",
            "EC2 API latency",
            ["action"],
            buckets=EC2_BUCKETS,
            registry=r,
        )
        self.ec2_retries = Counter(
            p + "ec2_retries_total",
            "EC2 retries after throttling or 5xx",
            ["action", "code"],
            registry=r,
        )
        self.ec2_rate_limited_seconds = Counter(
            p + "ec2_rate_limited_seconds_total",
            "Time spent waiting on the client-side EC2 rate limit",
            ["action"],
            registry=r,
        )
        self.insufficient_cidr = Counter(
            p + "insufficient_cidr_blocks_total",
            "InsufficientCidrBlocks answers, by subnet",
            ["subnet"],
            registry=r,
        )
        self.force_removed = Counter(
            p + "force_removed_allocations_total",
            "Allocations lost because EC2 removed their ENI or prefix",
            registry=r,
        )
        self.stray_veths_reaped = Counter(
            p + "stray_veths_reaped_total",
            "Host veths of this CNI (eni* and IPv6 pods' v4e*) that no allocation "
            "accounted for, deleted at start or by the periodic sweep",
            registry=r,
        )
        self.stray_rules_reaped = Counter(
            p + "stray_rules_reaped_total",
            "Host rules 512/1536 of pod addresses no allocation or veth accounted for, "
            "deleted at start or by the periodic sweep",
            registry=r,
        )
        self.stray_allocations_released = Counter(
            p + "stray_allocations_released_total",
            "CNI allocations released because none of their host veths existed (the pod's "
            "namespace went without a DEL), at start or by the periodic sweep",
            registry=r,
        )
        self.stray_sweeps = Counter(
            p + "stray_sweeps_total",
            "Periodic stray sweeps, by outcome: ok, or failed (logged; the next one retries)",
            ["outcome"],
            registry=r,
        )

    # -- cni.transport.Observe -------------------------------------------------------

    def cni_command(self, command: str, code: int, seconds: float) -> None:
        self.cni_command_seconds.labels(command, str(code)).observe(seconds)

    # -- ipam.ec2.Ec2Stats -------------------------------------------------------------

    def request(self, action: str, latency_s: float, error_code: str | None) -> None:
        self.ec2_requests.labels(action).inc()
        self.ec2_seconds.labels(action).observe(latency_s)
        if error_code is not None:
            self.ec2_errors.labels(action, error_code).inc()

    def retry(self, action: str, code: str, delay_s: float) -> None:
        self.ec2_retries.labels(action, code).inc()

    def rate_limited(self, action: str, wait_s: float) -> None:
        self.ec2_rate_limited_seconds.labels(action).inc(wait_s)
