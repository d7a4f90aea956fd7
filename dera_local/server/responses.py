"""The bodies the server answers with, in OpenAI's formats: a whole chat completion or
completion, the chunks of a stream (server-sent events), and the usage counts."""

from __future__ import annotations

import json
import time
import uuid

from ..engine.logprob_format import TokenBytes, chat_content, completion_logprobs
from ..model_sets.pair import GenerationResult
from ..tools.parse import ToolTextFilter, parse_calls
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

    def held_back(self, result: GenerationResult) -> list[dict]:
        """Chunks a stream held back until the end (tool calls: ChatShape)."""
        return []

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
    """OpenAI's chat objects. With tools the answer may be calls: a stream holds its text
    back from a possible call opener on (ToolTextFilter) and, at the end, sends the
    calls as `tool_calls` deltas (finish_reason "tool_calls"), or the held text if it is
    not a clean call."""

    prefix, object = "chatcmpl", "chat.completion.chunk"

    def __init__(self, parsed, token_bytes, tools=None) -> None:
        super().__init__(parsed, token_bytes)
        self.tools = tools if tools is not None and tools.calls_expected else None
        self.filter = ToolTextFilter() if self.tools is not None else None
        self.calls: list = []

    def _calls_of(self, text: str) -> tuple[str, list]:
        if self.tools is None:
            return text, []
        return parse_calls(text, self.tools.names)

    def held_back(self, result: GenerationResult) -> list[dict]:
        """The chunks a stream held back: the calls, or the text that was not one."""
        if self.filter is None or not self.filter.held:
            return []
        _, calls = parse_calls(self.filter.held, self.tools.names)
        if not calls:
            choice = {"index": 0, "delta": {"content": self.filter.held}, "finish_reason": None}
            return [self._envelope([choice])]
        self.calls = calls
        deltas = [{"index": i, **call.openai()} for i, call in enumerate(calls)]
        choice = {"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None}
        return [self._envelope([choice])]

    def opening(self) -> dict:
        return self._envelope(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )

    def _format(self, tokens, logprobs, start, text_offset):
        return {"content": chat_content(tokens, logprobs, self.token_bytes, start)}

    def delta(self, chunk: TextChunk) -> dict:
        text = chunk.text if self.filter is None else self.filter.feed(chunk.text)
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        entries = self._stream_logprobs(chunk.tokens, chunk.logprobs)
        if entries is not None:
            choice["logprobs"] = entries
        self.text_length += len(chunk.text)
        return self._envelope([choice])

    def closing(self, result: GenerationResult) -> dict:
        reason = "tool_calls" if self.calls else result.finish_reason
        choice = {"index": 0, "delta": {}, "finish_reason": reason}
        rest = self._rest(result)
        if rest is not None:
            choice["logprobs"] = rest
        return {**self._envelope([choice]), "dera": dera(result, self.per_token)}

    def whole(self, result: GenerationResult) -> dict:
        content, calls = self._calls_of(result.text)
        message = {"role": "assistant", "content": content or (None if calls else "")}
        if calls:
            message["tool_calls"] = [call.openai() for call in calls]
        logprobs = None
        if self.per_token and result.logprobs is not None:
            logprobs = self._format(result.tokens, result.logprobs, 0, 0)
        body = self._envelope(
            [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if calls else result.finish_reason,
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
