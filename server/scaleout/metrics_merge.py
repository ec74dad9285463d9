"""One `/metrics` for a Ray application: the replicas' expositions merged, each series
labelled with the replica it came from (`replica="replica-0"`).

Why a merge of our own expositions and not Ray's metrics export: the series stay the
ones the single-process server exposes (names, labels, histograms), scraped from the one
endpoint users already point Prometheus at, with no Ray dashboard or metrics agent to
run; the price is staleness of up to `ray.beat_interval_s` for the replicas other than
the one answering the scrape (each publishes its exposition to the coordinator on every
beat: server/scaleout/coordinator.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

LABEL = "replica"


def merge(expositions: Mapping[str, bytes]) -> bytes:
    """Prometheus text of every family in `expositions` (replica name -> its text), each
    sample labelled with its replica; families keep the first replica's help and type."""
    families: dict[str, Metric] = {}
    for replica in sorted(expositions):
        for family in text_string_to_metric_families(expositions[replica].decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                Sample(s.name, {**s.labels, LABEL: replica}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families
