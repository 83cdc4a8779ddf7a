"""The Grafana dashboard the chart ships asks only for metrics a running quotad really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from quotad_server.metrics import Metrics, MetricsEndpoint
from quotad_server.store.embedded import EmbeddedRedis

from tests.conftest import ManualClock, rpc_error, running_quotad
from tests.metrics_scrape import names, scrape

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "quotad" / "dashboards" / "quotad.json"
METRIC = re.compile(r"\b(quotad_[a-z0-9_]+)\b")
POLICY = """
    defaults: {tier: free}
    leases: {default: 10s, min: 1s, max: 1m}
    models: {gpt-4o: {}}
    tiers:
      free:
        limits:
          - {name: requests-per-day, metric: requests, limit: 3, period: 1d, algorithm: sliding_window}
          - {name: requests-per-day-new, metric: requests, limit: 1, period: 1d, algorithm: sliding_window, shadow: true}
    global:
      limits:
        - {name: gpt-4o-tpm, metric: total_tokens, limit: 800000, period: 1m, model: gpt-4o}
"""


def panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


async def _exercise_everything() -> set[str]:
    """Real traffic that makes every metric the dashboard reads exist, then a real scrape."""
    metrics = Metrics()
    endpoint = MetricsEndpoint(metrics, "127.0.0.1:0")
    clock = ManualClock()
    try:
        with EmbeddedRedis() as redis:
            async with running_quotad(POLICY, redis.url, clock=clock, metrics=metrics, subject="a") as q:
                metrics.policy_loaded("0" * 64)  # what cli.py does once the policy file is loaded
                first, second, _ = [
                    await q.reserve(model="gpt-4o", input_tokens=10, max_output_tokens=10) for _ in range(3)
                ]  # the second and third: shadow denials
                await q.reserve(model="gpt-4o")  # denied: requests-per-day
                await q.release(second.reservation_id)
                clock.advance(11)
                await q.commit(first.reservation_id, input_tokens=8, output_tokens=12)  # late
                redis.stop()
                await rpc_error(q.reserve(model="gpt-4o"))  # a Redis error
                return names(scrape(endpoint.port))
    finally:
        endpoint.close()


async def test_every_panel_query_reads_metrics_the_service_exports() -> None:
    exported = await _exercise_everything()
    for panel in panels():
        queried = {name for target in panel["targets"] for name in METRIC.findall(target["expr"])}
        assert queried, f"panel {panel['title']!r} reads no quotad metric"
        missing = queried - exported
        assert not missing, f"panel {panel['title']!r} reads metrics quotad does not export: {missing}"


def test_the_dashboard_has_the_panels_operators_need() -> None:
    titles = " | ".join(panel["title"].lower() for panel in panels())
    for needed in ("admitted vs denied by tier", "token spend vs limit", "p99 decision latency"):
        assert needed in titles
    assert "redis errors" in titles
    assert "estimation error" in titles
    assert "shadow denials" in titles
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}"


def test_no_panel_groups_by_subject_or_tenant() -> None:
    """Those labels do not exist (unbounded cardinality); a query using them would show nothing."""
    for panel in panels():
        for target in panel["targets"]:
            assert not re.search(r"\b(subject|tenant)\b", target["expr"]), panel["title"]


SCOPE = ('namespace=~"$namespace"', 'job=~"$job"', 'instance=~"$instance"')


def test_namespace_job_and_instance_narrow_every_query() -> None:
    """Variables chained namespace -> job -> instance (All by default), used by every series a panel reads."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "job", "instance"]
    for name in ("namespace", "job", "instance"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == "${datasource}"
        assert variable["includeAll"]
        assert variable["multi"]
        assert variable["allValue"] == ".*"  # "All" also matches series without the label (plain Docker)
        assert variable["query"]["query"] == variable["definition"]
        assert variable["definition"].startswith("label_values(quotad_build_info")
        assert variable["definition"].endswith(f", {name})")
    assert '{namespace=~"$namespace"}' in variables["job"]["definition"]
    assert '{namespace=~"$namespace", job=~"$job"}' in variables["instance"]["definition"]
    for panel in panels():
        for target in panel["targets"]:
            for name, selector in re.findall(r"\b(quotad_[a-z0-9_]+)(\{[^}]*\})?", target["expr"]):
                for matcher in SCOPE:
                    assert matcher in selector, f"panel {panel['title']!r}: {name} lacks {matcher}"
