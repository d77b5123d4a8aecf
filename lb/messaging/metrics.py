"""The messenger's own series, in the gateway's registry: what was answered, what is in flight,
how often the broker failed. Labelled by stream (its requests URL without the password).

Messages are far rarer than HTTP requests on the hot path, so prometheus-client's own metric
objects are cheap enough here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class MessagingMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.responses = Counter(
            "kvgate_messaging_responses", "Response messages published (and their requests "
            "acknowledged), by status code.", ["stream", "status_code"], registry=registry)
        self.in_flight = Gauge(
            "kvgate_messaging_in_flight", "Request messages being handled.", ["stream"],
            registry=registry)
        self.broker_errors = Counter(
            "kvgate_messaging_broker_errors", "Broker failures (each closes the stream's "
            "connections and reconnects after the back-off).", ["stream"], registry=registry)
