"""The outbox relay: claim due deliveries, send them signed, record what happened.

One round: (1) in a short transaction, claim the *head* of each endpoint's queue — its oldest pending
delivery, if due — with ``SELECT … FOR UPDATE SKIP LOCKED`` (SQLite has no row locks; the embedded
mode runs one worker, so a plain select is enough) and push its ``next_attempt_at`` forward as a
lease; (2) outside any transaction, POST each one (different endpoints in parallel); (3) in a second
short transaction, record the attempt and the outcome. A relay that dies between (1) and (3) leaves
the lease to expire and the delivery is sent again with the same ``webhook-id`` (at-least-once; the
receiver dedupes on it).

Outcomes: 2xx delivered; 410 Gone disables the endpoint; anything else — 3xx (redirects are never
followed), 4xx, 5xx, a timeout, an unsafe address — is retried with exponential backoff and jitter
(:func:`backoff_delay`), or after ``Retry-After`` when the receiver sends one, until
``settings.webhook_max_attempts`` (about three days). Ordering: while an endpoint's head waits for a
retry, its later deliveries wait too.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import httpx
from sqlalchemy import CursorResult, exists, select, update
from sqlalchemy.orm import aliased, undefer
from standardwebhooks import Webhook

from app.config import Settings, get_settings
from app.db import session_scope, utcnow
from app.netsafety import Resolver, UnsafeURLError, check_url, pinned_request
from app.observability import metrics
from app.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from modelpress.schemas import retry_after_seconds

log = logging.getLogger("modelpress.webhooks")

WEBHOOK_RELAY_TASK = "modelpress.deliver_webhooks"
BACKOFF_BASE_S = 30.0  # first retry after ~30 s, then doubling …
BACKOFF_CAP_S = 12 * 3600.0  # … up to 12 h between attempts: 17 attempts span ~3.2 days
RETRY_AFTER_MAX_S = 12 * 3600.0
RESPONSE_EXCERPT_BYTES = 1000
USER_AGENT = "ModelPress-Webhooks/1.0"


def backoff_delay(failed_attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after ``failed_attempts`` failures: 30 s·2ⁿ⁻¹ capped at 12 h, ±20 % jitter.

    The jitter spreads the retries of many deliveries that failed together (a receiver outage) so they
    do not all return at the same second.
    """
    base = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(failed_attempts - 1, 0))
    return base * (rng or random).uniform(0.8, 1.2)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """A receiver's ``Retry-After`` as seconds, clamped to [1 s, 12 h]; None if absent/invalid."""
    seconds = retry_after_seconds(value, now)
    return None if seconds is None else min(max(seconds, 1.0), RETRY_AFTER_MAX_S)


@dataclass(frozen=True)
class Claim:
    """What a relay needs to send one delivery, read inside the claim transaction."""

    seq: int
    delivery_id: str
    endpoint_id: str
    url: str
    secrets: tuple[str, ...]
    body: str
    attempt_count: int
    # For the delivery's metrics and log line: which job and event, and when the event was written.
    job_id: str | None = None
    event_type: str = ""
    created_at: datetime | None = None


@dataclass
class Outcome:
    status_code: int | None
    latency_ms: int
    error: str | None = None
    retry_after_s: float | None = None
    excerpt: str | None = None


@dataclass
class RelayStats:
    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    disabled_endpoints: list[str] = field(default_factory=list)


def sign_headers(claim: Claim, at: datetime | None = None) -> dict[str, str]:
    """Standard Webhooks headers; one ``v1,`` signature per active secret (rotation overlap), space-separated."""
    timestamp = at or datetime.now(UTC)
    signatures = " ".join(Webhook(secret).sign(claim.delivery_id, timestamp, claim.body) for secret in claim.secrets)
    return {
        "webhook-id": claim.delivery_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


class Relay:
    """Delivers due webhook deliveries; one instance per process, reusable across rounds."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        client: httpx.Client | None = None,
        resolver: Resolver | None = None,
        concurrency: int = 8,
        batch_size: int = 100,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings or get_settings()
        # trust_env=False: an HTTP(S)_PROXY variable must not reroute a request pinned to a vetted address.
        self._own_client = client is None
        self.client = client or httpx.Client(follow_redirects=False, trust_env=False)
        self.resolver = resolver
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.clock = clock
        self.timeout = httpx.Timeout(self.settings.webhook_timeout_s, connect=min(5.0, self.settings.webhook_timeout_s))

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    # (1) claim ------------------------------------------------------------------------------------

    def claim(self, now: datetime) -> list[Claim]:
        """Claim the due head delivery of each enabled endpoint and lease it for the length of one attempt."""
        earlier = aliased(WebhookDelivery)
        lease_until = now + timedelta(seconds=self.settings.webhook_timeout_s * 2 + 30)
        with session_scope() as session:
            rows = session.execute(
                select(WebhookDelivery, WebhookEndpoint)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .options(undefer(WebhookEndpoint.secret), undefer(WebhookEndpoint.previous_secret))
                .where(
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                    WebhookEndpoint.enabled.is_(True),
                    # The per-endpoint ordering rule: nothing overtakes an earlier pending delivery.
                    ~exists().where(
                        earlier.endpoint_id == WebhookDelivery.endpoint_id,
                        earlier.status == "pending",
                        earlier.seq < WebhookDelivery.seq,
                    ),
                )
                .order_by(WebhookDelivery.seq)
                .limit(self.batch_size)
                .with_for_update(of=WebhookDelivery, skip_locked=True)
            ).all()
            claims = []
            for delivery, endpoint in rows:
                delivery.next_attempt_at = lease_until
                secrets = [endpoint.secret]
                expires = endpoint.previous_secret_expires_at
                if endpoint.previous_secret and expires is not None and expires > now:
                    secrets.append(endpoint.previous_secret)
                claims.append(
                    Claim(
                        seq=delivery.seq,
                        delivery_id=delivery.id,
                        endpoint_id=endpoint.id,
                        url=endpoint.url,
                        secrets=tuple(secrets),
                        body=json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True),
                        attempt_count=delivery.attempt_count,
                        job_id=delivery.job_id,
                        event_type=delivery.event_type,
                        created_at=delivery.created_at,
                    )
                )
        return claims

    # (2) send -------------------------------------------------------------------------------------

    def send(self, claim: Claim) -> Outcome:
        """One HTTP attempt, to an address vetted just now; never raises."""
        started = time.monotonic()

        def elapsed() -> int:
            return int((time.monotonic() - started) * 1000)

        try:
            # Re-checked at every attempt: the name may resolve somewhere else since the endpoint was made.
            vetted = check_url(claim.url, self.settings, self.resolver)
        except UnsafeURLError as exc:
            return Outcome(None, elapsed(), error=f"refused: {exc}")
        try:
            headers = sign_headers(claim)
            body = claim.body.encode()
            response = pinned_request(self.client, vetted, "POST", headers=headers, content=body, timeout=self.timeout)
            try:
                # Read a bounded excerpt only: a receiver cannot make the relay buffer a large answer,
                # nor hold it by trickling one byte per read timeout (the attempt has a deadline).
                excerpt = b""
                for chunk in response.iter_bytes():
                    excerpt += chunk
                    if len(excerpt) >= RESPONSE_EXCERPT_BYTES:
                        break
                    if time.monotonic() - started > self.settings.webhook_timeout_s:
                        raise httpx.ReadTimeout("the answer did not arrive within the attempt's deadline")
            finally:
                response.close()
        except httpx.TimeoutException:
            return Outcome(None, elapsed(), error=f"timed out after {self.settings.webhook_timeout_s:g} s")
        except httpx.HTTPError as exc:
            return Outcome(None, elapsed(), error=f"{type(exc).__name__}: {exc}"[:500])
        error = None
        if 300 <= response.status_code < 400:
            error = f"redirect to {response.headers.get('location', '?')!r} not followed"[:500]
        elif response.status_code >= 400:
            error = f"HTTP {response.status_code}"
        return Outcome(
            response.status_code,
            elapsed(),
            error=error,
            retry_after_s=parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC)),
            excerpt=excerpt[:RESPONSE_EXCERPT_BYTES].decode("utf-8", "replace"),
        )

    # (3) record -----------------------------------------------------------------------------------

    def record(self, claim: Claim, outcome: Outcome, now: datetime, stats: RelayStats) -> None:
        """Write the attempt and move the delivery on: delivered, retry later, or failed (410 disables)."""
        code = outcome.status_code
        attempts = claim.attempt_count + 1
        values: dict[str, object] = {
            "attempt_count": attempts,
            "last_attempt_at": now,
            "last_status_code": code,
            "last_error": outcome.error,
        }
        gone = code == 410
        if code is not None and 200 <= code < 300:
            values.update(status="delivered", delivered_at=now, next_attempt_at=None)
            stats.delivered += 1
            next_state = "delivered"
        elif gone or attempts >= self.settings.webhook_max_attempts:
            values.update(status="failed", next_attempt_at=None)
            stats.failed += 1
            next_state = "failed"
        else:
            delay = outcome.retry_after_s if outcome.retry_after_s is not None else backoff_delay(attempts)
            values.update(next_attempt_at=now + timedelta(seconds=delay))
            stats.retrying += 1
            next_state = "retrying"
        with session_scope() as session:
            result = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.seq == claim.seq, WebhookDelivery.status == "pending")
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            assert isinstance(result, CursorResult)
            if result.rowcount != 1:
                return  # deleted with its endpoint meanwhile: nothing left to record
            session.add(
                WebhookAttempt(
                    delivery_id=claim.delivery_id,
                    attempted_at=now,
                    status_code=code,
                    latency_ms=outcome.latency_ms,
                    error=outcome.error,
                    response_excerpt=outcome.excerpt,
                )
            )
            if gone:
                session.execute(
                    update(WebhookEndpoint)
                    .where(WebhookEndpoint.id == claim.endpoint_id)
                    .values(enabled=False, disabled_reason="the receiver answered 410 Gone", updated_at=now)
                )
                stats.disabled_endpoints.append(claim.endpoint_id)
                log.warning("webhook endpoint %s disabled: 410 Gone", claim.endpoint_id)
        self._observe(claim, outcome, next_state, now)

    def _observe(self, claim: Claim, outcome: Outcome, result: str, now: datetime) -> None:
        """The attempt's metrics and its log line (with the job it was about), once it is recorded."""
        code = outcome.status_code
        if code is None:
            status_class = "refused" if (outcome.error or "").startswith("refused") else (
                "timeout" if (outcome.error or "").startswith("timed out") else "error"
            )  # fmt: skip
        else:
            status_class = f"{code // 100}xx"
        if self.settings.metrics_enabled:
            metrics.WEBHOOK_ATTEMPTS.labels(status_class, result).inc()
            if result == "delivered" and claim.created_at is not None:
                metrics.WEBHOOK_LAG.observe(max((now - claim.created_at).total_seconds(), 0.0))
            if code == 410:
                metrics.WEBHOOK_DISABLED.inc()
        log.info(
            "webhook %s %s to %s: %s after %d ms (%s, attempt %d)",
            claim.delivery_id,
            claim.event_type,
            claim.endpoint_id,
            code if code is not None else outcome.error,
            outcome.latency_ms,
            result,
            claim.attempt_count + 1,
            extra={"job_id": claim.job_id, "delivery_id": claim.delivery_id, "event": claim.event_type},
        )

    # one round / several rounds -------------------------------------------------------------------

    def run_round(self, now: datetime | None = None) -> RelayStats:
        """Claim, send (in parallel across endpoints) and record one head delivery per endpoint."""
        stats = RelayStats()
        claims = self.claim(now or self.clock())
        stats.claimed = len(claims)
        if not claims:
            return stats
        # httpx's timeout bounds each read, not a whole attempt, and name resolution has none: a
        # receiver that trickles its status line, or a hanging DNS server, must not hold up the other
        # endpoints' deliveries. At the round's deadline (well before the claims' lease ends), attempts
        # still running count as timed out (their threads are abandoned and end with their sockets),
        # and claims not yet started go back unattempted, due at once for the next round.
        limit = self.settings.webhook_timeout_s
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(claims))))
        futures = [pool.submit(self.send, claim) for claim in claims]
        wait(futures, timeout=2 * limit + 1)
        pool.shutdown(wait=False, cancel_futures=True)
        unstarted = [claim for claim, future in zip(claims, futures, strict=True) if future.cancelled()]
        if unstarted:
            self.release(unstarted, now or self.clock())
        for claim, future in zip(claims, futures, strict=True):
            if future.cancelled():
                continue
            if future.done():
                outcome = future.result()
            else:
                outcome = Outcome(None, int((2 * limit + 1) * 1000), error=f"timed out after {limit:g} s")
            self.record(claim, outcome, now or self.clock(), stats)
        return stats

    def release(self, claims: list[Claim], now: datetime) -> None:
        """Give back claims that were never attempted: due again at once, no attempt counted."""
        with session_scope() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.seq.in_([c.seq for c in claims]), WebhookDelivery.status == "pending")
                .values(next_attempt_at=now)
                .execution_options(synchronize_session=False)
            )

    def run_once(self, now: datetime | None = None, max_rounds: int = 1000, budget_s: float = 60.0) -> RelayStats:
        """Rounds until nothing is due (each success makes the endpoint's next delivery due), bounded in time."""
        total = RelayStats()
        deadline = time.monotonic() + budget_s
        for _ in range(max_rounds):
            stats = self.run_round(now)
            total.claimed += stats.claimed
            total.delivered += stats.delivered
            total.retrying += stats.retrying
            total.failed += stats.failed
            total.disabled_endpoints += stats.disabled_endpoints
            if stats.claimed == 0 or time.monotonic() > deadline:
                break
        return total


def run_once(now: datetime | None = None, budget_s: float = 60.0, **relay_options: Any) -> RelayStats:
    """Run a fresh relay until nothing is due or ``budget_s`` passed (the Celery beat task, and tests)."""
    with Relay(**relay_options) as relay:
        return relay.run_once(now, budget_s=budget_s)
