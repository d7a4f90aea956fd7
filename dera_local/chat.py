"""Chat on a DeRa pair: renders the conversation with the aligned model's GGUF chat
template (Jinja, sandboxed) and keeps the history; the pair's prefix cache means each
turn only reads what is new since the last one."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .engine.exact import DEFAULT_BUDGET
from .engine.exact_attempts import DEFAULT_PARALLEL
from .errors import DeraError
from .model_sets.pair import DeraPair, GenerationStream
from .sampling.chain import SamplingParams

# Used when a GGUF has no template at all (base models); ChatML is the common default.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise TemplateError(message)


MAX_RENDERED_CHARS = 4_000_000  # far above any real prompt; a template may not build more


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus a bound on what `*` and `**` may build: a template from a GGUF
    file is untrusted, and `'x' * 100000000` took chat past 6 GB."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator: str, left, right):
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                sized = isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                if sized and len(seq) * count > MAX_RENDERED_CHARS:
                    raise SecurityError("the template builds a value too large")
        if operator == "**" and isinstance(right, int) and abs(right) > 1000:
            raise SecurityError("the template computes a power too large")
        return super().call_binop(context, operator, left, right)


class ChatTemplate:
    """A GGUF chat template, rendered the way Hugging Face's apply_chat_template does."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        environment = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = environment.from_string(source)
        except TemplateError as exc:
            raise DeraError(f"the chat template does not parse: {exc}") from None
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = True, **variables
    ) -> str:
        """`variables`: more the template reads (`tools`, for a template with a tools
        section; see dera_local/tools)."""
        try:
            text = self._template.render(
                **variables,
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise DeraError(f"the chat template failed: {exc}") from None
        # Whatever else a hostile template raises (range too big, recursion, ...).
        except (ArithmeticError, RecursionError, MemoryError, TypeError, ValueError) as exc:
            raise DeraError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
        if len(text) > MAX_RENDERED_CHARS:
            raise DeraError(f"the chat template rendered over {MAX_RENDERED_CHARS} characters")
        return text

    def tokens(self, pair: DeraPair, messages: Sequence[dict], **variables) -> list[int]:
        """The token ids that ask the model for the next assistant turn."""
        text = self.render(messages, **variables)
        # Templates that write the BOS text themselves must not get a second BOS.
        add_special = not (self.bos_token and text.startswith(self.bos_token))
        return pair.tokenize(text, add_special=add_special)

    def negative_tokens(
        self, pair: DeraPair, messages: Sequence[dict], negative: str, **variables
    ) -> list[int]:
        """The negative sequence of a chat for classifier-free guidance: the same turns
        under the negative prompt as their system message (any system message of the
        chat is replaced)."""
        turns = [m for m in messages if m["role"] != "system"]
        return self.tokens(pair, [{"role": "system", "content": negative}, *turns], **variables)

    @classmethod
    def for_pair(cls, pair: DeraPair, override: str | None = None) -> ChatTemplate:
        """The override, else the aligned model's template, else ChatML."""
        model = pair.model
        source = override or model.chat_template() or CHATML_TEMPLATE

        def text_of(name: str) -> str:
            token = model.special_token(name)
            return "" if token is None else model.token_text(token)

        return cls(source, bos_token=text_of("bos"), eos_token=text_of("eos"))


def as_messages(prompt: str | Sequence[dict], system: str | None = None) -> list[dict]:
    """A prompt as chat turns: text becomes one user turn, and the system prompt goes
    first unless the messages bring their own."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


class ChatSession:
    """A conversation with a DeRa pair; lam and sampling may change between turns."""

    def __init__(
        self,
        pair: DeraPair,
        *,
        system: str | None = None,
        template: str | None = None,
        lam: float = 1.0,
        sampling: SamplingParams | None = None,
        max_tokens: int = 512,
        negative_prompt: str | None = None,
        cfg_scale: float = 1.0,
        exact: bool = False,
        exact_budget: int = DEFAULT_BUDGET,
        exact_parallel: int = DEFAULT_PARALLEL,
    ) -> None:
        """negative_prompt: classifier-free guidance; the negative sequence is this
        conversation with the negative prompt as its system message, steered away from
        with cfg_scale (see DeraPair.stream). exact, exact_budget, exact_parallel: each
        reply drawn by exact realignment (see DeraPair.stream; the sampling must be
        untruncated)."""
        self.pair = pair
        self.template = ChatTemplate.for_pair(pair, template)
        self.system = system
        self.lam = lam
        self.sampling = sampling or SamplingParams()
        self.max_tokens = max_tokens
        self.negative_prompt = negative_prompt
        self.cfg_scale = cfg_scale
        self.exact = exact
        self.exact_budget = exact_budget
        self.exact_parallel = exact_parallel
        self.messages: list[dict] = []  # user and assistant turns, without the system prompt
        self._warned_about_dropping = False

    def reset(self) -> None:
        self.messages = []

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def prompt_tokens(self) -> list[int]:
        """The conversation as token ids. When it no longer fits the context with room
        for a reply, the oldest turns are dropped (the system prompt stays), as llama.cpp's
        CLI and Ollama do; the first time, a warning says so."""
        tokens = self.template.tokens(self.pair, self.conversation())
        room = self._reply_room()
        while len(tokens) + room > self.pair.n_ctx and len(self.messages) > 1:
            del self.messages[: 2 if self.messages[1]["role"] == "assistant" else 1]
            if not self._warned_about_dropping:
                self._warned_about_dropping = True
                warnings.warn(
                    "the conversation outgrew the context: dropping its oldest turns "
                    "(the system prompt stays)",
                    stacklevel=3,
                )
            tokens = self.template.tokens(self.pair, self.conversation())
        return tokens

    def negative_tokens(self) -> list[int] | None:
        """The negative sequence: the same turns under the negative prompt as system
        message (None without guidance). Call after prompt_tokens(), which may drop
        old turns."""
        if self.negative_prompt is None:
            return None
        return self.template.negative_tokens(self.pair, self.messages, self.negative_prompt)

    def _reply_room(self) -> int:
        """Tokens kept free for the reply: max_tokens, but at most half the context."""
        wanted = self.max_tokens if self.max_tokens > 0 else self.pair.n_ctx // 4
        return min(wanted, self.pair.n_ctx // 2)

    def send(self, text: str, **overrides) -> GenerationStream:
        """Adds a user turn and streams the reply; the reply joins the history when the
        stream ends (or when record_reply is called with a partial reply)."""
        self.messages.append({"role": "user", "content": text})
        settings = {"lam": self.lam, "sampling": self.sampling, "max_tokens": self.max_tokens}
        if self.exact:
            settings.update(
                exact=True, exact_budget=self.exact_budget, exact_parallel=self.exact_parallel
            )
        settings.update(overrides)
        try:
            prompt = self.prompt_tokens()
            if self.negative_prompt is not None:
                settings.setdefault("negative_prompt", self.negative_tokens())
                settings.setdefault("cfg_scale", self.cfg_scale)
            stream = self.pair.stream(prompt, **settings)
        except BaseException:
            self.messages.pop()
            raise
        return _RecordingStream(self, stream)

    def say(self, text: str, **overrides) -> str:
        """send() to the end; returns the reply text."""
        stream = self.send(text, **overrides)
        return "".join(stream)

    def record_reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def drop_last_turn(self) -> None:
        """Forgets the last user turn and its reply (one that failed: nothing was shown)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()


class _RecordingStream(GenerationStream):
    """A GenerationStream that writes the reply into the session's history as it ends,
    including when it is stopped early (Ctrl-C): the user saw that text, so it stays."""

    def __init__(self, session: ChatSession, inner: GenerationStream) -> None:
        super().__init__(self._chunks_of(session, inner))

    @staticmethod
    def _chunks_of(session: ChatSession, inner: GenerationStream):
        shown: list[str] = []
        try:
            for chunk in inner:
                shown.append(chunk)
                yield chunk
        finally:
            inner.close()
            session.record_reply("".join(shown))
        return inner.result
