"""Tool calls (dera_local/tools, /v1/chat/completions with `tools`) on the tiny pair,
through the official `openai` client against a real server: calls parse and their
arguments validate against the tool's schema (jsonschema) at lam 0, 0.5 and 1, with
`required` and a named tool, streamed and not; a tool result turn renders; `auto` is a
lazy grammar that applies once the call opener appears; bad tools are one 400 naming
the field (and the tool)."""

from __future__ import annotations

import json

import llama_cpp
import pytest
from server_process import start_server
from tiny_models import CHATML, write_tiny_model

import dera_local
from dera_local.sampling.chain import SamplerChain, SamplingParams
from dera_local.tools import ToolTextFilter, parse_calls
from dera_local.tools.grammar import calls_grammar
from dera_local.tools.spec import parse_tools

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "now",
        "description": "The time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "local"]}},
            "required": ["zone"],
        },  # fmt: skip
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


# A Qwen2.5 / Hermes-style template with a tools section (the shape of Qwen2.5's own,
# shortened): tools in the system turn, calls and results as <tool_call> and
# <tool_response> blocks.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t.function | tojson }}\n"
    '{% endfor %}Call one as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>'
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module", params=["native template", "generic rendering"])
def server(request, tmp_path_factory):
    """The tiny pair with room for the tools' description (a byte-level vocabulary: a
    long prompt), under a template with a tools section and under plain ChatML."""
    folder = tmp_path_factory.mktemp("tools")
    template = TOOLS_TEMPLATE if request.param == "native template" else CHATML
    aligned = write_tiny_model(folder / "a.gguf", seed=1, chat_template=template,
                               context_length=4096)  # fmt: skip
    reference = write_tiny_model(folder / "r.gguf", seed=2, context_length=4096)
    process, base = start_server(
        ["-m", str(aligned), "-mr", str(reference), "-c", "8192", "--parallel", "2"]
    )
    yield base
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def _check_calls(calls, names=None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_required_calls_parse_and_validate_at_every_lam(client, lam):
    reply = client.chat.completions.create(
        model="dera-local", messages=CHAT, tools=TOOLS, tool_choice="required", max_tokens=600,
        temperature=1, seed=3, extra_body={"dera_lambda": lam},
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    _check_calls(choice.message.tool_calls)


def test_a_named_tool_is_the_one_called_streamed_and_not(client):
    named = {"type": "function", "function": {"name": "now"}}
    settings = dict(model="dera-local", messages=CHAT, tools=TOOLS, tool_choice=named,
                    max_tokens=600, temperature=1, seed=5, parallel_tool_calls=False)  # fmt: skip
    whole = client.chat.completions.create(**settings)
    calls = whole.choices[0].message.tool_calls
    _check_calls(calls, {"now"})
    assert len(calls) == 1
    chunks = list(client.chat.completions.create(**settings, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_tool_result_turn_renders_and_the_answer_goes_on(client):
    history = CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": '{"city": "Paris", "unit": "celsius"}'},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    ]  # fmt: skip
    reply = client.chat.completions.create(
        model="dera-local", messages=history, tools=TOOLS, tool_choice="none", max_tokens=8,
        temperature=0,
    )  # fmt: skip
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_auto_without_a_call_is_plain_text(client):
    reply = client.chat.completions.create(
        model="dera-local", messages=CHAT, tools=TOOLS, max_tokens=8, temperature=0
    )
    plain = client.chat.completions.create(
        model="dera-local", messages=CHAT, max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")
    # the tools are described in the prompt, so the text differs from a tool-less chat
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"$ref": "https://example.com/x"}}}}}]},
         "tools[0] (f)"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f",
          "arguments": "{not json"}}]}]}, "not JSON"),
        ({"response_format": {"type": "json_object"}, "tool_choice": "required"}, "tools"),
    ],
)  # fmt: skip
def test_bad_tools_are_one_400_naming_the_field(client, extra, says):
    settings = {"model": "dera-local", "messages": CHAT, "tools": TOOLS, **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**settings)
    message = refused.value.body["message"]
    assert says in message and "\n" not in message


# --- the library pieces -----------------------------------------------------------------


def test_parse_calls_takes_clean_calls_only():
    names = {"get_weather"}
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert parse_calls("Let me check.\n" + block, names)[0] == "Let me check."
    assert parse_calls(block + "\n" + block, names)[1][1].arguments == {"city": "Oslo"}
    for text in (block + " and more", block.replace("get_weather", "other"),
                 block[:-5], "<tool_call>\n{oops}\n</tool_call>", "no call"):  # fmt: skip
        assert parse_calls(text, names) == (text, [])


def test_the_stream_filter_never_shows_part_of_an_opener():
    text = "Sure <tool_call>\n{}\n</tool_call>"
    for size in (1, 2, 3, 7):
        shown, f = [], ToolTextFilter()
        for i in range(0, len(text), size):
            shown.append(f.feed(text[i : i + size]))
        assert "".join(shown) == "Sure " and f.held == text[5:]
    f = ToolTextFilter()
    assert f.feed("a <tool") == "a " and f.feed("box>") == "<toolbox>" and not f.opened


def test_auto_is_a_lazy_grammar_that_applies_from_the_opener_on(pair):
    """Before the opener every token may come; once the answer has written it, only
    what continues a call (its newline, then the JSON object)."""
    grammar = calls_grammar(parse_tools(TOOLS), parallel=True)
    params = SamplingParams(grammar=grammar, grammar_triggers=("<tool_call>",))
    chain = SamplerChain(params, pair.model.vocab, 256)
    try:
        assert chain.allowed_tokens().all()
        for token in pair.tokenize("Hi <tool_call>", add_special=False):
            llama_cpp.llama_sampler_accept(chain.ptr, token)
        allowed = chain.allowed_tokens()
        assert 0 < allowed.sum() < 10  # the newline after the opener (and end tokens?)
        assert allowed[pair.tokenize("\n", add_special=False)[0]]
    finally:
        chain.close()


def test_the_generic_rendering_describes_the_tools_in_the_system_message(pair):
    from dera_local.tools import tool_messages

    messages, variables = tool_messages(CHAT, parse_tools(TOOLS), native=False)
    assert variables == {} and messages[0]["role"] == "system"
    assert "get_weather" in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    native, variables = tool_messages(CHAT, parse_tools(TOOLS), native=True)
    assert native == CHAT and variables["tools"][0]["function"]["name"] == "get_weather"
    assert dera_local  # the package's face is imported (tools are reachable from it)


# --- Ollama's API: tools on /api/chat -----------------------------------------------------


def switch_lights(on: bool) -> str:
    """Switches the lights.

    Args:
      on: whether the lights are on afterwards
    """
    return "done"


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_the_ollama_client_with_a_python_function_as_a_tool(server, lam):
    """The ollama client turns the function into a tool; with dera-local's
    options.tool_choice "required" the answer is a call, its arguments an object that
    validates against the schema the client made; without it (Ollama's auto) the tiny
    model answers in text."""
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server)
    schema = ollama._utils.convert_function_to_tool(switch_lights).function.parameters
    schema = schema.model_dump(exclude_none=True)
    reply = client.chat(
        model=f"dera-local:{lam:g}", messages=CHAT, tools=[switch_lights],
        options={"num_predict": 300, "temperature": 1, "seed": 1, "tool_choice": "required",
                 "parallel_tool_calls": False},
    )  # fmt: skip
    calls = reply.message.tool_calls
    assert calls and len(calls) == 1 and calls[0].function.name == "switch_lights", reply
    for call in calls:
        assert isinstance(call.function.arguments, dict)
        jsonschema.validate(call.function.arguments, schema)
    free = client.chat(
        model=f"dera-local:{lam:g}", messages=CHAT, tools=[switch_lights],
        options={"num_predict": 8, "temperature": 0},
    )  # fmt: skip
    assert free.done and not free.message.tool_calls
    assert "tools" in client.show("dera-local").capabilities


def test_ollama_tool_turns_render_and_a_call_comes_back_as_an_object(server, client):
    """A history with a call and its result renders on /api/chat; the answer that /v1
    gives as a call (same lam, seed and sampling: tool_choice required there, the
    grammar from the first token) parses the same way in Ollama's form."""
    import urllib.request

    history = CHAT + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather",
                          "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "21 degrees"},
    ]  # fmt: skip
    body = {"model": "dera-local", "messages": history, "tools": TOOLS, "stream": False,
            "options": {"num_predict": 8, "temperature": 0}}  # fmt: skip
    request = urllib.request.Request(
        f"{server}/api/chat", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as response:
        answer = json.loads(response.read())
    assert answer["done"] is True and answer["message"]["role"] == "assistant"


def test_ollamas_answer_with_a_call_has_the_arguments_as_an_object():
    from dera_local.engine.stream import GenerationResult
    from dera_local.server.ollama import _Shape
    from dera_local.server.tool_requests import ToolRequest
    from dera_local.tools.spec import ToolChoice

    tools = ToolRequest(parse_tools(TOOLS), ToolChoice("auto"), True, False)
    text = 'Checking.\n<tool_call>\n{"name": "now", "arguments": {"zone": "utc"}}\n</tool_call>'
    result = GenerationResult(text, [1, 2], [3], "stop", 1.0, 1)
    body = _Shape("dera-local", True, 0.0, tools=tools).final(text, "stop", result)
    assert body["message"]["content"] == "Checking."
    assert body["message"]["tool_calls"] == [
        {"function": {"index": 0, "name": "now", "arguments": {"zone": "utc"}}}
    ]
    shape = _Shape("dera-local", True, 0.0, tools=tools)
    assert shape.held.feed(text) == "Checking.\n" and shape.held.held.startswith("<tool_call>")


# --- /v1/responses ------------------------------------------------------------------------


def test_responses_text_equals_chat_at_the_same_settings(client):
    reply = client.responses.create(
        model="dera-local", input="hello", instructions="Be brief.", max_output_tokens=8,
        temperature=0, extra_body={"dera_lambda": 0.5},
    )  # fmt: skip
    chat = client.chat.completions.create(
        model="dera-local", max_tokens=8, temperature=0, extra_body={"dera_lambda": 0.5},
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    )  # fmt: skip
    assert reply.output_text == chat.choices[0].message.content
    assert reply.usage.output_tokens == chat.usage.completion_tokens
    assert reply.status in ("completed", "incomplete") and reply.model_extra["dera"]["lam"] == 0.5


def test_responses_json_schema_and_a_function_call_streamed_and_not(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = client.responses.create(
        model="dera-local", input="hello", max_output_tokens=200, temperature=1,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
    )  # fmt: skip
    jsonschema.validate(json.loads(reply.output_text), schema)
    flat = [{"type": "function", **t["function"]} for t in TOOLS]
    settings = dict(model="dera-local", input=CHAT[0]["content"], tools=flat,
                    tool_choice="required", max_output_tokens=600, temperature=1,
                    parallel_tool_calls=False, extra_body={"seed": 4})  # fmt: skip
    whole = client.responses.create(**settings)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    events = list(client.responses.create(**settings, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    streamed = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(c.name, json.loads(c.arguments)) for c in streamed if c.type == "function_call"] == [
        (c.name, json.loads(c.arguments)) for c in calls
    ]
    # a function call output turn renders and the conversation goes on
    follow = client.responses.create(
        model="dera-local", tools=flat, tool_choice="none", max_output_tokens=6,
        input=[{"role": "user", "content": "weather?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21"}],
    )  # fmt: skip
    assert follow.status in ("completed", "incomplete")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"input": [{"type": "input_image"}]}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_responses_refusals_name_the_field(client, extra, field):
    settings = {"model": "dera-local", "input": "hello", **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**settings)
    assert refused.value.body["param"] == field, refused.value.body


def test_bare_json_calls_are_read_and_held_back_while_streaming():
    """Small models (Qwen2.5-Coder-0.5B with auto, here by hand) often write the call's
    JSON without the markers: a whole answer of such objects is calls too."""
    names = {"get_weather"}
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text, calls = parse_calls(bare, names)
    assert text == "" and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert parse_calls('{"name": "nope", "arguments": {}}', names)[1] == []
    assert parse_calls("Sure: " + bare, names)[1] == []  # words first: text
    f = ToolTextFilter()
    assert f.feed(' {"na') == "" and f.feed('me"') == "" and f.held == ' {"name"'
    f = ToolTextFilter()
    assert f.feed("Hi ") == "Hi " and f.feed("{x}") == "{x}"  # after text: shown
