"""Verify a ModelPress webhook delivery (Standard Webhooks signatures) and get it as a typed event.

```python
from modelpress.webhooks import verify, WebhookVerificationError

event = verify(body, request.headers, "whsec_…")  # raises WebhookVerificationError if forged or stale
if event.type == "job.succeeded":
    print(event.data.job_id, event.data.summary)
```
Deliveries are at least once: dedupe on ``event.webhook_id`` (the ``webhook-id`` header, the same on retries).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from standardwebhooks import Webhook, WebhookVerificationError

__all__ = ["WebhookEvent", "WebhookEventData", "WebhookVerificationError", "verify"]


class WebhookEventData(BaseModel):
    """The thin payload: which job, its status, and per event type a few facts (summary, error, progress)."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    status: str | None = None
    summary: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    progress: float | None = None
    message: str | None = None


class WebhookEvent(BaseModel):
    """One delivery: ``type`` (``job.succeeded``, …), when it happened, its data, and its ``webhook-id``."""

    model_config = ConfigDict(extra="allow")

    type: str
    timestamp: datetime
    data: WebhookEventData
    webhook_id: str | None = None


def verify(body: bytes | str, headers: Mapping[str, str], secret: str) -> WebhookEvent:
    """Check the ``webhook-signature`` (any of the ``v1,…`` signatures: during a secret rotation there are
    two) and the timestamp (±5 minutes), then parse the event. Raises :class:`WebhookVerificationError`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    payload = Webhook(secret).verify(body, lowered)
    event = WebhookEvent.model_validate(payload)
    event.webhook_id = lowered.get("webhook-id")
    return event
