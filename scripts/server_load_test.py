#!/usr/bin/env python3
"""Load test: N concurrent streaming clients against a live ds4 server on loopback.

Each client runs short multi-turn conversations (the transcript grows by a turn per answer,
then starts over) over a mix of protocols: OpenAI chat streaming (with
stream_options.include_usage), Anthropic messages streaming, OpenAI Responses streaming, and a
non-streamed chat request now and then. About one stream in ten is hung up by the client after
its first events (the cancellation path). The server runs with a small queue (--queue-max, far
below the number of clients, so some requests must be refused with 503 + Retry-After) and a
small disk KV budget (evict / continued checkpoint stores and LRU eviction under load).

The HTTP client is the Python standard library (asyncio streams, HTTP/1.1, chunked decoding),
so nothing but Python 3.8+ is needed.

Pass criteria (every one is checked, exit status 1 otherwise):
  * the server stays alive, /health answers 200 after the run, and it exits 0 on SIGTERM;
  * every request is answered -- a 200 carrying its protocol's terminal event (`[DONE]`,
    `message_stop`, `response.completed|incomplete`) and no SSE error event, or a JSON body --
    or refused with 503 carrying Retry-After; nothing else (no other status, no reset, no
    truncated stream);
  * some requests were refused (the queue really was full) and many were answered;
  * the server's own counters agree with the clients': requests received = requests sent,
    503s = refusals seen, and after the run no stream is open and the queue is empty;
  * the disk KV cache stays within its budget (--kv-disk-space-mb 4, ~1 MiB checkpoints:
    LRU eviction runs all the time);
  * memory is flat. VmRSS of the server (/proc/PID/status, sampled every second) is split
    into its anonymous part (RssAnon: heap, thread stacks, the live session's buffers; where a
    leak shows) and its file-backed part (RssFile: pages of the mmapped model and binary).
    Between the end of the warm-up (15 s) and the end of the run, RssAnon may grow by at most
    --anon-growth-mib (8 MiB); RssFile may only grow within the files the process maps; and
    VmRSS by no more than those two parts. (The least-squares slope is printed too.)

Why those bounds. With the tiny model at ctx 4096, steady state is reached within seconds:
the model is mapped, the live session is allocated at startup, and what a request allocates
(body, rendered prompt, tokens, SSE channel, connection buffers: tens of KiB) is freed when it
ends. What may still grow after the warm-up is bounded: the tokenizer's per-thread BPE caches
(capped at 10k words per thread; the server tokenizes on at most `available_parallelism`
threads), and the allocator's retained free memory: glibc raises its mmap threshold after
the first large free (the disk-cache snapshot buffers of a few MiB), so later buffers of that
size come from the heap and its high-water mark stays resident -- a one-time step. Measured
on 2 cores: RssAnon +0..2 MiB after the warm-up (a step, then flat). 8 MiB leaves room for
that, while a leak of 1.5 KiB per request (over 5k requests a minute, most of them cheap
503s) or of 35 KiB per answered request (about 250 a minute; a leaked prompt, transcript or
snapshot is far larger) exceeds it within one run.
RssFile grows by design: each random token or expert touches model pages for the first time
(the tiny model is 113 MiB); those pages are shared with the page cache and reclaimable, so
they are bounded by the mapped size rather than by a growth figure.

Usage: server_load_test.py --server "target/release/ds4 serve" [--clients 64] [--seconds 60]
       (the command gets `--port 0 ...` appended; it must print `listening on http://ADDR`).
"""

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def mem_kib(pid):
    """VmRSS, RssAnon and RssFile of a process in KiB (None once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0])
    except OSError:
        return None
    return out if len(out) == 3 else None


def mapped_file_kib(pid):
    """Total size of the regular files the process maps (model weights, binary, libraries)."""
    paths = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    paths.add(parts[5].strip())
    except OSError:
        return 0
    total = 0
    for p in paths:
        try:
            total += os.stat(p).st_size
        except OSError:
            pass
    return total // 1024


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def scrape(text, series):
    for line in text.splitlines():
        if not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            if k == series:
                return float(v)
    return float("nan")


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


class Response:
    """A parsed HTTP/1.1 response head; the body is read with `chunks()`."""

    def __init__(self, reader, status, headers):
        self.reader = reader
        self.status = status
        self.headers = headers

    async def chunks(self):
        """Body pieces as they arrive (chunked or Content-Length or until EOF)."""
        r = self.reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await r.readline()
                if not line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await r.readline()
                    return
                data = await r.readexactly(size)
                await r.readexactly(2)
                yield data
        elif "content-length" in self.headers:
            n = int(self.headers["content-length"])
            if n:
                yield await r.readexactly(n)
        else:
            while True:
                data = await r.read(65536)
                if not data:
                    return
                yield data

    async def body(self):
        out = b""
        async for c in self.chunks():
            out += c
        return out


async def post(host, port, path, body):
    """Open a connection, POST JSON, return (writer, Response) once the head has arrived."""
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream, application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    writer.write(head + data)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        writer.close()
        raise ConnectionError("connection closed before the status line")
    parts = status_line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return writer, Response(reader, status, headers)


TERMINAL = {"chat": ["data: [DONE]"], "messages": ["event: message_stop"],
            "responses": ['"type":"response.completed"', '"type":"response.incomplete"']}


async def one_request(host, port, kind, turns, hang_up, st):
    path, body = request_for(kind, turns)
    t0 = time.time()
    writer = None
    try:
        writer, r = await post(host, port, path, body)
        if r.status == 503:
            await r.body()
            return ("refused", r.headers.get("retry-after"))
        if r.status != 200:
            return ("error", f"{kind} {r.status} {(await r.body())[:200]!r}")
        if kind == "chat-json":
            b = json.loads(await r.body())
            if b.get("object") != "chat.completion" or not b.get("choices"):
                return ("error", f"{kind} unexpected body {str(b)[:200]}")
            st.latencies.append(time.time() - t0)
            return ("ok", b["choices"][0]["message"].get("content") or "ok")
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            return ("error", f"{kind} content-type {r.headers.get('content-type')}")
        buf = ""
        async for chunk in r.chunks():
            buf += chunk.decode("utf-8", "replace")
            if hang_up and buf.count("data:") >= 2:
                return ("cancelled", None)
        if "event: error" in buf:
            return ("error", f"{kind} stream error event: {buf[-300:]}")
        if not any(t in buf for t in TERMINAL[kind]):
            return ("error", f"{kind} stream ended without its terminal event: {buf[-300:]!r}")
        if kind == "chat" and '"usage":' not in buf:
            return ("error", "chat stream without the include_usage chunk")
        st.latencies.append(time.time() - t0)
        return ("ok", "")
    except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
        return ("error", f"{kind} {type(e).__name__}: {e}")
    finally:
        if writer is not None:
            writer.close()


async def client_loop(i, host, port, deadline, st, rng):
    kinds = ["chat", "messages", "responses", "chat", "messages", "responses", "chat-json"]
    turns = []
    n = i
    while time.time() < deadline:
        if not turns or len(turns) > 6:
            turns = [{"role": "user", "content": rng.choice(PROMPTS)}]
        kind = kinds[n % len(kinds)]
        n += 1
        hang_up = kind != "chat-json" and rng.random() < 0.1
        res, extra = await one_request(host, port, kind, turns, hang_up, st)
        st.by_kind[kind] = st.by_kind.get(kind, 0) + 1
        if res == "ok":
            st.ok += 1
            turns = turns + [{"role": "assistant", "content": extra or "ok"},
                             {"role": "user", "content": rng.choice(PROMPTS)}]
        elif res == "refused":
            st.refused += 1
            if extra is None:
                st.errors.append("503 without Retry-After")
            # Honour Retry-After, jittered so the clients do not come back in lockstep.
            await asyncio.sleep(float(extra or 1) * rng.uniform(0.2, 1.0))
        elif res == "cancelled":
            st.cancelled += 1
        else:
            st.errors.append(extra)
            await asyncio.sleep(0.5)


async def sample_rss(pid, t_start, deadline, samples):
    while time.time() < deadline:
        r = mem_kib(pid)
        if r is not None:
            samples.append((time.time() - t_start, r))
        await asyncio.sleep(1.0)
    r = mem_kib(pid)
    if r is not None:
        samples.append((time.time() - t_start, r))


async def run(host, port, pid, clients, seconds):
    st = Stats()
    t_start = time.time()
    deadline = t_start + seconds
    samples = []
    rng = random.Random(1234)
    tasks = [asyncio.create_task(client_loop(i, host, port, deadline, st, random.Random(rng.random())))
             for i in range(clients)]
    sampler = asyncio.create_task(sample_rss(pid, t_start, deadline, samples))
    await asyncio.gather(*tasks)
    await sampler
    return st, samples


def slope(points):
    """Least-squares slope of (t, y)."""
    if len(points) < 2:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True, help="server command, e.g. 'target/release/ds4 serve'")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--queue-max", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=15, help="seconds before the RSS baseline")
    ap.add_argument("--anon-growth-mib", type=float, default=8,
                    help="bound on the growth of anonymous RSS (heap, stacks) after the warm-up")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ds4-load-")
    # `ds4 serve` takes ds4's single-instance lock (/tmp/ds4.lock): one of our own, so a ds4
    # process elsewhere on this machine (another engineer's, another CI run) does not refuse it.
    os.environ.setdefault("DS4_LOCK_FILE", os.path.join(tmp, "ds4.lock"))
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "w")
    kv_dir = os.path.join(tmp, "kv")
    kv_budget_mib = 4
    args = ["--port", "0", "--ctx", "4096", "--queue-max", str(a.queue_max), "--seed", "7",
            "--kv-disk-dir", kv_dir, "--kv-disk-space-mb", str(kv_budget_mib), "--kv-cache-min-tokens", "16",
            "--kv-cache-continued-interval-tokens", "32", "--kv-cache-boundary-align-tokens", "32"]
    proc = subprocess.Popen(shlex.split(a.server) + args, stdout=log, stderr=subprocess.STDOUT)
    url = None
    t0 = time.time()
    while time.time() - t0 < 120 and url is None:
        if proc.poll() is not None:
            sys.exit(f"server exited early:\n{open(log_path).read()}")
        m = re.search(r"listening on http://([0-9.]+):([0-9]+)", open(log_path).read())
        if m:
            url = f"http://{m.group(1)}:{m.group(2)}"
            host, port = m.group(1), int(m.group(2))
        time.sleep(0.1)
    if url is None:
        proc.kill()
        sys.exit("server did not start")
    mem0 = mem_kib(proc.pid)
    t_run = time.time()
    st, samples = asyncio.run(run(host, port, proc.pid, a.clients, a.seconds))
    run_s = time.time() - t_run
    alive = proc.poll() is None
    mapped_kib = mapped_file_kib(proc.pid) if alive else 0
    health, metrics = None, ""
    if alive:
        try:
            health = http_get(url + "/health")[0]
            metrics = http_get(url + "/metrics")[1]
        except OSError as e:
            print(f"  /health or /metrics failed: {e}")
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed"
    log.close()

    def m(series):
        return scrape(metrics, series)

    post = [(t, r) for t, r in samples if t >= a.warmup]

    def series(key):
        return [(t, r[key]) for t, r in post]

    def growth(key):
        return (post[-1][1][key] - post[0][1][key]) / 1024 if post else float("nan")

    anon_growth = growth("RssAnon")
    anon_slope = slope(series("RssAnon"))
    vm_growth, file_growth = growth("VmRSS"), growth("RssFile")
    file_end = samples[-1][1]["RssFile"] if samples else float("nan")
    lat = sorted(st.latencies)
    total = st.ok + st.refused + st.cancelled + len(st.errors)
    print(f"clients {a.clients}, {run_s:.0f}s, queue-max {a.queue_max}: {total} requests: {st.ok} answered, "
          f"{st.refused} refused (503), {st.cancelled} hung up by the client, {len(st.errors)} errors")
    print(f"  by kind: {json.dumps(st.by_kind)}")
    if lat:
        print(f"  latency (answered): p50 {statistics.median(lat):.2f}s, "
              f"p95 {lat[int(0.95 * (len(lat) - 1))]:.2f}s, max {lat[-1]:.2f}s")
    jobs = {k: m('ds4_jobs_total{outcome="%s"}' % k) for k in ("completed", "cancelled", "failed")}
    stores = {k: m('ds4_kv_disk_stores_total{reason="%s"}' % k) for k in ("cold", "evict", "continued")}
    received = sum(m('ds4_requests_total{endpoint="%s"}' % k) for k in ("chat", "completions", "responses", "messages"))
    print(f"  server: alive={alive} health={health} exit={rc}; requests received={received:.0f} "
          f"rejected={m('ds4_requests_rejected_total'):.0f}; jobs completed={jobs['completed']:.0f} "
          f"cancelled={jobs['cancelled']:.0f} failed={jobs['failed']:.0f}")
    kv_files = [os.path.join(kv_dir, f) for f in os.listdir(kv_dir)] if os.path.isdir(kv_dir) else []
    kv_bytes = sum(os.path.getsize(f) for f in kv_files)
    print(f"  tokens prefilled={m('ds4_prefilled_tokens_total'):.0f} cached={m('ds4_cached_prompt_tokens_total'):.0f} "
          f"generated={m('ds4_completion_tokens_total'):.0f}; kv stores cold={stores['cold']:.0f} "
          f"evict={stores['evict']:.0f} continued={stores['continued']:.0f}, on disk at the end: {len(kv_files)} files, "
          f"{kv_bytes / 2**20:.2f} MiB (budget {kv_budget_mib}); at the end: open streams="
          f"{m('ds4_sse_streams_open'):.0f} queue={m('ds4_queue_depth'):.0f} busy={m('ds4_engine_busy'):.0f}")
    if post:
        b, e = post[0][1], post[-1][1]
        print(f"  memory (MiB)  VmRSS = RssAnon + RssFile (+ shmem): start {mem0['VmRSS'] / 1024:.1f}; "
              f"after the {a.warmup:.0f}s warm-up {b['VmRSS'] / 1024:.1f} = {b['RssAnon'] / 1024:.1f} + {b['RssFile'] / 1024:.1f}; "
              f"end {e['VmRSS'] / 1024:.1f} = {e['RssAnon'] / 1024:.1f} + {e['RssFile'] / 1024:.1f}")
        print(f"  after the warm-up: VmRSS {vm_growth:+.2f}, RssAnon {anon_growth:+.2f} (bound {a.anon_growth_mib:g}), "
              f"least-squares slope {anon_slope:+.1f} KiB/s over {len(post)} samples; "
              f"RssFile {file_growth:+.2f} (mmapped files: {mapped_kib / 1024:.1f} MiB)")
        step = max(1, len(samples) // 12)
        print("  RssAnon/RssFile MiB by second: " + " ".join(
            f"{t:.0f}:{r['RssAnon'] / 1024:.0f}/{r['RssFile'] / 1024:.0f}" for t, r in samples[::step]))
    fails = []
    for e in st.errors[:10]:
        print("  error:", e)
    if st.errors:
        fails.append(f"{len(st.errors)} requests neither answered nor refused with 503 + Retry-After")
    if not alive or health != 200:
        fails.append("the server died or is unhealthy")
    if rc != 0:
        fails.append(f"exit status {rc} after SIGTERM")
    if st.refused == 0:
        fails.append("no request was refused: the queue never filled (raise --clients or lower --queue-max)")
    if st.ok < a.clients:
        fails.append(f"only {st.ok} requests answered")
    if alive and received != total:
        fails.append(f"server counted {received:.0f} requests, clients sent {total}")
    if alive and m("ds4_requests_rejected_total") != st.refused:
        fails.append(f"server counted {m('ds4_requests_rejected_total'):.0f} 503s, clients saw {st.refused}")
    if alive and (m("ds4_sse_streams_open") != 0 or m("ds4_queue_depth") != 0):
        fails.append("streams or queued jobs left over after every client finished")
    if kv_bytes > kv_budget_mib * 2**20 * 1.01:
        fails.append(f"the disk KV cache holds {kv_bytes} bytes, over its {kv_budget_mib} MiB budget")
    if len(post) < 10:
        fails.append("too few RSS samples after the warm-up")
    if not anon_growth <= a.anon_growth_mib:
        fails.append(f"anonymous RSS grew by {anon_growth:.1f} MiB after the warm-up (bound {a.anon_growth_mib} MiB)")
    # File-backed RSS is pages of mapped files (the model's weights first touched by a new
    # token or expert): bounded by what is mapped, shared with the page cache, never a leak.
    if alive and not file_end <= mapped_kib:
        fails.append(f"file-backed RSS {file_end / 1024:.1f} MiB exceeds the mapped files ({mapped_kib / 1024:.1f} MiB)")
    if not vm_growth <= anon_growth + max(file_growth, 0) + 1:
        fails.append("VmRSS grew by more than its anonymous and file-backed parts (shared memory?)")
    for f in fails:
        print("  FAIL:", f)
    print("PASS" if not fails else f"FAIL (server log: {log_path})")
    if not fails:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if not fails else 1)


if __name__ == "__main__":
    main()
