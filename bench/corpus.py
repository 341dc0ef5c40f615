"""Calibration and evaluation text from a corpus every CPython install carries: ``pydoc_data.topics``
(the language reference sections that ``help()`` shows, ~79 topics, ~465k characters).

Split deterministically and disjointly: topics sorted by name, repeated paragraphs dropped,
then even positions -> calibration, odd positions -> evaluation (alternating keeps both halves
covering the whole reference rather than, say, all of A-M versus N-Z).

Writes ``bench/.cache/calib.txt`` and ``bench/.cache/eval.txt`` (idempotent: rewritten identically).
The topic texts depend on the Python version (both venvs use 3.11), recorded in ``corpus.json``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CACHE, CALIB_TXT, EVAL_TXT

SEPARATOR = "\n\n"
MIN_SHARED = 40  # paragraphs longer than this may appear in only one half


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def split_topics() -> tuple[dict[str, str], dict[str, str]]:
    """``(calibration, evaluation)``: name -> text, disjoint in names and in paragraphs.

    Many topics repeat whole sections of others (e.g. ``atom-identifiers`` inside ``identifiers``),
    so paragraphs of more than ``MIN_SHARED`` characters are deduplicated across the corpus first
    (first occurrence in sorted-name order wins); topics left empty are dropped.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    unique: list[tuple[str, str]] = []
    for name in sorted(topics):
        kept = []
        for para in _paragraphs(topics[name]):
            if len(para) > MIN_SHARED:
                if para in seen:
                    continue
                seen.add(para)
            kept.append(para)
        if any(len(p) > MIN_SHARED for p in kept):
            unique.append((name, SEPARATOR.join(kept)))
    calib = dict(unique[0::2])
    evaluation = dict(unique[1::2])
    assert not set(calib) & set(evaluation), "topic names overlap"
    return calib, evaluation


def write_corpus() -> dict[str, object]:
    """Write calib.txt / eval.txt and a small manifest; return the manifest."""
    calib, evaluation = split_topics()
    CACHE.mkdir(parents=True, exist_ok=True)
    calib_text = SEPARATOR.join(calib.values()) + "\n"
    eval_text = SEPARATOR.join(evaluation.values()) + "\n"
    # No paragraph of one half may appear verbatim in the other (catches shared boilerplate).
    calib_paras = {p for p in _paragraphs(calib_text) if len(p) > MIN_SHARED}
    eval_paras = {p for p in _paragraphs(eval_text) if len(p) > MIN_SHARED}
    shared = calib_paras & eval_paras
    assert not shared, f"{len(shared)} long paragraphs appear in both halves"
    CALIB_TXT.write_text(calib_text, encoding="utf-8")
    EVAL_TXT.write_text(eval_text, encoding="utf-8")
    manifest: dict[str, object] = {
        "source": "pydoc_data.topics",
        "python": platform.python_version(),
        "calib_topics": len(calib),
        "eval_topics": len(evaluation),
        "calib_chars": len(calib_text),
        "eval_chars": len(eval_text),
        "calib_sha256": hashlib.sha256(calib_text.encode()).hexdigest()[:12],
        "eval_sha256": hashlib.sha256(eval_text.encode()).hexdigest()[:12],
    }
    (CACHE / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    print(json.dumps(write_corpus()))
