#!/usr/bin/env python3
"""Load test: N concurrent streaming clients against a live ds4 server on loopback.

Each client runs short multi-turn conversations (the transcript grows by the answer and a new
user turn, then starts over) over a mix of protocols — OpenAI chat streaming, Anthropic
messages streaming, OpenAI Responses streaming and non-streamed chat — and hangs up early on
about one stream in ten (cancellation path). The server runs with a small queue (503 +
Retry-After when full) and a small disk KV budget (checkpoint stores and evictions under load).

Pass criteria: the server never dies; every request is answered (a complete stream or body) or
refused with 503 carrying Retry-After; nothing else; RSS flat (growth between the end of the
warm-up and the end of the run below a bound). Prints the numbers.

Usage: server_load_test.py --server "target/debug/examples/tiny_serve" [--clients 64] [--seconds 60]
"""

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Stats:
    def __init__(self):
        self.ok = 0
        self.refused = 0
        self.cancelled = 0
        self.errors = []
        self.latencies = []
        self.by_kind = {}


PROMPTS = ["Tell me about the sea.", "List three colors.", "What is Rust?", "Say something kind.",
           "Explain caching in one line.", "Count to five."]


def request_for(kind, turns):
    if kind == "chat":
        return "/v1/chat/completions", {"model": "deepseek-v4-flash", "stream": True, "max_tokens": 12,
                                        "stream_options": {"include_usage": True}, "messages": turns}
    if kind == "chat-json":
        return "/v1/chat/completions", {"model": "deepseek-chat", "max_tokens": 12, "messages": turns}
    if kind == "messages":
        return "/v1/messages", {"model": "claude", "stream": True, "max_tokens": 12, "messages": turns}
    return "/v1/responses", {"model": "codex", "stream": True, "max_output_tokens": 12,
                             "input": [{"role": t["role"], "content": t["content"]} for t in turns]}


TERMINAL = {"chat": "[DONE]", "messages": "message_stop", "responses": '"response.'}


async def one_request(client, base, kind, turns, hang_up, st):
    path, body = request_for(kind, turns)
    t0 = time.time()
    try:
        if kind == "chat-json":
            r = await client.post(base + path, json=body)
            if r.status_code == 503:
                return ("refused", r.headers.get("retry-after"))
            if r.status_code != 200:
                return ("error", f"{kind} {r.status_code} {r.text[:200]}")
            text = r.json()["choices"][0]["message"]["content"]
            st.latencies.append(time.time() - t0)
            return ("ok", text)
        async with client.stream("POST", base + path, json=body) as r:
            if r.status_code == 503:
                await r.aread()
                return ("refused", r.headers.get("retry-after"))
            if r.status_code != 200:
                return ("error", f"{kind} {r.status_code} {(await r.aread())[:200]!r}")
            buf = ""
            n_data = 0
            async for chunk in r.aiter_text():
                buf += chunk
                n_data = buf.count("data:")
                if hang_up and n_data >= 2:
                    return ("cancelled", None)
            if "event: error" in buf:
                return ("error", f"{kind} stream error: {buf[-300:]}")
            done = {"chat": "data: [DONE]", "messages": "event: message_stop",
                    "responses": "event: response.completed"}[kind]
            if done not in buf and not (kind == "responses" and "event: response.incomplete" in buf):
                return ("error", f"{kind} stream ended without its terminal event: {buf[-300:]}")
            st.latencies.append(time.time() - t0)
            return ("ok", "")
    except (httpx.HTTPError, OSError) as e:
        return ("error", f"{kind} {type(e).__name__}: {e}")


async def client_loop(i, base, deadline, st, rng):
    kinds = ["chat", "messages", "responses", "chat-json"]
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        turns = []
        while time.time() < deadline:
            if not turns or len(turns) > 6:
                turns = [{"role": "user", "content": rng.choice(PROMPTS)}]
            kind = kinds[(i + len(st.latencies)) % len(kinds)]
            hang_up = kind != "chat-json" and rng.random() < 0.1
            res, extra = await one_request(client, base, kind, turns, hang_up, st)
            st.by_kind[kind] = st.by_kind.get(kind, 0) + 1
            if res == "ok":
                st.ok += 1
                turns = turns + [{"role": "assistant", "content": extra or "ok"},
                                 {"role": "user", "content": rng.choice(PROMPTS)}]
            elif res == "refused":
                st.refused += 1
                if extra is None:
                    st.errors.append("503 without Retry-After")
                await asyncio.sleep(float(extra or 1) * rng.uniform(0.5, 1.5))
            elif res == "cancelled":
                st.cancelled += 1
            else:
                st.errors.append(extra)
                await asyncio.sleep(0.5)


async def sample_rss(pid, deadline, samples):
    t0 = time.time()
    while time.time() < deadline + 1:
        r = rss_kib(pid)
        if r is not None:
            samples.append((time.time() - t0, r))
        await asyncio.sleep(1.0)


async def run(base, pid, clients, seconds):
    st = Stats()
    deadline = time.time() + seconds
    samples = []
    rng = random.Random(1234)
    tasks = [asyncio.create_task(client_loop(i, base, deadline, st, random.Random(rng.random())))
             for i in range(clients)]
    sampler = asyncio.create_task(sample_rss(pid, deadline, samples))
    await asyncio.gather(*tasks)
    await sampler
    return st, samples


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=10, help="seconds before the RSS baseline")
    ap.add_argument("--rss-growth-mib", type=float, default=32)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ds4-load-")
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "w")
    args = ["--port", "0", "--ctx", "4096", "--queue-max", "16", "--seed", "7",
            "--kv-disk-dir", os.path.join(tmp, "kv"), "--kv-disk-space-mb", "8", "--kv-cache-min-tokens", "16",
            "--kv-cache-continued-interval-tokens", "64", "--kv-cache-boundary-align-tokens", "32"]
    proc = subprocess.Popen(shlex.split(a.server) + args, stdout=log, stderr=subprocess.STDOUT)
    url = None
    t0 = time.time()
    while time.time() - t0 < 120 and url is None:
        if proc.poll() is not None:
            sys.exit(f"server exited early:\n{open(log_path).read()}")
        m = re.search(r"listening on (http://[0-9.:]+)", open(log_path).read())
        url = m.group(1) if m else None
        time.sleep(0.1)
    if url is None:
        sys.exit("server did not start")
    rss0 = rss_kib(proc.pid)
    st, samples = asyncio.run(run(url, proc.pid, a.clients, a.seconds))
    alive = proc.poll() is None
    health = httpx.get(url + "/health").status_code if alive else None
    metrics = httpx.get(url + "/metrics").text if alive else ""
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed"
    log.close()

    def m(series):
        for line in metrics.splitlines():
            k, _, v = line.rpartition(" ")
            if k == series:
                return float(v)
        return float("nan")

    base = [r for t, r in samples if t >= a.warmup]
    rss_base = base[0] if base else None
    rss_end = samples[-1][1] if samples else None
    rss_max = max(r for _, r in samples) if samples else None
    growth_mib = (rss_end - rss_base) / 1024 if base else float("nan")
    lat = sorted(st.latencies)
    total = st.ok + st.refused + st.cancelled + len(st.errors)
    print(f"clients {a.clients}, {a.seconds:.0f}s: {total} requests: {st.ok} answered, "
          f"{st.refused} refused (503), {st.cancelled} hung up by the client, {len(st.errors)} errors")
    print(f"  by kind: {json.dumps(st.by_kind)}")
    if lat:
        print(f"  latency (answered): p50 {statistics.median(lat):.2f}s, p95 {lat[int(0.95 * (len(lat) - 1))]:.2f}s, max {lat[-1]:.2f}s")
    jobs = {k: m('ds4_jobs_total{outcome="%s"}' % k) for k in ("completed", "cancelled", "failed")}
    stores = {k: m('ds4_kv_disk_stores_total{reason="%s"}' % k) for k in ("evict", "continued")}
    print(f"  server: alive={alive} health={health} exit={rc}; jobs completed={jobs['completed']:.0f} "
          f"cancelled={jobs['cancelled']:.0f} failed={jobs['failed']:.0f}; "
          f"tokens prefilled={m('ds4_prefilled_tokens_total'):.0f} cached={m('ds4_cached_prompt_tokens_total'):.0f} "
          f"generated={m('ds4_completion_tokens_total'):.0f}; kv stores evict={stores['evict']:.0f} "
          f"continued={stores['continued']:.0f}; open streams at end={m('ds4_sse_streams_open'):.0f}")
    print(f"  RSS: start {rss0 / 1024:.1f} MiB, after {a.warmup:.0f}s warm-up {rss_base / 1024:.1f} MiB, "
          f"end {rss_end / 1024:.1f} MiB, max {rss_max / 1024:.1f} MiB, growth after warm-up {growth_mib:+.1f} MiB")
    ok = True
    for e in st.errors[:10]:
        print("  error:", e)
    if st.errors:
        ok = False
    if not alive or health != 200:
        print("  FAIL: the server died or is unhealthy")
        ok = False
    if not (growth_mib < a.rss_growth_mib):
        print(f"  FAIL: RSS grew by {growth_mib:.1f} MiB (bound {a.rss_growth_mib} MiB)")
        ok = False
    if st.ok == 0:
        ok = False
    if rc != 0:
        print(f"  FAIL: exit status {rc} after SIGTERM")
        ok = False
    print("PASS" if ok else f"FAIL (server log: {log_path})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
