"""Prometheus metrics of the alert webhooks (needs the ``metrics`` extra).

Exported per webhook, labelled ``webhook`` (its position among ``--alert-webhook``
options, from 0) and ``host`` (the URL's host only: paths and queries of webhook URLs
often hold secrets):

==========================================  =======  ======================================
``artcafe_webhook_sent_total``              counter  documents accepted (2xx)
``artcafe_webhook_failed_total``            counter  documents given up on (retries exhausted, 4xx)
``artcafe_webhook_dropped_total``           counter  documents dropped: queue full, or events lost
``artcafe_webhook_retries_total``           counter  retried attempts
``artcafe_webhook_queued``                  gauge    documents waiting in the queue now
==========================================  =======  ======================================
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._webhooks import Webhook

__all__ = ["WebhookCollector"]

_COUNTERS = (
    ("sent", "Alert documents accepted by the receiver (2xx)."),
    ("failed", "Alert documents given up on (retries exhausted, or a 4xx answer)."),
    ("dropped", "Alert documents dropped (queue full, or events the feed lost)."),
    ("retries", "Alert POST attempts retried."),
)


class WebhookCollector(Collector):
    """Reads each webhook's :class:`~._webhooks.WebhookStats` when Prometheus scrapes
    (plain integer reads: safe from the metrics server's thread)."""

    def __init__(self, webhooks: Sequence[Webhook]) -> None:
        self.webhooks = tuple(webhooks)
        self._labels = [
            (str(i), urllib.parse.urlsplit(w.config.url).hostname or "")
            for i, w in enumerate(self.webhooks)
        ]

    def collect(self) -> Iterator[Metric]:
        for name, documentation in _COUNTERS:
            family = CounterMetricFamily(
                f"artcafe_webhook_{name}", documentation, labels=["webhook", "host"]
            )
            for labels, webhook in zip(self._labels, self.webhooks, strict=True):
                family.add_metric(list(labels), getattr(webhook.stats, name))
            yield family
        queued = GaugeMetricFamily(
            "artcafe_webhook_queued",
            "Alert documents waiting to be sent.",
            labels=["webhook", "host"],
        )
        for labels, webhook in zip(self._labels, self.webhooks, strict=True):
            queued.add_metric(list(labels), webhook.waiting)
        yield queued
