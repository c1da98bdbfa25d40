"""Function calling on local models (transformers, llama.cpp), which have no tool parser of their own.

A request with `tools` becomes a plain chat the small model can follow, and its reply becomes `tool_calls`:

    tools          → a system message listing the functions (name, description, JSON Schema of the arguments) and
                     the one reply form: `{"name": ..., "arguments": {...}}`;
    history        → an assistant's earlier `tool_calls` are written as that reply form, a `tool` message as
                     "Function <name> returned: ..." from the user, so any chat template renders them;
    tool_choice    → `required` or a named function: the reply is constrained while decoding to a call of one of
                     the functions with arguments that match its schema (`response_format` json_schema, enforced by
                     the backend's grammar, backends/structured.py), so it always parses; `auto`: the model writes
                     freely and a reply that is such a call of a listed function becomes one; `none`: tools ignored;
    reply          → `tool_calls` with `finish_reason: tool_calls` and no content, as OpenAI answers.

Written here because neither transformers nor llama-cpp-python turn a small model's reply into OpenAI tool calls
(llama-cpp-python's `chatml-function-calling` handler needs its own prompt format and model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slm_fusion import protocol as P
from slm_fusion.backends.base import Generation
from slm_fusion.errors import InvalidRequest


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of the function-calling layer."""

    functions: tuple[P.FunctionSpec, ...]
    mode: str  # auto | required
    forced: str | None = None  # the function tool_choice names


def plan_of(tools: Any, tool_choice: Any) -> ToolPlan | None:
    """The request's `tools` and `tool_choice` (None when no tool may be called); bad values are a 400."""
    if not tools:
        return None
    try:
        functions = P.function_tools(tools)
        mode, forced = P.tool_choice_of(tool_choice, [f.name for f in functions])
    except ValueError as e:
        raise InvalidRequest(str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None
    return None if mode == "none" else ToolPlan(tuple(functions), mode, forced)


def call_schema(plan: ToolPlan) -> dict[str, Any]:
    """JSON Schema of one call: `{"name": <a function>, "arguments": <its parameters>}`."""
    options = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}
               for f in plan.functions if plan.forced in (None, f.name)]
    return options[0] if len(options) == 1 else {"anyOf": options}


def response_format(plan: ToolPlan) -> dict[str, Any] | None:
    """The constraint for a forced call (None for `auto`, which lets the model answer in text)."""
    if plan.mode != "required":
        return None
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "strict": True, "schema": call_schema(plan)}}


def system_prompt(plan: ToolPlan) -> str:
    listed = "\n".join(json.dumps({"name": f.name, "description": f.description, "parameters": f.parameters},
                                  ensure_ascii=False) for f in plan.functions)
    must = (f"You must call the function {plan.forced}." if plan.forced else
            "You must call one of them." if plan.mode == "required" else
            "Call one when it helps answer; otherwise answer normally.")
    return (f"You can call these functions:\n{listed}\n{must} To call a function, reply with only a JSON object "
            '{"name": <function name>, "arguments": {<arguments>}}.')


def messages_for(messages: list[Any], plan: ToolPlan) -> list[dict[str, str]]:
    """The conversation (protocol.ChatMessage list) as plain role/content messages with the functions stated."""
    out: list[dict[str, str]] = [{"role": "system", "content": system_prompt(plan)}]
    names: dict[str, str] = {}  # tool_call_id -> function name, for the results
    for m in messages:
        if m.role in ("system", "developer"):
            out[0]["content"] = f"{m.text()}\n\n{out[0]['content']}"
        elif m.role == "assistant" and m.tool_calls:
            calls = []
            for c in m.tool_calls:
                fn = c.get("function") or {}
                names[str(c.get("id"))] = str(fn.get("name"))
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except (TypeError, ValueError):
                    arguments = fn.get("arguments")
                calls.append(json.dumps({"name": fn.get("name"), "arguments": arguments}, ensure_ascii=False))
            out.append({"role": "assistant", "content": "\n".join(calls)})
        elif m.role == "tool":
            name = names.get(str(m.tool_call_id), m.name or "the function")
            out.append({"role": "user", "content": f"Function {name} returned: {m.text()}"})
        else:
            out.append({"role": m.role, "content": m.text()})
    return out


def _call_in(text: str, plan: ToolPlan) -> dict[str, Any] | None:
    """A call of a listed function written as the whole reply (a ```json fence allowed), else None."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        data = json.loads(body)
    except ValueError:
        return None
    names = {f.name for f in plan.functions}
    if isinstance(data, dict) and data.get("name") in names and isinstance(data.get("arguments", {}), dict):
        return P.tool_call(data["name"], data.get("arguments", {}))
    return None


def as_tool_calls(generations: list[Generation], plan: ToolPlan) -> list[Generation]:
    """Replies that are calls become `tool_calls` (content None, finish_reason tool_calls); others stay text."""
    for g in generations:
        call = _call_in(g.text, plan) if g.finish_reason != "length" else None
        if call is not None:
            g.text, g.tool_calls, g.finish_reason = "", [call], "tool_calls"
    return generations
