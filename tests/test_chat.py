"""Chat: the template renders the history, turns reuse the KV caches, and reuse changes
nothing in the output compared with re-reading the whole history."""

from __future__ import annotations

import pytest

import dera_local
from dera_local import ChatSession, ChatTemplate


def test_template_renders_chatml_history(pair):
    session = ChatSession(pair, system="be brief")
    session.messages = [{"role": "user", "content": "hi"}]
    text = session.template.render(session.conversation())
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tokens = session.prompt_tokens()
    assert tokens[0] == pair.loaded.aligned_model.special_token("bos")
    assert pair.tokenize("<|im_start|>", add_special=False)[0] in tokens


def test_template_override_is_used(pair):
    session = ChatSession(pair, template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    session.messages = [{"role": "user", "content": "x"}]
    assert session.template.render(session.conversation()) == "[x]"


def _three_turns(session: ChatSession) -> list:
    results = []
    for text, lam in (("hello", 1.0), ("tell me more", 0.5), ("and then?", 2.0)):
        stream = session.send(text, lam=lam)
        "".join(stream)
        results.append(stream.result)
    return results


def test_turns_reuse_the_caches_and_match_rereading_history(pair, greedy):
    pair.clear_cache()
    cached = _three_turns(ChatSession(pair, sampling=greedy, max_tokens=12))
    assert cached[1].reused_prompt_tokens >= len(cached[0].prompt_tokens)
    assert cached[2].reused_prompt_tokens >= len(cached[1].prompt_tokens)

    fresh_session = ChatSession(pair, sampling=greedy, max_tokens=12)
    fresh = []
    for text, lam in (("hello", 1.0), ("tell me more", 0.5), ("and then?", 2.0)):
        pair.clear_cache()  # every turn re-reads the whole history
        stream = fresh_session.send(text, lam=lam)
        "".join(stream)
        assert stream.result.reused_prompt_tokens == 0
        fresh.append(stream.result)
    assert [r.tokens for r in cached] == [r.tokens for r in fresh]
    assert [r.prompt_tokens for r in cached] == [r.prompt_tokens for r in fresh]


def test_stopped_reply_keeps_what_was_shown(pair, greedy):
    session = ChatSession(pair, sampling=greedy, max_tokens=50)
    stream = session.send("hi")
    shown = ""
    for chunk in stream:
        shown += chunk
        if len(shown) >= 3:
            break
    stream.close()  # what Ctrl-C does in the CLI
    assert session.messages[-1] == {"role": "assistant", "content": shown}
    follow_up = session.say("again")  # the session goes on
    assert session.messages[-1]["content"] == follow_up


def test_bos_written_by_the_template_is_not_doubled(pair):
    template = ChatTemplate.for_pair(
        pair, "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    session = ChatSession(pair, template=template.source)
    session.messages = [{"role": "user", "content": "x"}]
    bos = pair.loaded.aligned_model.special_token("bos")
    assert session.prompt_tokens().count(bos) == 1


def test_a_chat_that_outgrows_the_context_drops_its_oldest_turns(
    aligned_path, reference_path, greedy
):
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=256) as small:
        session = ChatSession(small, system="Be brief.", sampling=greedy, max_tokens=30)
        long_turn = "tell me about " + "the sea and " * 12
        with pytest.warns(UserWarning, match="outgrew the context") as caught:
            for _ in range(8):  # far more than 256 tokens of conversation in all
                session.say(long_turn)
        assert len([w for w in caught if "outgrew" in str(w.message)]) == 1  # said once
        assert session.conversation()[0] == {"role": "system", "content": "Be brief."}
        assert 2 <= len(session.messages) < 16
        assert len(session.prompt_tokens()) + 30 <= small.n_ctx
        # what is kept is re-read, and equals a fresh session given the same history
        fresh = ChatSession(small, system="Be brief.", sampling=greedy, max_tokens=30)
        fresh.messages = list(session.messages)
        assert fresh.prompt_tokens() == session.prompt_tokens()


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ 'x' * 100000000 }}", "builds a value too large"),
        ("{% for i in range(10**9) %}x{% endfor %}", "the chat template failed"),
        ("{{ 2 ** 100000000 }}", "power too large"),
        ("{% for i in range(99999) %}{{ 'y' * 99 }}{% endfor %}", "over 4000000 characters"),
    ],
)
def test_hostile_templates_fail_in_one_line_and_bounded(source, message):
    from dera_local import DeraError

    template = ChatTemplate(source)
    with pytest.raises(DeraError, match=message):
        template.render([{"role": "user", "content": "hi"}])


def test_chat_with_closed_or_binary_stdin_is_one_line(aligned_path, reference_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "dera_local.cli", "chat", "-n", "2"]
    command += ["-m", str(aligned_path), "-mr", str(reference_path)]
    binary = subprocess.run(command, input=b"\xff\xfe hi\n", capture_output=True, timeout=120)
    closed = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert binary.returncode == 1
    assert binary.stderr.decode().strip() == "Error: stdin is not UTF-8 text"
    assert closed.returncode == 0  # end of input: the chat just ends
