"""The one formatter of pydantic validation errors, shared by every API family and the config.

Each caller keeps its own sentence around the result (OpenAI, HF, TGI and the config file
word their messages differently); what an error names and says is decided here only.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Issue:
    param: str | None  # dotted path to the offending value under `root`; None for the whole input
    message: str  # pydantic's message, or `unknown_msg` for a field the schema does not have
    kind: str  # pydantic's error type ("missing", "extra_forbidden", ...)


def format_errors(
    errors: Iterable[Mapping[str, Any]],
    *,
    root: str | None,
    unknown_msg: str | None,
    skip: Collection[str] = (),
    strip_value_error: bool = True,
    brackets: bool = False,
) -> list[Issue]:
    """One Issue per error.

    `root` prefixes every path ("parameters"); `unknown_msg` replaces pydantic's wording for
    extra fields (None keeps it); `skip` drops location parts that are not the client's
    (FastAPI's "body"); `strip_value_error` removes the "Value error, " pydantic puts before
    a validator's own message; `brackets` writes list indices as `[0]` (config paths).
    """
    issues = []
    for error in errors:
        parts = [p for p in error.get("loc", ()) if p not in skip]
        if brackets:
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
        else:
            path = ".".join(str(p) for p in parts)
        param = f"{root}.{path}" if root and path else (root or path or None)
        kind = str(error.get("type", ""))
        message = str(error.get("msg", "invalid value"))
        if strip_value_error:
            message = message.removeprefix("Value error, ")
        if kind == "extra_forbidden" and unknown_msg is not None:
            message = unknown_msg
        issues.append(Issue(param, message, kind))
    return issues


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth_over(raw: bytes, limit: int) -> bool:
    """Whether a JSON document nests deeper than `limit` (arrays and objects).

    Cheap on the hot path: a body with at most `limit` opening brackets cannot be deeper, and
    bytes.count is C; only a bracket-heavy body is scanned (strings removed first)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for match in _BRACKETS.finditer(_STRINGS.sub(b"", raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
