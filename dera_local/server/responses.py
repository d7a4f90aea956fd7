"""The bodies the server answers with, in OpenAI's formats: a whole chat completion or
completion, the chunks of a stream (server-sent events), and the usage counts."""

from __future__ import annotations

import json
import time
import uuid

from ..engine import GenerationResult
from .requests import ParsedRequest


def event(payload: dict | None) -> str:
    return "" if payload is None else f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(result: GenerationResult) -> dict:
    n_prompt = len(result.prompt_tokens)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": len(result.tokens),
        "total_tokens": n_prompt + len(result.tokens),
        # OpenAI's names for drafted tokens that were kept or thrown away (its "predicted
        # outputs"); here the drafts come from speculative decoding.
        "completion_tokens_details": {
            "accepted_prediction_tokens": result.accepted,
            "rejected_prediction_tokens": result.drafted - result.accepted,
        },
    }


class Shape:
    def __init__(self, parsed: ParsedRequest) -> None:
        self.parsed = parsed
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.parsed.model,
            "choices": choices,
            **extra,
        }

    def usage_chunk(self, result: GenerationResult) -> dict:
        return {**self._envelope([]), "usage": usage(result)}


class ChatShape(Shape):
    prefix, object = "chatcmpl", "chat.completion.chunk"

    def opening(self) -> dict:
        return self._envelope(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )

    def delta(self, text: str) -> dict:
        return self._envelope([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def closing(self, result: GenerationResult) -> dict:
        return self._envelope([{"index": 0, "delta": {}, "finish_reason": result.finish_reason}])

    def whole(self, result: GenerationResult) -> dict:
        message = {"role": "assistant", "content": result.text}
        body = self._envelope(
            [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            usage=usage(result),
        )
        body["object"] = "chat.completion"
        body["dera_lambda"] = result.lam
        return body


class CompletionShape(Shape):
    prefix, object = "cmpl", "text_completion"

    def opening(self) -> None:
        return None

    def delta(self, text: str) -> dict:
        return self._envelope([{"index": 0, "text": text, "finish_reason": None, "logprobs": None}])

    def closing(self, result: GenerationResult) -> dict:
        return self._envelope(
            [{"index": 0, "text": "", "finish_reason": result.finish_reason, "logprobs": None}]
        )

    def whole(self, result: GenerationResult) -> dict:
        body = self._envelope(
            [
                {
                    "index": 0,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            usage=usage(result),
        )
        body["dera_lambda"] = result.lam
        return body
