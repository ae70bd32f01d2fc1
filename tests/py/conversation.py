"""A multi-turn conversation through the official `openai` client, for tests/up.rs.

Environment: BASE_URL, KEY, MODEL, BLOCK_TOKENS, TURNS, and optionally PAUSE_AFTER (a turn number:
after it, print "PAUSED" and wait for a line on stdin before going on; the test kills a worker
meanwhile), LONG_SYSTEM (a number of sentences of background added to the system prompt, for a
context longer than one worker's KV cache) and KEY_NAME (the prompt_cache_key). Each turn resends the whole conversation under one prompt_cache_key and prints one
line of JSON with its numbers. From turn 2 on, cached_tokens must cover the previous turn's whole
prompt rounded down to whole blocks, except on the first turn after the pause (its worker may be
gone, and with it the cache). Exits non-zero on the first failure.
"""

import json
import os
import sys
import time

import openai

client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["KEY"], max_retries=0, timeout=300)
MODEL = os.environ["MODEL"]
BLOCK = int(os.environ["BLOCK_TOKENS"])
TURNS = int(os.environ["TURNS"])
PAUSE_AFTER = int(os.environ.get("PAUSE_AFTER", "0"))
questions = [
    "Tell me about the tides.",
    "Why are there two a day?",
    "What does the moon have to do with it?",
    "And the sun?",
    "What is a spring tide?",
    "And a neap tide?",
    "Where are the biggest tides?",
    "How high do they get?",
    "Can we make power from them?",
    "Thanks. Summarise our talk in one line.",
]
background = " ".join(f"Note {i}: the tide at harbour {i} turns {i % 7} minutes after the last." for i in range(int(os.environ.get("LONG_SYSTEM", "0"))))
history = [{"role": "system", "content": ("You are a patient teacher who answers in two sentences. " + background).strip()}]
CACHE_KEY = os.environ.get("KEY_NAME", "up-e2e-conversation")
previous_prompt = 0
after_pause = False
for turn in range(1, TURNS + 1):
    history.append({"role": "user", "content": questions[(turn - 1) % len(questions)]})
    started = time.perf_counter()
    r = client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=24, temperature=0,
        extra_body={"prompt_cache_key": CACHE_KEY},
    )
    elapsed = time.perf_counter() - started
    answer = r.choices[0].message.content
    prompt, cached = r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens
    need = previous_prompt // BLOCK * BLOCK
    print(json.dumps({"turn": turn, "prompt_tokens": prompt, "cached_tokens": cached, "required": need,
                      "completion_tokens": r.usage.completion_tokens, "seconds": round(elapsed, 3),
                      "answer": answer}), flush=True)
    if not answer:
        sys.exit(f"turn {turn}: empty answer")
    if turn > 1 and not after_pause and cached < need:
        sys.exit(f"turn {turn}: cached {cached} < {need} (previous prompt {previous_prompt})")
    after_pause = False
    history.append({"role": "assistant", "content": answer})
    previous_prompt = prompt
    if turn == PAUSE_AFTER:
        print("PAUSED", flush=True)
        sys.stdin.readline()
        after_pause = True
print("conversation done", flush=True)
