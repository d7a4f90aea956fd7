"""dera-local as a plugin of the `llm` CLI (simonw/llm), registered by the package's
`llm` entry point: `llm install -e .` (or installing dera-local where llm lives) adds

- the model `dera-local`: the pair `dera-local chat` would load (DERA_ALIGNED /
  DERA_REFERENCE / DERA_LORA / DERA_PAIR, else the built-in pair), and
  `dera-local/<pair>` for every catalog pair already pulled;
- options `-o lam`, `-o temperature`, `-o max_tokens`, `-o seed`, `-o exact`,
  `-o negative_prompt`, `-o cfg_scale`, `-o tool_choice`; tools (`llm -T`, `--functions`:
  the calls sampled from the DeRa mixture, see dera_local/tools); streaming;
  conversations (`llm -c`,
  `llm chat`) through the model's chat template; each logged response's JSON records
  lam and the answer's KL to the reference (and, with `-o exact 1`, what the exact
  answer cost);
- the command `llm dera pairs`.

Models load once per process, on first use."""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import click
import llm
from llm.parts import ReasoningPart, TextPart, ToolCallPart, ToolResultPart
from pydantic import Field, field_validator

from .chat import ChatTemplate
from .engine.mixing import validate_lam
from .errors import DeraError
from .sampling.chain import SamplingParams
from .sources.catalog import load_catalog
from .sources.resolve import DEFAULT_QUANT, pulled_quants
from .tools.grammar import calls_grammar
from .tools.parse import ToolTextFilter, parse_calls
from .tools.render import OPEN, marker_tokens, native_tools, tool_messages
from .tools.spec import Tool

MODEL_ID = "dera-local"
_loaded: dict[str | None, object] = {}  # pair name (None: the default pair) -> DeraPair
_loading = threading.Lock()


def _pair(name: str | None):
    """The pair, loaded on first use and kept for the process (llm chat asks many times)."""
    with _loading:
        if name not in _loaded:
            from .model_sets.pair import load_pair
            from .sources.resolve import pulled_pair, resolve_models

            if name is None:
                aligned, reference, lora = resolve_models(
                    os.environ.get("DERA_ALIGNED"),
                    os.environ.get("DERA_REFERENCE"),
                    os.environ.get("DERA_LORA"),
                    os.environ.get("DERA_PAIR"),
                )
            else:
                quants = pulled_quants(name)
                quant = DEFAULT_QUANT if DEFAULT_QUANT in quants else quants[0]
                aligned, reference = pulled_pair(name, quant)
                lora = None
            _loaded[name] = load_pair(aligned, reference, lora=lora)
        return _loaded[name]


def close_models() -> None:
    """Closes the pairs this process loaded (the next use loads them again)."""
    with _loading:
        for pair in _loaded.values():
            pair.close()
        _loaded.clear()


class DeraModel(llm.Model):
    can_stream = True
    supports_tools = True

    class Options(llm.Options):
        lam: float | None = Field(
            description="Alignment strength: 1 = the aligned model, 0 = the reference, "
            "between = weaker, above 1 = stronger (DeRa)",
            default=None,
        )
        temperature: float | None = Field(
            description="Sampling temperature (0 = greedy)", default=None, ge=0, le=2
        )
        max_tokens: int | None = Field(
            description="Most tokens to generate", default=None, ge=1, le=1_000_000
        )
        seed: int | None = Field(description="Random seed, for repeatable answers", default=None)
        negative_prompt: str | None = Field(
            description="Classifier-free guidance: steer away from answering under this "
            "system message",
            default=None,
        )
        cfg_scale: float | None = Field(
            description="Guidance strength with negative_prompt (1 = none)", default=None
        )
        exact: bool | None = Field(
            description="Draw from the model retrained at beta/lam itself, not DeRa's "
            "per-token mix (0 <= lam <= 1, temperature <= 1): attempts killed token by token",
            default=None,
        )
        tool_choice: str | None = Field(
            description="With tools: auto (the model may call them) or required (the "
            "first answer of a chain calls one tool; after its result it answers freely)",
            default=None,
            pattern="^(auto|required)$",
        )

        @field_validator("lam")
        @classmethod
        def _valid_lam(cls, lam: float | None) -> float | None:
            if lam is not None:
                try:
                    validate_lam(lam)
                except DeraError as exc:
                    raise ValueError(str(exc)) from None
            return lam

    def __init__(self, model_id: str, pair_name: str | None = None) -> None:
        self.model_id = model_id
        self.pair_name = pair_name

    def __str__(self) -> str:
        return f"dera-local: {self.model_id}"

    def execute(self, prompt, stream, response, conversation=None):
        options = prompt.options
        if options.cfg_scale is not None and options.negative_prompt is None:
            raise llm.ModelError("cfg_scale needs a negative_prompt to steer away from")
        pair = _pair(self.pair_name)
        messages = _messages(prompt)
        lam = 1.0 if options.lam is None else options.lam
        temperature = options.temperature
        if temperature is None:  # dera-local's default, as `dera-local chat`
            temperature = SamplingParams().temperature
        sampling = SamplingParams(temperature=temperature, seed=options.seed)
        if options.exact:  # exact realignment samples the target itself: no truncation
            sampling = replace(sampling, top_k=0, top_p=1.0, min_p=0.0)
        template = ChatTemplate.for_pair(pair)
        tools = [Tool(t.name, t.description or "", t.input_schema or {"type": "object"})
                 for t in prompt.tools]  # fmt: skip
        answered_tools = any(m["role"] == "tool" for m in messages)
        messages, variables = tool_messages(messages, tools, native_tools(template.source))
        if tools:
            required = options.tool_choice == "required" and not answered_tools
            try:  # required: one call (then llm runs it and asks again); auto: any number
                grammar = calls_grammar(tools, parallel=not required)
            except DeraError as exc:
                raise llm.ModelError(str(exc)) from None
            sampling = replace(
                sampling, grammar=grammar, grammar_triggers=() if required else (OPEN,)
            )
        guidance = {}
        if options.negative_prompt is not None:
            guidance = {
                "negative_prompt": template.negative_tokens(
                    pair, messages, options.negative_prompt, **variables
                ),
                "cfg_scale": 1.0 if options.cfg_scale is None else options.cfg_scale,
            }
        held = ToolTextFilter() if tools else None
        try:
            generation = pair.stream(
                template.tokens(pair, messages, **variables),
                lam=lam,
                sampling=sampling,
                max_tokens=options.max_tokens or 512,
                logprobs=True,  # for the answer's KL to the reference, logged below
                exact=bool(options.exact),
                shown_special=marker_tokens(pair.model) if tools else (),
                **guidance,
            )
            for chunk in generation:
                shown = chunk if held is None else held.feed(chunk)
                if shown:
                    yield shown
        except DeraError as exc:
            raise llm.ModelError(str(exc)) from None
        if held is not None and held.held:  # the calls, or text that was not one
            _, calls = parse_calls(held.held, {t.name for t in tools})
            for call in calls:
                response.add_tool_call(
                    llm.ToolCall(name=call.name, arguments=call.arguments, tool_call_id=call.id)
                )
            if not calls:
                yield held.held
        result = generation.result
        summary = result.to_dict().get("dera", {})
        response.response_json = {
            "lam": lam,
            "finish_reason": result.finish_reason,
            "dera": summary,
            "tokens_per_second": round(result.tokens_per_second, 2),
        }
        if result.exact is not None:  # what the exact answer cost
            response.response_json["exact"] = result.exact
        if hasattr(response, "set_usage"):
            response.set_usage(input=len(result.prompt_tokens), output=len(result.tokens))


def _messages(prompt) -> list[dict]:
    """The chat llm sends this turn (llm >= 0.36: `prompt.messages` is the whole chain,
    earlier turns of the conversation included) as role/content messages, with the
    model's tool calls on its turns and each tool result as a `tool` turn. Attachments
    are refused."""
    out = []
    for message in prompt.messages:
        texts, calls = [], []
        for part in message.parts:
            if isinstance(part, ToolResultPart):
                out.append({"role": "tool", "tool_call_id": part.tool_call_id or "",
                            "name": part.name, "content": part.output})  # fmt: skip
            elif isinstance(part, ToolCallPart):
                function = {"name": part.name, "arguments": part.arguments}
                calls.append({"id": part.tool_call_id or "", "type": "function",
                              "function": function})  # fmt: skip
            elif isinstance(part, TextPart):
                texts.append(part.text)
            elif not isinstance(part, ReasoningPart):
                raise llm.ModelError(
                    f"dera-local takes text and tools only, not {type(part).__name__}"
                )
        if message.role not in ("system", "user", "assistant", "tool"):
            raise llm.ModelError(f"dera-local has no {message.role!r} turns")
        if texts or calls or message.role != "tool":
            turn = {"role": message.role, "content": "".join(texts)}
            if calls:
                turn["tool_calls"] = calls
            if message.role != "tool" or texts:
                out.append(turn)
    return out


def _pulled_pairs() -> dict[str, list[str]]:
    """Catalog pairs with at least one quantization fully downloaded -> those quants."""
    pulled = {}
    for name in load_catalog():
        quants = pulled_quants(name)
        if quants:
            pulled[name] = quants
    return pulled


@llm.hookimpl
def register_models(register):
    register(DeraModel(MODEL_ID))
    for name in _pulled_pairs():
        register(DeraModel(f"{MODEL_ID}/{name}", name))


@llm.hookimpl
def register_commands(cli):
    @cli.group(name="dera")
    def dera_group():
        """dera-local: decoding-time realignment of local GGUF pairs."""

    @dera_group.command(name="pairs")
    def pairs():
        """The DeRa pairs llm can use here (llm -m NAME)."""
        click.echo(f"{MODEL_ID}: the default pair (DERA_* settings, else the built-in pair)")
        pulled = _pulled_pairs()
        for name, entry in load_catalog().items():
            if name in pulled:
                click.echo(f"{MODEL_ID}/{name}: {entry.description} ({', '.join(pulled[name])})")
            else:
                click.echo(f"  {name}: not downloaded (dera-local pull {name})")
