"""Webhooks: tenant endpoints, the job-event outbox, and the relay that delivers it (Standard Webhooks)."""
