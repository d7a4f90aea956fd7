"""Reading prompt and prompt/response files for sweeps and scoring, with errors that name
the file and line; loading a user's reward function from "module:function"."""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from ..errors import BadParameterError, DeraError
from .default_pair import ADAPTER_DIR


def _lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DeraError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DeraError(f"{path} is not UTF-8 text") from None


def _json_object(path: str | Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DeraError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DeraError(f"{path}, line {number}: expected a JSON object")
    return record


Prompt = str | list[dict]  # raw text, or chat messages [{"role": ..., "content": ...}]


def _messages(path: str | Path, number: int, value: object) -> list[dict]:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise DeraError(
            f'{path}, line {number}: "messages" must be a non-empty list of '
            '{"role": ..., "content": ...} objects with string values'
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt_of(path: str | Path, number: int, record: dict, *, needed: str) -> Prompt:
    """A record's "messages" (chat turns) or "prompt" (text), whichever it has."""
    if "messages" in record:
        if "prompt" in record:
            raise DeraError(f'{path}, line {number}: give "prompt" or "messages", not both')
        return _messages(path, number, record["messages"])
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise DeraError(f"{path}, line {number}: {needed}")
    return prompt


def read_prompts(path: str | Path) -> list[tuple[str, Prompt]]:
    """(id, prompt) pairs from a .jsonl file ({"prompt": text} or {"messages": [...]}, and
    an optional "id") or from a text file with one prompt per line (id = line number).
    Blank lines are skipped."""
    jsonl = str(path).endswith(".jsonl")
    prompts = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append((str(number), line))
            continue
        record = _json_object(path, number, line)
        needed = 'needs a non-empty string field "prompt" or a "messages" list'
        prompt = _prompt_of(path, number, record, needed=needed)
        prompts.append((str(record.get("id", number)), prompt))
    if not prompts:
        raise DeraError(f"{path} holds no prompts")
    return prompts


def read_pairs(path: str | Path) -> list[tuple[str, Prompt, str]]:
    """(id, prompt, response) triples from a .jsonl file of {"prompt" or "messages",
    "response"} objects."""
    pairs = []
    needed = 'needs string fields "prompt" (or a "messages" list) and "response" (non-empty)'
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        record = _json_object(path, number, line)
        response = record.get("response")
        if not isinstance(response, str) or not response:
            raise DeraError(f"{path}, line {number}: {needed}")
        prompt = _prompt_of(path, number, record, needed=needed)
        pairs.append((str(record.get("id", number)), prompt, response))
    if not pairs:
        raise DeraError(f"{path} holds no prompt/response pairs")
    return pairs


# Rewards known by name: the built-in pair's own reward, as its model card defines it.
BUILTIN_REWARDS = {"conciseness": (f"{ADAPTER_DIR}/reward.py", "reward")}


def load_reward(spec: str) -> Callable[[str], float]:
    """'package.module:function' -> the function (text -> float); or a built-in name:
    'conciseness' is the built-in pair's reward (minus the answer's words)."""
    if spec in BUILTIN_REWARDS:
        return _bundled_reward(*BUILTIN_REWARDS[spec])
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        names = ", ".join(BUILTIN_REWARDS)
        raise BadParameterError(
            f"a reward is named as module:function (or built in: {names}), got {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise DeraError(f"cannot import reward module {module_name!r}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DeraError(f"{module_name!r} has no function {function_name!r}")
    return function


def _bundled_reward(relative_path: str, function_name: str) -> Callable[[str], float]:
    """A reward function from a model's folder shipped with dera-local (the folder's name
    is not a Python identifier, so the file is loaded by path)."""
    path = Path(str(resources.files("dera_local.bundled_models") / relative_path))
    spec = importlib.util.spec_from_file_location(f"dera_local_reward_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function_name)
