"""Request side of structured outputs and tools: which constraint a request asks for, checked up front.

Structured outputs arrive under several names; at most one may be given:
  * OpenAI: `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}};
  * vLLM's older fields: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`;
  * vLLM's current field: `structured_outputs` {"json" | "regex" | "choice" | "grammar" | "json_object": ...}.

Tools: `tools` is checked (each a function with a name and a JSON-schema `parameters`), `tool_choice`
is none | auto | required | {"type": "function", "function": {"name": ...}}. `required` and a named
function are enforced with a grammar (`tool_call_constraint`): required makes the model write a JSON
array of {"name", "parameters"} objects over the offered tools (one item when `parallel_tool_calls` is
false), a named function makes it write that function's arguments object. So even a model that has
never seen a tool format returns a valid call.

Every constraint is compiled once here (worker.engine.grammar.check): an invalid schema or regex is a
400 naming the field, never an engine error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from worker.engine.grammar import InvalidGrammar, check
from worker.sampling_params import StructuredOutput
from worker.server.errors import bad_request

STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs")
_STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                            "json_object": "json_object"}


@dataclass
class ToolChoice:
    mode: str = "auto"  # none | auto | required | named
    name: str | None = None  # the function, when mode == "named"


# ---------------------------------------------------------------------- structured outputs
def structured_output(body: dict) -> tuple[StructuredOutput | None, str | None]:
    """(the constraint, the field that gave it) from the body; 400 when malformed or given twice."""
    found: list[tuple[StructuredOutput, str]] = []
    for name in STRUCTURED_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        constraint = _from_field(name, value)
        if constraint is not None:
            found.append((constraint, name))
    if len(found) > 1:
        raise bad_request(found[1][1], f"give one structured output, not both '{found[0][1]}' and '{found[1][1]}'.")
    if not found:
        return None, None
    constraint, name = found[0]
    checked(constraint, name)
    return constraint, name


def checked(constraint: StructuredOutput, param: str) -> StructuredOutput:
    try:
        check(constraint)
    except InvalidGrammar as error:
        what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice list",
                "json_object": "JSON object grammar"}[constraint.kind]
        raise bad_request(param, f"'{param}' is not a valid {what}: {error}") from None
    return constraint


def _schema_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise bad_request(param, f"'{param}' is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise bad_request(param, f"'{param}' must be a JSON schema object.")
    return json.dumps(value)


def _choice_text(value: Any, param: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise bad_request(param, f"'{param}' must be a non-empty array of non-empty strings.")
    return json.dumps(value)


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad_request(param, f"'{param}' must be a non-empty string.")
    return value


def _from_field(name: str, value: Any) -> StructuredOutput | None:
    if name == "response_format":
        return _from_response_format(value)
    if name == "guided_json":
        return StructuredOutput("json_schema", _schema_text(value, name))
    if name == "guided_regex":
        return StructuredOutput("regex", _string(value, name))
    if name == "guided_choice":
        return StructuredOutput("choice", _choice_text(value, name))
    if name == "guided_grammar":
        return StructuredOutput("grammar", _string(value, name))
    return _from_structured_outputs(value)


def _from_response_format(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict):
        raise bad_request("response_format", "'response_format' must be an object.")
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema", "'json_schema' must be an object with a 'schema'.")
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:
            schema = {"type": "object"}  # OpenAI allows a json_schema without a schema: any object
        return StructuredOutput("json_schema", _schema_text(schema, "response_format.json_schema.schema"))
    raise bad_request("response_format.type", f"'type' must be text, json_object or json_schema, got {kind!r}.")


def _from_structured_outputs(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict):
        raise bad_request("structured_outputs", "'structured_outputs' must be an object.")
    given = [key for key in _STRUCTURED_OUTPUTS_KEYS if value.get(key) not in (None, False)]
    if len(given) > 1:
        raise bad_request("structured_outputs", f"give one of {', '.join(_STRUCTURED_OUTPUTS_KEYS)}, not {given}.")
    if not given:
        return None
    key = given[0]
    param = f"structured_outputs.{key}"
    kind = _STRUCTURED_OUTPUTS_KEYS[key]
    if kind == "json_schema":
        return StructuredOutput(kind, _schema_text(value[key], param))
    if kind == "choice":
        return StructuredOutput(kind, _choice_text(value[key], param))
    if kind == "json_object":
        return StructuredOutput(kind)
    return StructuredOutput(kind, _string(value[key], param))


# ---------------------------------------------------------------------- tools
def parse_tools(value: Any) -> list[dict] | None:
    """The `tools` array, checked: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("tools", "'tools' must be an array of tool objects.")
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(where, "each tool must be an object with \"type\": \"function\".")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request(f"{where}.function", "each tool needs a 'function' object with a non-empty 'name'.")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request(f"{where}.function.parameters", "'parameters' must be a JSON schema object.")
    return value or None


def parse_tool_choice(value: Any, tools: list[dict] | None) -> ToolChoice:
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise bad_request("tool_choice", "tool_choice 'required' needs 'tools'.")
        return ToolChoice(value)
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        names = [t["function"]["name"] for t in tools or []]
        if name not in names:
            raise bad_request("tool_choice", f"tool_choice names the function {name!r}, which is not in 'tools' "
                              f"({', '.join(names) or 'none given'}).")
        return ToolChoice("named", name)
    raise bad_request("tool_choice", "'tool_choice' must be none, auto, required or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}.")


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def tool_call_constraint(tools: list[dict], choice: ToolChoice, parallel: bool) -> StructuredOutput | None:
    """The grammar that enforces tool_choice required / named (None for none / auto)."""
    if choice.mode == "named":
        tool = next(t for t in tools if t["function"]["name"] == choice.name)
        return checked(StructuredOutput("json_schema", json.dumps(_parameters(tool))), "tool_choice")
    if choice.mode != "required":
        return None
    calls = [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]}, "parameters": _parameters(t)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema: dict = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return checked(StructuredOutput("json_schema", json.dumps(schema)), "tools")
