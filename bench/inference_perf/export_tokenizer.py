#!/usr/bin/env python3
"""Export a Tidelock worker's tokenizer as a Hugging Face tokenizer folder.

inference-perf counts tokens with `transformers.AutoTokenizer.from_pretrained`, which
offline needs a local folder. Every Tidelock worker serves `GET /v1/tokenizer`: a
PromptKitJson document (crates/prompt/src/kit.rs) holding the `tokenizers` JSON plus
the chat template, BOS/EOS and stop ids. This script writes:

  OUT/tokenizer.json         the `tokenizer` member, as is
  OUT/tokenizer_config.json  tokenizer class, bos/eos tokens, chat template

Standard library only, so it runs with any python3.

Usage:
  export_tokenizer.py --worker http://127.0.0.1:PORT OUT
  export_tokenizer.py --cache /tmp/upc OUT      # first worker in CACHE/up/parts.json
  export_tokenizer.py --kit-file kit.json OUT   # a saved /v1/tokenizer answer
"""

import argparse
import json
import os
import sys
import urllib.request


def worker_from_cache(cache: str) -> str:
    parts_path = os.path.join(cache, "up", "parts.json")
    with open(parts_path, encoding="utf-8") as f:
        parts = json.load(f)
    for part in parts:
        if part.get("name", "").startswith("worker"):
            return part["url"]
    sys.exit(f"no worker in {parts_path}")


def fetch_kit(worker: str, api_key: str | None) -> dict:
    url = worker.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    req = urllib.request.Request(url + "/v1/tokenizer")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--worker", help="a worker's base URL (not the router's)")
    src.add_argument("--cache", help="a `tidelock up` cache dir: use the first worker of CACHE/up/parts.json")
    src.add_argument("--kit-file", help="a saved GET /v1/tokenizer answer")
    ap.add_argument("--api-key", default=None, help="sent as a Bearer token: the cluster credential (with --cache: CACHE/up/cluster-token)")
    ap.add_argument("--model-max-length", type=int, default=8192)
    ap.add_argument("out", help="folder to write")
    args = ap.parse_args()

    if args.kit_file:
        with open(args.kit_file, encoding="utf-8") as f:
            kit = json.load(f)
    else:
        worker = args.worker or worker_from_cache(args.cache)
        api_key = args.api_key
        if api_key is None and args.cache:
            # Workers require the cluster credential `tidelock up` wrote beside parts.json.
            with open(os.path.join(args.cache, "up", "cluster-token"), encoding="utf-8") as f:
                api_key = f.read().strip()
        kit = fetch_kit(worker, api_key)

    if "tokenizer" not in kit:
        sys.exit("answer has no 'tokenizer' member: is this a worker's /v1/tokenizer?")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(kit["tokenizer"], f, ensure_ascii=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": args.model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    for key in ("bos_token", "eos_token"):
        if kit.get(key):
            config[key] = kit[key]
    if kit.get("eos_token"):
        # inference-perf never pads, but some transformers paths want a pad token.
        config["pad_token"] = kit["eos_token"]
    if kit.get("chat_template"):
        config["chat_template"] = kit["chat_template"]
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)

    print(os.path.abspath(args.out))


if __name__ == "__main__":
    main()
