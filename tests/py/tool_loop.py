"""The openai client's two-step tool loop (call, tool result, answer), whole and streamed.

Run by tests/router_openai.rs against the router and against a worker's own OpenAI surface.
Reads BASE_URL, KEY, MODEL and BLOCK_TOKENS from the environment; prints one line per check with
its numbers; exits non-zero on the first failure.
"""

import json

import jsonschema

from common import BLOCK, MODEL, check, client


# Tool calling: a two-step loop (the model calls, the tool answers, the model answers), whole and
# streamed. A required or named call is constrained, so it always parses; the tool result goes
# back as a `tool` message; the second step's prompt is served from the first step's cache.
city = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}},
    "required": ["city"],
    "additionalProperties": False,
}
weather = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": city}}]
question = [{"role": "user", "content": "What is the weather in Paris?"}]
result = json.dumps({"city": "Paris", "sky": "sunny", "celsius": 21})


def valid_call(call):
    try:
        jsonschema.validate(json.loads(call.function.arguments), city)
        return call.function.name == "get_weather" and call.id.startswith("call_")
    except (ValueError, jsonschema.ValidationError):
        return False


# One call: a 135M model asked for several repeats its call until max_tokens.
first = client.chat.completions.create(
    model=MODEL, messages=question, tools=weather, tool_choice="required", parallel_tool_calls=False,
    max_tokens=60, temperature=0,
)
called = first.choices[0].message
calls = called.tool_calls or []
check(
    "tool loop, step 1: a required call",
    first.choices[0].finish_reason == "tool_calls" and len(calls) >= 1 and all(map(valid_call, calls)),
    f"{[(c.id, c.function.name, c.function.arguments) for c in calls]}, content {called.content!r}",
)
history = question + [
    {"role": "assistant", "content": called.content, "tool_calls": [c.model_dump() for c in calls]}
] + [{"role": "tool", "tool_call_id": c.id, "content": result} for c in calls]
final = client.chat.completions.create(model=MODEL, messages=history, tools=weather, max_tokens=40, temperature=0)
answer = final.choices[0]
cached = final.usage.prompt_tokens_details.cached_tokens
check(
    "tool loop, step 2: the result answered in text, the first step's prompt cached",
    answer.finish_reason in ("stop", "length")
    and bool(answer.message.content)
    and not answer.message.tool_calls
    and cached >= first.usage.prompt_tokens // BLOCK * BLOCK,
    f"{answer.message.content!r} ({answer.finish_reason}), prompt {final.usage.prompt_tokens}, cached {cached}",
)

# The same loop streamed: the SDK's own stream helper puts the tool call deltas together.
named = {"type": "function", "function": {"name": "get_weather"}}
with client.chat.completions.stream(
    model=MODEL, messages=question, tools=weather, tool_choice=named, parallel_tool_calls=False,
    max_tokens=60, temperature=0,
) as stream:
    kinds = {event.type for event in stream}
    streamed = stream.get_final_completion()
scalls = streamed.choices[0].message.tool_calls or []
check(
    "tool loop streamed, step 1: one named call, put together by the SDK",
    streamed.choices[0].finish_reason == "tool_calls"
    and len(scalls) == 1
    and valid_call(scalls[0])
    and "tool_calls.function.arguments.done" in kinds
    and [c.function.arguments for c in scalls] == [c.function.arguments for c in calls[:1]],
    f"{[(c.function.name, c.function.arguments) for c in scalls]}, events {sorted(kinds)}",
)
history = question + [
    {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in scalls]},
    {"role": "tool", "tool_call_id": scalls[0].id, "content": result},
]
pieces, finish, deltas = [], None, []
for chunk in client.chat.completions.create(
    model=MODEL, messages=history, tools=weather, max_tokens=40, temperature=0, stream=True
):
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        deltas.extend(c.delta.tool_calls or [])
        finish = c.finish_reason or finish
check(
    "tool loop streamed, step 2: the answer, in text",
    bool("".join(pieces)) and finish in ("stop", "length") and not deltas,
    f"{''.join(pieces)!r} ({finish})",
)

print("all checks passed", flush=True)
