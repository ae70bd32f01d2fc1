"""One chat completion through the official `openai` client, for tests/kube.rs.

Usage: kube_chat.py BASE_URL API_KEY MODEL PROMPT. Prints one JSON line: {"status": 200,
"content": ..., "prompt_tokens": ..., "cached_tokens": ...} on success, {"status": <HTTP
status>, "message": ...} when the API answers with an error. Exits 0 in both cases (the test
asserts on the line), non-zero only when the client cannot run at all.
"""

import json
import sys

import openai

base_url, api_key, model, prompt = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
try:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=16,
        temperature=0,
    )
except openai.APIStatusError as e:
    print(json.dumps({"status": e.status_code, "message": str(e)}))
    sys.exit(0)
usage = reply.usage
print(
    json.dumps(
        {
            "status": 200,
            "content": reply.choices[0].message.content,
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens,
        }
    )
)
