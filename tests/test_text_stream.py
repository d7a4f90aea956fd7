"""TextStream on hand-made byte sequences: UTF-8 held back, stop strings never leak."""

from __future__ import annotations

from dera_local.engine.outputs import TextStream


def _feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    out = [stream.push(p) for p in pieces]
    out.append(stream.finish())
    return out


def test_character_split_across_tokens_is_held_until_complete():
    euro = "€".encode()  # three bytes
    chunks = _feed(TextStream(), [b"a", euro[:1], euro[1:2], euro[2:] + b"b"])
    assert chunks == ["a", "", "", "€b", ""]


def test_unfinished_character_at_the_end_becomes_replacement_char():
    assert _feed(TextStream(), [b"ok", "é".encode()[:1]]) == ["ok", "", "\ufffd"]


def test_stop_string_split_across_tokens_is_never_emitted():
    stream = TextStream(stop=["END"])
    chunks = _feed(stream, [b"hello E", b"N", b"D more"])
    assert "".join(chunks) == "hello "
    assert stream.stopped
    assert all("E" not in c for c in chunks)


def test_false_start_of_a_stop_string_is_released():
    chunks = _feed(TextStream(stop=["END"]), [b"an E", b"x"])
    assert chunks == ["an ", "Ex", ""]


def test_earliest_of_several_stop_strings_wins():
    stream = TextStream(stop=["world", "lo"])
    assert "".join(_feed(stream, [b"hello world"])) == "hel"
