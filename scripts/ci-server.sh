#!/usr/bin/env bash
# Live-server CI for `ds4 serve` (issue 4): build the server in release mode, install the
# official SDKs (pinned), then drive the server on loopback with
#   scripts/server_sdk_test.py   openai + anthropic SDKs: chat, streaming, tool-call round trips,
#                                reasoning, usage, Responses streaming, count_tokens, errors,
#                                prefix reuse, disk KV cache across restarts, flipped byte
#   scripts/server_load_test.py  64 concurrent streaming clients for 60 s: no crash, every
#                                request answered or refused with 503 + Retry-After, RSS flat
# Exits non-zero if the build or either script fails. The two scripts take about 1.6 minutes
# (SDK test ~25 s, load test ~65 s); the release build dominates the rest: a few minutes when
# only the workspace crates changed, ~8.5 CPU-minutes from a cold cache.
#
# The server command is `target/release/ds4 serve` when the ds4 binary has a `serve`
# subcommand, else the `tiny_serve` example of ds4-server (same flags). Override with
# DS4_SERVER_CMD="…". Both use the built-in tiny model (random weights, real tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TARGET=${CARGO_TARGET_DIR:-target}
OPENAI_VERSION=3.57.0
ANTHROPIC_VERSION=2.14.0
t0=$(date +%s)

echo "== server: build (release)"
if [[ -n "${DS4_SERVER_CMD:-}" ]]; then
    SERVER="$DS4_SERVER_CMD"
elif grep -qE '^\s*Serve\(' crates/ds4/src/main.rs 2>/dev/null; then
    cargo build --release -p ds4
    SERVER="$TARGET/release/ds4 serve"
else
    cargo build --release -p ds4-server --example tiny_serve
    SERVER="$TARGET/release/examples/tiny_serve"
fi
# The command must know the server flags (fails fast on a binary without them).
help=$($SERVER --help)
grep -q -- '--kv-disk-dir' <<<"$help" || { echo "ci-server: '$SERVER --help' lacks --kv-disk-dir"; exit 1; }
echo "server command: $SERVER"

echo "== server: python SDKs (openai==$OPENAI_VERSION, anthropic==$ANTHROPIC_VERSION)"
"$PY" -m pip install --quiet --disable-pip-version-check \
    "openai==$OPENAI_VERSION" "anthropic==$ANTHROPIC_VERSION"

echo "== server: SDK test"
t1=$(date +%s)
"$PY" scripts/server_sdk_test.py --server "$SERVER"
echo "SDK test: $(( $(date +%s) - t1 ))s"

echo "== server: load test"
t1=$(date +%s)
"$PY" scripts/server_load_test.py --server "$SERVER" --clients 64 --seconds 60
echo "load test: $(( $(date +%s) - t1 ))s"

echo "== server: all passed in $(( $(date +%s) - t0 ))s"
