"""What the end-to-end scripts share: the server they talk to (BASE_URL, KEY, MODEL and
BLOCK_TOKENS from the environment), an `openai` client for it, and `check`, which prints one line
per check with its numbers and exits non-zero on the first failure."""

import os
import sys

import openai

BASE_URL = os.environ["BASE_URL"]
MODEL = os.environ["MODEL"]
BLOCK = int(os.environ["BLOCK_TOKENS"])
client = openai.OpenAI(base_url=BASE_URL, api_key=os.environ["KEY"], max_retries=0, timeout=120)


def check(what, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}", flush=True)
    if not ok:
        sys.exit(1)
