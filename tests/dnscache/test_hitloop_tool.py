"""The hit-loop timer (``tools/bench/dns/hitloop.py``) drives the worker's real UDP hit path;
a small run keeps it working as that path changes (it refuses to time a run whose warm-up
did not answer every query)."""

from __future__ import annotations

from tools.bench.dns import hitloop


def test_the_hit_loop_timer_answers_every_query_and_times_each_round() -> None:
    per_hit = hitloop.run(names=50, queries=300, rounds=2)
    assert len(per_hit) == 2 and all(t > 0 for t in per_hit)
