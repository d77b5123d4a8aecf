"""The request shapes of the routes beside OpenAI's chat and completions: OpenAI's Responses
API, Anthropic's Messages API (both served by vLLM) and vLLM's own tokenize, detokenize and
score.

For each, the fields the gateway reads are type-checked here (a 400 at the door rather than a
500 deeper in), and the two conversational ones are read as turns, ``(role, content)`` pairs,
so that the routing key follows the same rules as chat's: ``instructions`` and ``system`` are
the system message, ``input`` and ``messages`` the rest. A conversation sent through any of the
three APIs renders to the same key, as it renders to the same prompt on the engine (one chat
template), so its cached prefix is found whichever API a client speaks.
"""

from __future__ import annotations

from typing import Any, Iterator

from lb.errors import bad_request

# Content parts that carry text: chat's and Anthropic's "text", the Responses API's own two.
_TEXT_PARTS = frozenset(("text", "input_text", "output_text"))


def part_text(content: Any) -> str:
    """A turn's text: the string, or its text parts joined (images, tool calls: nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict)
                       and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str))
    return ""


# -- turns, for the routing key ----------------------------------------------------------------

def responses_turns(payload: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``instructions`` as the system turn, then ``input``: a string is the user's turn; a
    list holds messages (with a role) and other items (function calls and their outputs,
    reasoning), which are named by their type."""
    instructions = payload.get("instructions")
    if instructions:
        yield "system", instructions
    items = payload["input"]
    if isinstance(items, str):
        yield "user", items
        return
    for item in items:
        role = item.get("role")
        if role is not None:
            yield role, item.get("content")
        else:
            output = item.get("output")
            yield str(item.get("type")), output if isinstance(output, str) else None


def messages_turns(payload: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Anthropic's ``system`` (a string or text blocks) as the system turn, then ``messages``."""
    system = payload.get("system")
    if system:
        yield "system", system
    for message in payload["messages"]:
        yield message["role"], message.get("content")


# -- checks of the fields the gateway reads ------------------------------------------------------

def check_responses(payload: dict[str, Any]) -> None:
    items = payload.get("input")
    if isinstance(items, list):
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise bad_request(f"`input[{i}]` must be an object", f"input[{i}]")
            _check_turn(item, f"input[{i}]", required=False)
    elif not isinstance(items, str):
        raise bad_request("`input` must be a string or an array of input items", "input")
    instructions = payload.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("`instructions` must be a string", "instructions")


def check_messages(payload: dict[str, Any]) -> None:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty array", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"`messages[{i}]` must be an object", f"messages[{i}]")
        _check_turn(message, f"messages[{i}]", required=True)
    system = payload.get("system")
    if system is not None and not isinstance(system, str) and not (
            isinstance(system, list) and all(isinstance(block, dict) for block in system)):
        raise bad_request("`system` must be a string or an array of text blocks", "system")


def _check_turn(turn: dict[str, Any], where: str, required: bool) -> None:
    role = turn.get("role")
    if (required or role is not None) and not isinstance(role, str):
        raise bad_request(f"`{where}.role` must be a string", f"{where}.role")
    content = turn.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise bad_request(f"`{where}.content` must be a string or an array of content parts",
                          f"{where}.content")


def check_tokenize(payload: dict[str, Any], check_chat: Any) -> None:
    """vLLM's two tokenize requests: ``prompt`` (a string) or chat ``messages``."""
    if "messages" in payload:
        check_chat(payload)
    elif not isinstance(payload.get("prompt"), str):
        raise bad_request("`prompt` must be a string (or send chat `messages`)", "prompt")


def check_detokenize(payload: dict[str, Any]) -> None:
    tokens = payload.get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise bad_request("`tokens` must be an array of integers (token ids)", "tokens")


# vLLM has named the two sides of a score request three ways over its versions.
SCORE_PAIRS = (("queries", "documents"), ("data_1", "data_2"), ("text_1", "text_2"))


def check_score(payload: dict[str, Any]) -> None:
    for first, second in SCORE_PAIRS:
        if first in payload or second in payload:
            for name in (first, second):
                if not isinstance(payload.get(name), (str, list, dict)):
                    raise bad_request(f"`{name}` must be a string or an array", name)
            return
    raise bad_request("a score request needs `text_1` and `text_2` (or `queries` and "
                      "`documents`)", "text_1")
