#!/usr/bin/env bash
# Run inference-perf against an OpenAI-compatible endpoint (a Tidelock router).
#
#   bench/inference_perf/run.sh URL API_KEY MODEL TOKENIZER_DIR [OUT_DIR]
#
#   URL            router base URL, with or without /v1 (http://127.0.0.1:8000/v1)
#   API_KEY        sent as "Authorization: Bearer <key>"
#   MODEL          served model name (GET /v1/models)
#   TOKENIZER_DIR  local HF tokenizer folder (tokenizer.json + tokenizer_config.json);
#                  export_tokenizer.py makes one from a worker's GET /v1/tokenizer
#   OUT_DIR        where the reports go (default: ./inference-perf-reports/<timestamp>)
#
# Env: IP_CONFIG (default: config.yml beside this script), TIDELOCK_IP_HOME
# (venv location, default ~/.cache/tidelock/inference-perf), IP_EXTRA_ARGS (more
# inference-perf CLI overrides, e.g. "--load.type poisson").
# Installs inference-perf first (install.sh) if its venv is missing.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
URL="${1%/}"; URL="${URL%/v1}"
KEY="$2"; MODEL="$3"
TOK="$(cd "$4" && pwd)"
OUT="${5:-$PWD/inference-perf-reports/$(date +%Y%m%d-%H%M%S)}"
CONFIG="${IP_CONFIG:-$HERE/config.yml}"
IP_HOME="${TIDELOCK_IP_HOME:-$HOME/.cache/tidelock/inference-perf}"
VENV="$IP_HOME/venv"

[[ -f "$TOK/tokenizer.json" ]] || { echo "no tokenizer.json in $TOK" >&2; exit 2; }
[[ -x "$VENV/bin/inference-perf" ]] || TIDELOCK_IP_HOME="$IP_HOME" bash "$HERE/install.sh"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# A resolved copy of the config with the real URL, key, model and tokenizer (0600:
# it holds the key). inference-perf logs the whole config, key included, on start.
RESOLVED="$OUT/config.resolved.yml"
( umask 077
  IP_URL="$URL" IP_KEY="$KEY" IP_MODEL="$MODEL" IP_TOK="$TOK" IP_OUT="$OUT" \
  "$VENV/bin/python" - "$CONFIG" "$RESOLVED" <<'PY'
import os, sys, yaml
src, dst = sys.argv[1], sys.argv[2]
with open(src) as f:
    cfg = yaml.safe_load(f) or {}
server = cfg.setdefault("server", {})
server["base_url"] = os.environ["IP_URL"]
server["api_key"] = os.environ["IP_KEY"]
server["model_name"] = os.environ["IP_MODEL"]
cfg.setdefault("tokenizer", {})["pretrained_model_name_or_path"] = os.environ["IP_TOK"]
cfg.setdefault("storage", {}).setdefault("local_storage", {})["path"] = os.environ["IP_OUT"]
with open(dst, "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
PY
)

# Fail fast, before inference-perf spends a minute on setup, if URL/key/model are wrong.
code="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" "$URL/v1/models" || true)"
if [[ "$code" != 200 ]]; then
  echo "GET $URL/v1/models with the key answered HTTP $code: check URL and key" >&2
  exit 1
fi

echo "inference-perf: $URL model=$MODEL tokenizer=$TOK"
echo "reports -> $OUT (log: $OUT/inference-perf.log)"
# Offline: the tokenizer is a local folder, nothing may be fetched from a hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
# shellcheck disable=SC2086
"$VENV/bin/inference-perf" -c "$RESOLVED" ${IP_EXTRA_ARGS:-} 2>&1 | tee "$OUT/inference-perf.log" \
  | grep --line-buffered -v -e "api_key"
rc="${PIPESTATUS[0]}"
set -e
# The tool logs the config and saves it as config.yaml, key included: blank it out.
KEY_RE="$(printf '%s' "$KEY" | sed 's/[][\/.*^$]/\\&/g')"
for f in "$OUT/inference-perf.log" "$OUT/config.yaml"; do
  if [[ -f "$f" ]]; then sed -i "s/$KEY_RE/<redacted>/g" "$f"; fi
done

echo
echo "exit code: $rc"
echo "report folder: $OUT"
ls -1 "$OUT"
"$VENV/bin/python" "$HERE/summarize.py" "$OUT" || true
exit "$rc"
