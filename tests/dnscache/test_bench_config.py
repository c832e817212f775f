"""The DNS benchmark's JSON carries its configuration, and every server gets the same bounds.

Pure checks of the benchmark's own code (``tools/bench/dns``): nothing is started here.
"""

from __future__ import annotations

from pathlib import Path

from dnscache.config import UpstreamConfig
from tools.bench.dns import __main__ as bench
from tools.bench.dns import dnsmasq_wedge, servers


def test_the_run_config_holds_every_flag_the_peers_versions_and_the_commit() -> None:
    argv = ["--runs", "2", "--duration", "4", "--servers", "ultranet,dnsmasq", "--json"]
    args = bench.parser().parse_args(argv)
    config = bench.run_config(args, argv)
    assert config["flags"] == {k: v for k, v in vars(args).items()}
    assert config["command"] == "python -m tools.bench.dns " + " ".join(argv)
    assert config["servers"] == ["ultranet", "dnsmasq"]
    assert config["runs_per_phase"] == 2 and config["saturation_run_seconds"] == 4
    assert config["cache_entries_each"] == servers.CACHE_ENTRIES
    assert config["max_in_flight_each"] == servers.MAX_IN_FLIGHT
    assert config["dnsperf"] == {"clients": 4, "max_outstanding": 100, "timeout_s": 2}
    assert "half of a 3 s saturation run" in config["p99_method"]
    assert set(config["versions"]) == {"python", "dnsperf", "nsd", "dnsmasq", "unbound", "dnsdist"}
    assert len(config["git"]["commit"]) == 40
    assert isinstance(config["git"]["uncommitted_in_benchmarked_paths"], list)


def test_machine_load_and_steal_between_two_samples() -> None:
    before = bench.machine_load()
    assert len(before["loadavg"]) == 3 and "load average" in before["uptime"]
    after = dict(
        before,
        cpu_ticks=[
            str(int(t) + d)
            for t, d in zip(before["cpu_ticks"], [60, 0, 20, 10, 0, 0, 0, 10, 0, 0], strict=False)
        ],
    )
    assert bench.steal_fraction(before, after) == 0.1  # 10 of 100 ticks stolen


def test_every_server_forwards_at_most_as_many_queries_at_once_as_ultranet_ships() -> None:
    limit = servers.MAX_IN_FLIGHT
    assert limit == UpstreamConfig().max_concurrent  # ultranet at its shipped default
    assert f"max_concurrent: {limit}" in servers.ultranet_conf(5300, None, False)
    assert f"--dns-forward-max={limit}" in servers.dnsmasq_argv(5301, 5300)
    assert f"num-queries-per-thread: {limit}\n" in servers.unbound_conf(Path("/x"), 1, 2, False)
    assert f"setMaxUDPOutstanding({limit})" in servers.dnsdist_conf(5301, 5300, False)
    # and dnsperf never has more outstanding than that, so none of the bounds binds
    assert bench.DNSPERF_OUTSTANDING < limit


def test_the_wedge_tool_reads_dnsmasqs_cache_statistics_line() -> None:
    # dnsmasq 2.90's line on SIGUSR1, as logged by --log-facility
    line = (
        "Dec  6 22:37:40 dnsmasq[1]: cache size 200000, 398/400793 cache insertions "
        "re-used unexpired cache entries.\n"
    )
    assert dnsmasq_wedge.REUSED.findall(line) == [("200000", "398", "400793")]
