"""Text inputs for engines: read txt/jsonl files and pack them into fixed-length token blocks."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from workers.compression.base import EngineError

TEXT_SUFFIXES = {".txt", ".jsonl", ".md"}


def read_texts(paths: Iterable[Path]) -> list[str]:
    """Read documents from .txt/.md files (one document each) and .jsonl files (a ``text`` field per line)."""
    texts: list[str] = []
    for path in sorted(paths):
        if path.suffix not in TEXT_SUFFIXES:
            continue
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EngineError(f"{path.name} line {number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise EngineError(f"{path.name} line {number}: expected an object with a 'text' string")
                texts.append(record["text"])
        else:
            texts.append(path.read_text(encoding="utf-8"))
    if not any(t.strip() for t in texts):
        raise EngineError("no text found (expected .txt, .md or .jsonl files with a 'text' field)")
    return texts


def tokenize_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Tokenise documents into one 1-D stream, documents separated by EOS so blocks may span them."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(stream: torch.Tensor, seq_len: int, num_blocks: int | None = None) -> torch.Tensor:
    """Cut a token stream into ``[n, seq_len]`` non-overlapping blocks (the tail shorter than a block is dropped)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise EngineError(f"text too short: {stream.numel()} tokens, need at least one block of {seq_len}")
    if num_blocks is not None:
        n = min(n, num_blocks)
    return stream[: n * seq_len].view(n, seq_len).clone()


def calibration_blocks(tokenizer: Any, paths: Iterable[Path], seq_len: int, num_samples: int) -> torch.Tensor:
    """Calibration input ids ``[num_samples, seq_len]`` (fewer if the text is short) from text files."""
    return pack_blocks(tokenize_stream(tokenizer, read_texts(paths)), seq_len, num_samples)
