"""How large a grammar llama.cpp is handed: limits checked before it sees one, so that no
grammar (made from a client's JSON schema, or GBNF written by hand) can crash the process
or slow every other request's steps. `bench/grammar_cost.py` measures what each guards.

- Nested groups. llama.cpp's GBNF parser recurses once per nested `( ... )` (about 0.5 KB
  of stack a level): 20,000 levels overflow an 8 MB stack and the process dies (SIGSEGV).
  llama-cpp-python's schema converter writes `maxLength: n` and `maxItems: n` as n nested
  optional groups, `(c (c (c)?)?)?`, which is how one schema killed the server. llama.cpp
  refuses such a nest beyond about 1,000 levels anyway ("exceeds sane defaults"), but only
  after it has parsed it.
- Repetition counts. A bounded repetition is unrolled (one rule per count); llama.cpp
  unrolls up to 2,000 and silently makes a larger bound unbounded.
- Alternatives alive at once. At every step the grammar tests each vocabulary token
  against every parse stack alive; an enum of n values starts n stacks (on a
  49,152-token vocabulary about 0.25 ms a stack a step, on the decode thread that every
  request shares: an enum of 40,000 values took 8 s a step).
- Size. Parsing and converting are linear in the text, but nobody needs megabytes.

A check raises BadParameterError naming the place in the schema and the limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from ..errors import BadParameterError

MAX_REPEAT = 1_000  # minLength/maxLength/minItems/maxItems, {m,n}: llama.cpp's own nest limit
MAX_GROUP_DEPTH = 1_000  # nested ( ... ) in GBNF: under 0.5 MB of the parser's stack
MAX_ALTERNATIVES = 256  # parse stacks a schema may keep alive at once (~+70 ms a step)
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_NODES = 10_000
MAX_GRAMMAR_CHARS = 200_000  # GBNF text, written or converted

# The schema keywords whose value is a count that the converter unrolls.
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
_REPETITION = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def check_gbnf(grammar: str) -> None:
    """Refuses GBNF that is too long, nests groups deeper than the parser's stack allows,
    or repeats more than llama.cpp unrolls."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise BadParameterError(
            f"the grammar has {len(grammar):,} characters; the limit is {MAX_GRAMMAR_CHARS:,}"
        )
    depth = deepest = 0
    for kind, start, end in _gbnf_tokens(grammar):
        if kind == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif kind == ")":
            depth -= 1
        elif kind == "{":
            for count in _REPETITION.fullmatch(grammar[start:end]).groups():
                if count and int(count) > MAX_REPEAT:
                    raise BadParameterError(
                        f"the grammar repeats {grammar[start:end]}: at most {MAX_REPEAT} "
                        "repetitions (for no bound write * or +)"
                    )
    if deepest > MAX_GROUP_DEPTH:
        raise BadParameterError(
            f"the grammar nests groups {deepest} deep; the limit is {MAX_GROUP_DEPTH}"
        )


def _gbnf_tokens(grammar: str) -> Iterator[tuple[str, int, int]]:
    """The grammar's parentheses and {m,n} repetitions, outside literals, character
    classes and comments: (kind, start, end)."""
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c in '"[':  # a literal or a class: skip to its unescaped end
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "#":
            while i < n and grammar[i] not in "\r\n":
                i += 1
        elif c in "()":
            yield c, i, i + 1
        elif c == "{":
            match = _REPETITION.match(grammar, i)
            if match:
                yield "{", i, match.end()
                i = match.end() - 1
        i += 1


def check_schema(schema: Any) -> None:
    """Refuses a JSON schema whose grammar would be too large or too costly, before the
    converter builds it (some of its output grows with the counts: minLength: 10**9 is a
    gigabyte of text). Walks the schema without recursion."""
    nodes = 0
    stack: list[tuple[Any, str, int]] = [(schema, "#", 0)]
    while stack:
        node, where, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise BadParameterError(f"the schema has over {MAX_SCHEMA_NODES:,} parts")
        if depth > MAX_SCHEMA_DEPTH:
            raise BadParameterError(
                f"the schema nests deeper than {MAX_SCHEMA_DEPTH} at {_short(where)}"
            )
        if isinstance(node, dict):
            _check_counts(node, where)
            values = node.get("enum")
            if isinstance(values, list) and len(values) > MAX_ALTERNATIVES:
                raise BadParameterError(
                    f"the enum at {where} has {len(values):,} values; the limit is "
                    f"{MAX_ALTERNATIVES}, since each is checked against the whole vocabulary "
                    "at every step"
                )
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                _check_pattern(pattern, f"{where}/pattern")
            children = node.items()
        elif isinstance(node, list):
            children = ((str(i), v) for i, v in enumerate(node))
        else:
            continue
        stack.extend((value, f"{where}/{key}", depth + 1) for key, value in children)
    alive = _alive(schema, schema, {}, set())
    if alive > MAX_ALTERNATIVES:
        raise BadParameterError(
            f"the schema allows {alive:,} alternatives at one point (enum values, anyOf "
            f"branches, optional properties); the limit is {MAX_ALTERNATIVES}, since each "
            "is checked against the whole vocabulary at every step"
        )


def _short(where: str) -> str:
    """A JSON pointer for a message: a deep one shows its start and its end."""
    return where if len(where) <= 80 else f"{where[:40]}...{where[-36:]}"


def _check_counts(node: dict, where: str) -> None:
    where = _short(where)
    for name in _COUNTS:
        value = node.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadParameterError(f"{name} at {where} must be a whole number >= 0")
        if value > MAX_REPEAT:
            raise BadParameterError(
                f"{name} {value} at {where} is over {MAX_REPEAT}, the most repetitions "
                f"llama.cpp's grammar engine unrolls; drop {name} (and bound the answer "
                "with max_tokens instead)"
            )
    for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
        if node.get(low) is not None and node.get(high) is not None and node[low] > node[high]:
            raise BadParameterError(f"{low} is above {high} at {where}")


def _check_pattern(pattern: str, where: str) -> None:
    if len(pattern) > MAX_GRAMMAR_CHARS // 10:
        raise BadParameterError(
            f"the pattern at {where} is over {MAX_GRAMMAR_CHARS // 10:,} characters"
        )
    for match in _REPETITION.finditer(pattern):
        if match.start() > 0 and pattern[match.start() - 1] == "\\":
            continue  # an escaped brace is a literal
        for count in match.groups():
            if count and int(count) > MAX_REPEAT:
                raise BadParameterError(
                    f"the pattern at {where} repeats {match.group()}: at most {MAX_REPEAT}"
                )


def _alive(node: Any, root: Any, memo: dict[str, int], resolving: set[str]) -> int:
    """An upper estimate of the parse stacks that the node's grammar keeps alive at one
    point: a union adds its branches, a sequence (properties, items) is alive one part at
    a time, plus the choice of which optional property comes next. `$ref`s count as
    what they point at (recursion is refused: the converter cannot handle it)."""
    if not isinstance(node, dict):
        return 1
    ref = node.get("$ref")
    if isinstance(ref, str):
        if ref in resolving:
            raise BadParameterError(
                f"the schema refers to itself ({ref}): recursive schemas are not supported"
            )
        if ref not in memo:
            resolving.add(ref)
            memo[ref] = _alive(_target(ref, root), root, memo, resolving)
            resolving.discard(ref)
        return memo[ref]
    if isinstance(node.get("enum"), list):
        return max(1, len(node["enum"]))
    branches = node.get("anyOf") or node.get("oneOf")
    if isinstance(branches, list):
        return sum(_alive(b, root, memo, resolving) for b in branches)
    if isinstance(node.get("type"), list):
        return len(node["type"])
    parts: list[Any] = []
    optional = 0
    properties = node.get("properties")
    if isinstance(properties, dict):
        parts += properties.values()
        required = node.get("required") if isinstance(node.get("required"), list) else []
        optional = sum(name not in required for name in properties)
    for key in ("items", "prefixItems", "allOf", "additionalProperties"):
        value = node.get(key)
        parts += value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    inner = max((_alive(p, root, memo, resolving) for p in parts), default=1)
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        inner = max(inner, pattern.count("|") + 1)
    return inner + optional


def _target(ref: str, root: Any) -> Any:
    """What a local `#/...` reference points at (the converter supports no others)."""
    if not ref.startswith("#"):
        raise BadParameterError(
            f"the schema refers to {ref!r}: only local #/... references are supported"
        )
    target = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise BadParameterError(f"the schema refers to {ref!r}, which it does not define")
    return target
