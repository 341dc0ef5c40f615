"""Observability: correlated structured logs, Prometheus metrics and OpenTelemetry traces.

Torch-free (the API and the maintenance worker import it) and cheap when switched off. The pieces:
``context`` (what a log line is about), ``logs`` (text or JSON lines), ``metrics`` (every metric
ModelPress exports, and the registry a process serves), ``jobs`` (job metrics and log lines derived
from the job events, in one place), ``cluster`` (gauges read from the database and the broker at
scrape time), ``http`` (the API's middleware and ``/metrics``), ``celery`` (the worker processes'
signals) and ``tracing`` (OpenTelemetry, imported only when an OTLP endpoint is configured).
"""
