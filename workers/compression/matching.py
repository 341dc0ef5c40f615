"""The one rule for naming modules in a recipe (``ignore`` lists and any other module-name pattern).

A pattern is either

* a plain name, which matches a module whose dotted name equals it or ends with ``.`` + it, so
  ``lm_head``, ``down_proj``, ``mlp.down_proj`` and ``model.layers.0.mlp.down_proj`` all mean what they
  say (every ``down_proj``, one layer's ``down_proj``), or
* ``re:`` followed by a Python regular expression, matched from the start of the full dotted name
  (``re.match``, as compressed-tensors and llm-compressor do): ``re:.*layers\\.0\\..*``.

Torch-free, so the recipe validates patterns at submission (a bad regex is a 422 naming the field) and
every engine, quantize and prune alike, selects modules through :class:`ModuleMatcher`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

REGEX_PREFIX = "re:"
# Bounds keep a hostile spec from costing the worker minutes of regex compilation or matching.
MAX_PATTERNS = 256
MAX_PATTERN_LENGTH = 256


def check_patterns(patterns: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first pattern that is empty, too long or not a valid regex."""
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} module patterns")
    for index, pattern in enumerate(patterns):
        body = pattern[len(REGEX_PREFIX) :] if pattern.startswith(REGEX_PREFIX) else pattern
        if not body or len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError(f"[{index}] must be a module name or 're:' regex of 1-{MAX_PATTERN_LENGTH} characters")
        if pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(body)
            except re.error as exc:
                raise ValueError(f"[{index}] {pattern!r} is not a valid regular expression: {exc}") from exc


class ModuleMatcher:
    """``matcher(name) -> bool``: whether a module's full dotted name is selected by the patterns."""

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = list(patterns)
        check_patterns(patterns)
        self.patterns = patterns
        self._regexes = [re.compile(p[len(REGEX_PREFIX) :]) for p in patterns if p.startswith(REGEX_PREFIX)]
        self._names = [p for p in patterns if not p.startswith(REGEX_PREFIX)]

    def __call__(self, name: str) -> bool:
        if any(name == plain or name.endswith("." + plain) for plain in self._names):
            return True
        return any(regex.match(name) for regex in self._regexes)

    def select(self, names: Iterable[str]) -> list[str]:
        """The names the patterns match, in their order."""
        return [name for name in names if self(name)]
