"""The remote-code refusal reads config keys as JSON, not text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import write_model_dir
from workers.compression.base import EngineError
from workers.compression.export import check_model_dir

EVIL = {"AutoModelForCausalLM": "evil.EvilModel"}


def _with_config(tmp_path: Path, name: str, text: str) -> Path:
    src = write_model_dir(tmp_path, "llama")
    (src / name).write_text(text)
    return src


def _config_text(src_dir: Path, extra_text: str) -> str:
    """config.json of a real tiny model with ``extra_text`` spliced in as raw JSON (so escapes survive)."""
    text = json.dumps(json.loads((src_dir / "config.json").read_text()))
    return text[:-1] + ", " + extra_text + "}"


@pytest.mark.parametrize(
    "extra",
    [
        '"\\u0061uto_map": {"AutoModelForCausalLM": "evil.EvilModel"}',  # a JSON escape spells the key
        '"nested": {"deeper": [{"auto_map": {"AutoModel": "evil.X"}}]}',  # anywhere in the document
        '"auto_map": {"AutoModel": "evil.X"}, "auto_map": null',  # a duplicate key hides the first
    ],
)
def test_auto_map_key_refused_in_config(tmp_path: Path, extra: str) -> None:
    src = write_model_dir(tmp_path, "llama")
    (src / "config.json").write_text(_config_text(src, extra))
    with pytest.raises(EngineError, match=r"config\.json uses custom code"):
        check_model_dir(src)


def test_auto_map_key_refused_in_tokenizer_config(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path, "llama")
    (src / "tokenizer_config.json").write_text('{"\\u0061uto_map": {"AutoTokenizer": ["evil.T", null]}}')
    with pytest.raises(EngineError, match=r"tokenizer_config\.json uses custom code"):
        check_model_dir(src)


def test_auto_map_as_a_value_is_no_key(tmp_path: Path) -> None:
    # A text search refused this; the key check must not: "auto_map" here is only a string value.
    src = write_model_dir(tmp_path, "llama")
    (src / "config.json").write_text(_config_text(src, '"tags": ["auto_map"]'))
    assert check_model_dir(src)["tags"] == ["auto_map"]


def test_invalid_tokenizer_config_refused(tmp_path: Path) -> None:
    src = write_model_dir(tmp_path, "llama")
    (src / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(EngineError, match=r"tokenizer_config\.json is not valid JSON"):
        check_model_dir(src)
