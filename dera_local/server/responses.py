"""The bodies the server answers with, in OpenAI's formats: a whole chat completion or
completion, the chunks of a stream (server-sent events), and the usage counts."""

from __future__ import annotations

import json
import time
import uuid

from ..engine.logprob_format import TokenBytes, chat_content, completion_logprobs
from ..model_sets.pair import GenerationResult
from .requests import ParsedRequest
from .worker import TextChunk


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


def dera(result: GenerationResult, per_token: bool = False) -> dict:
    """What DeRa knows about the answer (beside `usage`): its lam, its summed
    log-probability under the aligned model, the reference and the mixture, and the
    one-sample estimate of KL(pi_lam || pi_ref), the end-of-generation token included;
    with per-token log-probabilities asked for, the three per token too."""
    logprobs = result.logprobs
    if logprobs is None:
        return {"lam": result.lam}
    body = {"lam": result.lam, **logprobs.summary()}
    if result.exact is not None:  # exact realignment: what the answer cost
        body["exact"] = result.exact
    if per_token:
        body["token_logprobs"] = {
            "aligned": logprobs.aligned,
            "reference": logprobs.reference,
            "mixture": logprobs.mixture,
        }
    return body


class Shape:
    def __init__(self, parsed: ParsedRequest, token_bytes: TokenBytes) -> None:
        self.parsed = parsed
        self.token_bytes = token_bytes
        self.per_token = parsed.per_token
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.reported = 0  # tokens whose log-probabilities a stream has sent
        self.text_length = 0  # characters a stream has sent

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
        return {**self._envelope([]), "usage": usage(result), "dera": dera(result, self.per_token)}

    def _stream_logprobs(self, tokens, logprobs):
        """The next streamed tokens' entries (None when not asked for)."""
        if not self.per_token or logprobs is None:
            return None
        entries = self._format(tokens, logprobs, 0, self.text_length)
        self.reported += len(tokens)
        return entries

    def _rest(self, result: GenerationResult):
        """Entries of the tokens a stream has not reported yet (held-back text)."""
        if not self.per_token or result.logprobs is None:
            return None
        tokens = result.tokens[self.reported :]
        if not tokens:
            return None
        part = result.logprobs.slice(self.reported, len(result.tokens))
        return self._format(tokens, part, 0, self.text_length)


class ChatShape(Shape):
    prefix, object = "chatcmpl", "chat.completion.chunk"

    def opening(self) -> dict:
        return self._envelope(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )

    def _format(self, tokens, logprobs, start, text_offset):
        return {"content": chat_content(tokens, logprobs, self.token_bytes, start)}

    def delta(self, chunk: TextChunk) -> dict:
        choice = {"index": 0, "delta": {"content": chunk.text}, "finish_reason": None}
        entries = self._stream_logprobs(chunk.tokens, chunk.logprobs)
        if entries is not None:
            choice["logprobs"] = entries
        self.text_length += len(chunk.text)
        return self._envelope([choice])

    def closing(self, result: GenerationResult) -> dict:
        choice = {"index": 0, "delta": {}, "finish_reason": result.finish_reason}
        rest = self._rest(result)
        if rest is not None:
            choice["logprobs"] = rest
        return {**self._envelope([choice]), "dera": dera(result, self.per_token)}

    def whole(self, result: GenerationResult) -> dict:
        message = {"role": "assistant", "content": result.text}
        logprobs = None
        if self.per_token and result.logprobs is not None:
            logprobs = self._format(result.tokens, result.logprobs, 0, 0)
        body = self._envelope(
            [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": result.finish_reason,
                    "logprobs": logprobs,
                }
            ],
            usage=usage(result),
        )
        body["object"] = "chat.completion"
        body["dera_lambda"] = result.lam
        body["dera"] = dera(result, self.per_token)
        return body


class CompletionShape(Shape):
    prefix, object = "cmpl", "text_completion"

    def opening(self) -> None:
        return None

    def _format(self, tokens, logprobs, start, text_offset):
        return completion_logprobs(tokens, logprobs, self.token_bytes, start, text_offset)

    def delta(self, chunk: TextChunk) -> dict:
        entries = self._stream_logprobs(chunk.tokens, chunk.logprobs)
        self.text_length += len(chunk.text)
        return self._envelope(
            [{"index": 0, "text": chunk.text, "finish_reason": None, "logprobs": entries}]
        )

    def closing(self, result: GenerationResult) -> dict:
        choice = {
            "index": 0,
            "text": "",
            "finish_reason": result.finish_reason,
            "logprobs": self._rest(result),
        }
        return {**self._envelope([choice]), "dera": dera(result, self.per_token)}

    def whole(self, result: GenerationResult) -> dict:
        logprobs = None
        if self.per_token and result.logprobs is not None:
            logprobs = self._format(result.tokens, result.logprobs, 0, 0)
        body = self._envelope(
            [
                {
                    "index": 0,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "logprobs": logprobs,
                }
            ],
            usage=usage(result),
        )
        body["dera_lambda"] = result.lam
        body["dera"] = dera(result, self.per_token)
        return body
