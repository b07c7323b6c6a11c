"""The admin API's wire schemas (/admin/keys, /admin/usage)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.auth.keys import KeyScope


class LimitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(None, ge=1, le=2**31, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, le=2**40, description="Tokens (prompt + completion) per minute.")


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._@:-]+$", description="The key's owner.")
    scopes: list[KeyScope] = Field(default_factory=lambda: [KeyScope.INFERENCE], min_length=1)
    models: list[str] | None = Field(None, description="Configured model names the key may use; null: all.")
    limits: LimitIn = Field(default_factory=LimitIn)
    model_limits: dict[str, LimitIn] = Field(default_factory=dict, description="Limits per model name.")
    expires_at: float | None = Field(None, ge=0, le=1e11, description="Unix time after which the key is refused.")
    expires_in: float | None = Field(
        None, gt=0, le=1e10, description="Seconds from now after which the key is refused."
    )


def usage_body(rows: list[tuple[str, str, int, int, int]]) -> dict[str, Any]:
    data = [
        {"key": k, "model": m, "requests": r, "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        for k, m, r, p, c in rows
    ]
    return {"object": "list", "data": data}
