"""A minimal server-sent events reader (the WHATWG format: ``id``, ``event``, ``data`` fields, blank line ends
an event, ``:`` lines are comments). The API sends one JSON ``data`` line per event."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    id: str | None
    event: str
    data: str


def iter_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent | None]:
    """Events from a stream of lines; ``None`` for each comment (keep-alive), so a caller can check a deadline."""
    event_id: str | None = None
    event, data = "", list[str]()
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event_id, event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            yield None
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            event_id = value
