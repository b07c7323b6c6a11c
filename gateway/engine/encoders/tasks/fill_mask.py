"""Fill-mask: the most likely tokens for each mask token."""

from __future__ import annotations

from typing import Any

from gateway.engine.encoders.tasks import TaskModel
from gateway.errors import InvalidRequest


def run(tm: TaskModel, items: list[str], params: dict[str, Any]) -> list[list]:
    """Per text: a list of {score, token, token_str, sequence}; with several masks, one such list per mask."""
    mask = tm.tokenizer.mask_token
    if mask is None:
        raise InvalidRequest("This model's tokenizer has no mask token.", param="model")
    for number, text in enumerate(items):
        if mask not in text:
            raise InvalidRequest(
                f"Input {number} has no mask token; put {mask} where a word is missing.", param="inputs"
            )
    tm.check_length(items)
    kwargs: dict[str, Any] = {"top_k": params.get("top_k", 5)}
    if params.get("targets"):
        kwargs["targets"] = params["targets"]
    outputs = tm.pipeline("fill-mask")(list(items), batch_size=tm.batch_size(len(items)), **kwargs)
    if len(items) == 1:
        # the pipeline unwraps a single input; put it back so there is one output per item
        outputs = [outputs]
    return [_plain(out) for out in outputs]


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.item() if hasattr(value, "item") else value
