"""End-to-end checks of the router through the official `openai` Python client.

Run by tests/router_openai.rs against a router and real workers it started on loopback. Reads
BASE_URL, KEY, LIMITED_KEY, MODEL and BLOCK_TOKENS from the environment; prints one line per
check with its numbers; exits non-zero on the first failure.
"""

import json
import os

import openai

from common import BASE_URL, BLOCK, MODEL, check, client


ids = [m.id for m in client.models.list().data]
check("models.list", MODEL in ids, ids)
check("models.retrieve", client.models.retrieve(MODEL).id == MODEL, MODEL)

chat = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Name a colour."}],
    max_tokens=8,
    temperature=0,
)
u = chat.usage
check(
    "chat",
    bool(chat.choices[0].message.content)
    and u.completion_tokens > 0
    and isinstance(u.prompt_tokens_details.cached_tokens, int),
    f"{chat.choices[0].message.content!r}, prompt {u.prompt_tokens}, "
    f"cached {u.prompt_tokens_details.cached_tokens}, completion {u.completion_tokens}",
)

stream = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Count to five."}],
    max_tokens=12,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
    if chunk.usage:
        usage = chunk.usage
check(
    "streaming chat with usage",
    bool("".join(pieces)) and usage is not None and usage.completion_tokens > 0,
    f"{len(pieces)} chunks, {''.join(pieces)!r}, usage {usage}",
)

completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6)
check(
    "completions",
    bool(completion.choices[0].text) and completion.usage.prompt_tokens > 0,
    f"{completion.choices[0].text!r}, prompt {completion.usage.prompt_tokens}, "
    f"completion {completion.usage.completion_tokens}",
)

try:
    openai.OpenAI(base_url=BASE_URL, api_key="sk-wrong", max_retries=0).models.list()
    check("401 for a wrong key", False, "no error")
except openai.AuthenticationError as e:
    check("401 for a wrong key", e.status_code == 401, e.body)

hi = [{"role": "user", "content": "Hi"}]

# Tool calling is checked by tool_loop.py (run against the router and a worker). What cannot be
# served is refused by name.
weather = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
for what, extra, param in [
    ("a named function not offered", {"tools": weather, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("a tool of another type", {"tools": [{"type": "web_search"}]}, "tools"),
]:
    try:
        client.chat.completions.create(model=MODEL, messages=hi, max_tokens=2, **extra)
        check(f"400 for {what}", False, "answered")
    except openai.BadRequestError as e:
        error = e.body if isinstance(e.body, dict) else {}
        check(f"400 for {what}", e.status_code == 400 and error.get("param") == param, e.body)

# Sampling, complete: n answers as indexed choices (streamed too), a seed's answer repeats, a
# logit bias of 100 forces its token, penalties are taken.
several = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=4, n=2, seed=3)
check(
    "n=2 gives two choices",
    [c.index for c in several.choices] == [0, 1] and 2 <= several.usage.completion_tokens <= 8,
    f"indices {[c.index for c in several.choices]}, usage {several.usage}",
)
seen = {}
for chunk in client.chat.completions.create(model=MODEL, messages=hi, max_tokens=4, n=2, seed=3, stream=True):
    for c in chunk.choices:
        seen.setdefault(c.index, []).append(c.delta.content or "")
check(
    "n=2 streamed, the same seed",
    ["".join(seen.get(i, [])) for i in (0, 1)] == [c.message.content for c in several.choices],
    f"{seen} vs {[c.message.content for c in several.choices]}",
)
forced = client.chat.completions.create(
    model=MODEL, messages=hi, max_tokens=3, logit_bias={"42": 100}, logprobs=True, temperature=1.0
)
tokens = [t.token for t in forced.choices[0].logprobs.content]
check("logit_bias 100 forces its token", len(tokens) == 3 and len(set(tokens)) == 1, f"{tokens}")
penalised = client.chat.completions.create(
    model=MODEL, messages=hi, max_tokens=4, presence_penalty=1.5, frequency_penalty=1.0
)
check("penalties are taken", penalised.usage.completion_tokens > 0, f"{penalised.usage}")

# Structured outputs: a strict JSON schema and JSON mode, constrained while sampling; what comes
# back parses and validates (streamed too). A schema the grammar engine cannot compile is a 400
# naming response_format.
import jsonschema

person = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
strict = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": person}}
ask = [{"role": "user", "content": "Describe a person as JSON."}]
shaped = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=120, response_format=strict, seed=1)
text = shaped.choices[0].message.content
try:
    jsonschema.validate(json.loads(text), person)
    check("json_schema answer validates", shaped.choices[0].finish_reason == "stop", text)
except (ValueError, jsonschema.ValidationError) as e:
    check("json_schema answer validates", False, f"{text!r}: {e}")
pieces = []
for chunk in client.chat.completions.create(
    model=MODEL, messages=ask, max_tokens=120, response_format=strict, seed=1, stream=True
):
    pieces += [c.delta.content or "" for c in chunk.choices]
check("json_schema streamed, the same answer", "".join(pieces) == text, "".join(pieces))
mode = client.chat.completions.create(
    model=MODEL, messages=ask, max_tokens=120, response_format={"type": "json_object"}, seed=2
)
cached = mode.usage.prompt_tokens_details.cached_tokens
check(
    "a constrained request's prompt is served from cache",
    cached >= mode.usage.prompt_tokens // BLOCK * BLOCK - BLOCK and cached > 0,
    f"prompt {mode.usage.prompt_tokens}, cached {cached}",
)
try:
    check("json_object answer is an object", isinstance(json.loads(mode.choices[0].message.content), dict), mode.choices[0].message.content)
except ValueError as e:
    check("json_object answer is an object", False, f"{mode.choices[0].message.content!r}: {e}")
try:
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}
    client.chat.completions.create(model=MODEL, messages=ask, max_tokens=4, response_format=broken)
    check("400 for a schema that does not compile", False, "answered")
except openai.BadRequestError as e:
    error = e.body if isinstance(e.body, dict) else {}
    check("400 for a schema that does not compile", error.get("param") == "response_format", e.body)

limited = openai.OpenAI(base_url=BASE_URL, api_key=os.environ["LIMITED_KEY"], max_retries=0)
limited.completions.create(model=MODEL, prompt="One", max_tokens=1)
try:
    limited.completions.create(model=MODEL, prompt="Two", max_tokens=1)
    check("429 over requests/min", False, "no error")
except openai.RateLimitError as e:
    retry = e.response.headers.get("retry-after")
    check("429 over requests/min", e.status_code == 429 and retry is not None, f"Retry-After {retry}, {e.body}")

# Two turns of one session: the second's cached tokens cover the first prompt (whole blocks).
system = " ".join(f"Fact {i}: the tide rises twice a day at harbour {i}." for i in range(20))
history = [
    {"role": "system", "content": system},
    {"role": "user", "content": "Which harbour is the first one?"},
]
session = {"prompt_cache_key": "e2e-session"}
turn1 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0, extra_body=session)
p1 = turn1.usage.prompt_tokens
history += [
    {"role": "assistant", "content": turn1.choices[0].message.content},
    {"role": "user", "content": "And the last one?"},
]
turn2 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0, extra_body=session)
c2 = turn2.usage.prompt_tokens_details.cached_tokens
check(
    "second turn served from cache",
    c2 >= p1 // BLOCK * BLOCK and c2 > 0,
    f"turn 1 prompt {p1} tokens; turn 2 prompt {turn2.usage.prompt_tokens}, cached {c2} "
    f"(>= {p1 // BLOCK * BLOCK} required)",
)
print("all checks passed")
