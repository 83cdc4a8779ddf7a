"""The README and docs/ hold together: every relative link lands, the README stays short, and the
metrics table says exactly what server/quotad_server/metrics.py registers."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase
from quotad_server import metrics as metrics_module
from quotad_server.metrics import InstrumentedStore, Metrics
from quotad_server.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
METRICS_DOC = ROOT / "docs" / "operations.md"
EXAMPLE_POLICY = ROOT / "server" / "quotad_server" / "examples" / "policy.yaml"
PAGES = sorted(
    [
        README,
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("clients/*/README.md"),
        ROOT / "helm" / "quotad" / "README.md",
    ]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Exposition suffixes by metric type: prometheus_client names a counter `x` and exposes `x_total`.
SUFFIX = {"counter": "_total", "info": "_info"}


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slug(match) for match in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def links(page: Path) -> Iterator[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for target in LINK.findall(text):
        if not target.startswith(("http://", "https://", "mailto:")):
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_lands(page: Path) -> None:
    for target in links(page):
        path, _, anchor = target.partition("#")
        landing = (page.parent / path).resolve() if path else page
        assert landing.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
        if anchor and landing.suffix == ".md":
            assert anchor in anchors(landing), f"{page.relative_to(ROOT)}: no heading for {target}"


def test_the_readme_is_a_door_not_the_house() -> None:
    text = README.read_text()
    assert len(text.encode()) < 24_000, "move long parts into docs/"
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    for needed in ("Quickstart", "The contract", "Clients", "Performance", "Settings", "Security"):
        assert needed in headings
    assert "### What `UNAVAILABLE` means" in text
    for page in ("performance", "policy", "cost", "bursts", "operations", "security"):
        assert f"(docs/{page}.md)" in text, f"the README does not link docs/{page}.md"


def documented_metrics() -> dict[str, tuple[set[str], dict[str, set[str]]]]:
    """The metrics table: each name -> (its label names, the values listed for a label)."""
    text = METRICS_DOC.read_text()
    table = text[text.index("| metric | labels | what |") :].split("\n\n", 1)[0]
    found: dict[str, tuple[set[str], dict[str, set[str]]]] = {}
    for row in table.splitlines()[2:]:
        names_cell, labels_cell, _what = (cell.strip() for cell in row.strip("|").split("|", 2))
        labels = set(re.findall(r"`(\w+)`", labels_cell))
        values = {
            label: {value.strip() for value in listed.split(",")}
            for label, listed in re.findall(r"`(\w+)` \(([^)]*)\)", labels_cell)
        }
        for name in re.findall(r"`(quotad_\w+)`", names_cell):
            found[name] = (labels, values)
    return found


def registered_metrics() -> dict[str, set[str]]:
    """Every quotad_* series name metrics.py exposes -> its label names."""
    metrics = Metrics()
    metrics.watch_policy(_Holder())
    families = [*metrics.registry.collect(), *metrics_module._Workers((), 0.1).collect()]
    wrappers = {w._name: w for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)}
    found: dict[str, set[str]] = {}
    for family in families:
        if not family.name.startswith("quotad_"):
            continue
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        labels |= set(getattr(family, "_labelnames", ()))
        if family.name in wrappers:
            labels |= set(wrappers[family.name]._labelnames)
        found[family.name + SUFFIX.get(family.type, "")] = labels
    return found


class _Holder:
    def __init__(self) -> None:
        self.policy = load_policy(EXAMPLE_POLICY)


def test_the_metrics_table_and_the_code_agree() -> None:
    documented = documented_metrics()
    registered = registered_metrics()
    assert set(documented) == set(registered), (
        f"undocumented: {sorted(set(registered) - set(documented))}; "
        f"documented but gone: {sorted(set(documented) - set(registered))}"
    )
    for name, labels in registered.items():
        assert documented[name][0] == labels, (
            f"{name}: the table says {documented[name][0]}, the code {labels}"
        )


def test_every_store_operation_is_documented() -> None:
    operations = set(re.findall(r'self\._timed\("(\w+)"', inspect.getsource(InstrumentedStore)))
    assert "record_usage" in operations
    _labels, values = documented_metrics()["quotad_redis_call_duration_seconds"]
    assert values["operation"] == operations
