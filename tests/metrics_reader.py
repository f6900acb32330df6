"""What a service's OpenTelemetry instruments recorded, read without an exporter."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader


class RecordedMetrics:
    """A meter provider for a Service, and its readings as {(name, attributes): value};
    a histogram's value is its count of recordings."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def read(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], float]:
        found: dict[tuple[str, frozenset[tuple[str, Any]]], float] = {}
        data = self.reader.get_metrics_data()
        if data is None:
            return found
        for resource_metrics in data.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        key = (metric.name, frozenset((point.attributes or {}).items()))
                        found[key] = (
                            point.count if isinstance(point, HistogramDataPoint) else point.value  # type: ignore[union-attr]
                        )
        return found

    def value(self, name: str, **attributes: Any) -> float:
        """The value of ``name`` with exactly these attributes (0 if never recorded)."""
        return self.read().get((name, frozenset(attributes.items())), 0)
