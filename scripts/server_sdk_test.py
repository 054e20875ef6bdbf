#!/usr/bin/env python3
"""Drive a live ds4 server on loopback with the official `openai` and `anthropic` Python SDKs.

The server runs the tiny built-in model (random weights) with a TEST-ONLY script
(`--test-script`): for matching prompts the worker emits scripted text token by token instead
of sampling, through the real session / parser / streaming path, so tool-call round trips and
reasoning separation are exercised end to end.

Checks (each prints `ok` or `FAIL`; the exit status is 1 if any failed):
  openai SDK     models list/retrieve; chat with reasoning_content separated and usage; thinking
                 off (reasoning_effort none, deepseek-chat alias); streaming chat deltas, usage
                 chunk only with stream_options.include_usage; tool call round trip (call ->
                 tool result -> answer) with the exact-DSML replay and live prefix reuse asserted
                 from /metrics and the --trace file; streamed tool_calls; legacy completions raw
                 text; Responses function_call + reasoning summary, then the tool output ->
                 answer through the SDK's Responses stream helper; errors 401, 404, 400
                 (unknown role, context_length_exceeded).
  anthropic SDK  messages with thinking + text blocks and usage; stream helper; streamed tool_use
                 round trip with live reuse; count_tokens (Think Max not applied below its
                 context); errors 401 and 400 in Anthropic shape.
  disk KV cache  SIGTERM drains and writes a shutdown checkpoint; a restarted server restores it
                 and prefills only the new tail (from usage and /metrics); SIGINT does the same;
                 a flipped byte in the newest checkpoint makes the next server ignore that file
                 (load failure counted and logged, file removed) and fall back to the older one.

Usage: server_sdk_test.py --server "target/release/ds4 serve"
       (the command gets `--port 0 ...` appended; it must print `listening on http://ADDR`).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import anthropic  # noqa: E402
import openai  # noqa: E402

KEY = "sdk-test-key"
MODEL = "deepseek-v4-flash"

TOOL_CALL = (
    "The user asks for the weather, so I call get_weather.</think>\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="unit" string="true">celsius</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)
GREETING_REASONING = "The user greets me; I greet back."
GREETING = "Hello from ds4!"
ANSWER = "It is 21 degrees in Paris."
PLAIN = "A plain answer without thinking."

SCRIPT = [
    {"match": "<tool_result>", "text": "The tool says 21 degrees.</think>" + ANSWER},
    {"match": "weather", "text": TOOL_CALL},
    {"match": "plain", "text": PLAIN},
    {"text": GREETING_REASONING + "</think>" + GREETING},
]

SYSTEM = ("You are a helpful assistant running inside an SDK compatibility test. "
          "Answer briefly and call tools when the user asks for live data.")

failures = []


def check(cond, what):
    if cond:
        print(f"  ok   {what}")
    else:
        print(f"  FAIL {what}")
        failures.append(what)


def expect_error(fn, exc, what, pred=lambda e: True):
    try:
        fn()
        check(False, f"{what} (no error raised)")
    except exc as e:
        check(pred(e), f"{what} ({type(e).__name__} {getattr(e, 'status_code', '')})")
    except Exception as e:  # noqa: BLE001
        check(False, f"{what} (raised {type(e).__name__}: {e})")


class Server:
    def __init__(self, cmd, args, log_path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(shlex.split(cmd) + args, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log_path
        self.url = None
        t0 = time.time()
        while time.time() - t0 < 120:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited early:\n{self.log_text()}")
            m = re.search(r"listening on (http://[0-9.:]+)", self.log_text())
            if m:
                self.url = m.group(1)
                break
            time.sleep(0.1)
        if not self.url:
            self.proc.kill()
            raise SystemExit("server did not start")

    def log_text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def openai(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def anthropic(self, key=KEY):
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, timeout=120)

    def metric(self, series):
        req = urllib.request.Request(self.url + "/metrics", headers={"authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                if k == series:
                    return float(v)
        raise KeyError(series)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "killed"
        self.log.close()
        return rc


def trace_sources(path):
    """`cache_source:` of every request in the --trace file, in order."""
    with open(path, errors="replace") as f:
        return re.findall(r"^cache_source: (\S+)$", f.read(), re.M)


def weather_tool_openai():
    return [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}}]


def test_openai(srv, trace):
    print("openai SDK")
    c = srv.openai()

    models = c.models.list()
    check(models.data[0].id == MODEL, "models.list")
    check(c.models.retrieve(MODEL).id == MODEL, "models.retrieve")

    # Chat, reasoning separated, usage.
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": SYSTEM},
                                                         {"role": "user", "content": "hello there"}])
    m = r.choices[0].message
    check(m.content == GREETING, f"chat content ({m.content!r})")
    check(getattr(m, "reasoning_content", None) == GREETING_REASONING, "chat reasoning_content separated")
    check(r.choices[0].finish_reason == "stop", "chat finish_reason stop")
    check(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
          and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "chat usage")

    # Thinking off: reasoning_effort "none", and the deepseek-chat alias.
    for kw, what in ((dict(model=MODEL, reasoning_effort="none"), "reasoning_effort=none"),
                     (dict(model="deepseek-chat"), "deepseek-chat alias")):
        r = c.chat.completions.create(messages=[{"role": "user", "content": "a plain question"}], **kw)
        m = r.choices[0].message
        check(m.content == PLAIN and getattr(m, "reasoning_content", None) is None and r.model == kw["model"],
              f"thinking off with {what}")

    # Streaming chat with and without include_usage.
    for include in (True, False):
        content, reasoning, usage, finish, n_usage = "", "", None, None, 0
        kw = {"stream_options": {"include_usage": True}} if include else {}
        for ch in c.chat.completions.create(model=MODEL, stream=True, **kw,
                                            messages=[{"role": "user", "content": "hello again"}]):
            if ch.usage:
                usage, n_usage = ch.usage, n_usage + 1
            for choice in ch.choices:
                content += choice.delta.content or ""
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                finish = choice.finish_reason or finish
        check(content == GREETING and reasoning == GREETING_REASONING and finish == "stop",
              f"chat stream content and reasoning_content deltas (include_usage={include})")
        if include:
            check(n_usage == 1 and usage.completion_tokens > 0
                  and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
                  "chat stream: one usage chunk with stream_options.include_usage")
        else:
            check(n_usage == 0, "chat stream: no usage chunk without include_usage")

    # Tool call round trip with exact-DSML replay and live prefix reuse.
    tools = weather_tool_openai()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the weather in Paris?"}]
    r1 = c.chat.completions.create(model=MODEL, messages=msgs, tools=tools)
    m1 = r1.choices[0].message
    check(r1.choices[0].finish_reason == "tool_calls", "chat tool call finish_reason")
    call = m1.tool_calls[0]
    check(call.type == "function" and call.function.name == "get_weather"
          and json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"},
          "chat tool call arguments")
    check(re.fullmatch(r"call_[0-9a-f]{32}", call.id) is not None, "tool call id is call_ + 32 hex")
    check(getattr(m1, "reasoning_content", None) == "The user asks for the weather, so I call get_weather.",
          "chat tool call turn: reasoning separated")
    msgs.append(m1.model_dump(exclude_none=True))
    msgs.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})})
    before = srv.metric("ds4_prefilled_tokens_total")
    hits_before = srv.metric('ds4_cache_lookups_total{source="memory-token"}')
    r2 = c.chat.completions.create(model=MODEL, messages=msgs, tools=tools)
    after = srv.metric("ds4_prefilled_tokens_total")
    check(r2.choices[0].message.content == ANSWER and r2.choices[0].finish_reason == "stop",
          "chat tool result -> answer")
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # Everything the first turn left in the live session is reused: the replayed DSML is
    # byte-identical to the sampled block, so the tokens match.
    check(cached == r1.usage.prompt_tokens + r1.usage.completion_tokens,
          f"tool turn reuses the live KV ({cached} cached of {r2.usage.prompt_tokens})")
    check(after - before == r2.usage.prompt_tokens - cached,
          f"/metrics: only the new tail is prefilled ({after - before:.0f} tokens)")
    check(srv.metric('ds4_cache_lookups_total{source="memory-token"}') == hits_before + 1,
          "/metrics: memory-token hit counted")
    check(trace_sources(trace)[-1] == "memory-token", "--trace: cache_source memory-token for the tool turn")

    # Streaming tool calls.
    calls = {}
    finish = None
    for ch in c.chat.completions.create(model=MODEL, stream=True, tools=tools,
                                        messages=[{"role": "user", "content": "weather in Paris, streamed"}]):
        for choice in ch.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                e = calls.setdefault(tc.index, {"id": None, "name": "", "args": ""})
                e["id"] = tc.id or e["id"]
                if tc.function:
                    e["name"] += tc.function.name or ""
                    e["args"] += tc.function.arguments or ""
    check(len(calls) == 1 and calls[0]["name"] == "get_weather" and finish == "tool_calls"
          and re.fullmatch(r"call_[0-9a-f]{32}", calls[0]["id"] or "") is not None
          and json.loads(calls[0]["args"]) == {"city": "Paris", "unit": "celsius"}, "chat streamed tool_calls")

    # Legacy completions: raw text (reasoning and </think> included).
    r = c.completions.create(model=MODEL, prompt="hello", max_tokens=64)
    check(r.choices[0].text == GREETING_REASONING + "</think>" + GREETING, "completions raw text")
    check(r.usage.completion_tokens > 0, "completions usage")

    # Responses: non-streaming tool call, then the answer through the SDK's stream helper.
    rtools = [{"type": "function", "name": "get_weather", "description": "Current weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    inp = [{"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]}]
    resp = c.responses.create(model=MODEL, input=inp, tools=rtools,
                              reasoning={"effort": "high", "summary": "auto"}, instructions=SYSTEM)
    fcs = [o for o in resp.output if o.type == "function_call"]
    rs = [o for o in resp.output if o.type == "reasoning"]
    check(resp.status == "completed" and len(fcs) == 1 and json.loads(fcs[0].arguments)["city"] == "Paris"
          and re.fullmatch(r"call_[0-9a-f]{32}", fcs[0].call_id) is not None, "responses function_call")
    check(len(rs) == 1 and rs[0].summary[0].text.startswith("The user asks"), "responses reasoning summary")
    check(resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
          and resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens, "responses usage")
    inp += [o.model_dump(exclude_none=True) for o in resp.output]
    inp.append({"type": "function_call_output", "call_id": fcs[0].call_id, "output": "21 C"})
    deltas, summary, types = [], [], []
    with c.responses.stream(model=MODEL, input=inp, tools=rtools, instructions=SYSTEM,
                            reasoning={"effort": "high", "summary": "auto"}) as stream:
        for ev in stream:
            types.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
            elif ev.type == "response.reasoning_summary_text.delta":
                summary.append(ev.delta)
        final = stream.get_final_response()
    check("".join(deltas) == ANSWER and final.output_text == ANSWER, "responses stream text (SDK stream helper)")
    check("".join(summary) == "The tool says 21 degrees.", "responses stream reasoning summary deltas")
    check(types[0] == "response.created" and types[-1] == "response.completed", "responses stream event sequence")
    check(final.usage.input_tokens_details.cached_tokens > 0 and final.usage.output_tokens > 0,
          "responses continuation reuses the live KV; usage in response.completed")

    # Errors.
    expect_error(lambda: srv.openai("wrong").models.list(), openai.AuthenticationError, "401 without the right key")
    expect_error(lambda: c.models.retrieve("gpt-4"), openai.NotFoundError, "404 unknown model")
    expect_error(lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}]),
                 openai.BadRequestError, "400 unknown role", lambda e: "unknown message role" in str(e))
    expect_error(lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 9000}]),
                 openai.BadRequestError, "400 context_length_exceeded",
                 lambda e: e.code == "context_length_exceeded")


def test_anthropic(srv):
    print("anthropic SDK")
    c = srv.anthropic()
    tools = [{"name": "get_weather", "description": "Current weather for a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]

    m = c.messages.create(model="claude-sonnet-4-5", max_tokens=2048, system=SYSTEM,
                          thinking={"type": "enabled", "budget_tokens": 1024},
                          messages=[{"role": "user", "content": "hello there"}])
    kinds = [b.type for b in m.content]
    check(kinds == ["thinking", "text"], f"messages blocks {kinds}")
    check(m.content[0].thinking == GREETING_REASONING and m.content[1].text == GREETING,
          "messages thinking separated from text")
    u = m.usage
    check(m.stop_reason == "end_turn" and u.output_tokens > 0
          and u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens > 0, "messages usage")
    m = c.messages.create(model="claude-sonnet-4-5", max_tokens=2048, thinking={"type": "disabled"},
                          messages=[{"role": "user", "content": "a plain question"}])
    check([b.type for b in m.content] == ["text"] and m.content[0].text == PLAIN, "messages thinking disabled")

    # Streaming helper.
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=2048,
                           messages=[{"role": "user", "content": "hello, streamed"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check(text == GREETING and final.content[0].type == "thinking" and final.content[0].thinking == GREETING_REASONING,
          "messages stream text and thinking")
    check(final.usage.output_tokens > 0 and final.stop_reason == "end_turn", "messages stream usage and stop_reason")

    # Tool use round trip (streamed first turn, plain second turn).
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=2048, tools=tools, messages=msgs) as s:
        first = s.get_final_message()
    tu = [b for b in first.content if b.type == "tool_use"]
    check(first.stop_reason == "tool_use" and len(tu) == 1 and tu[0].input == {"city": "Paris", "unit": "celsius"},
          "messages streamed tool_use input")
    check(re.fullmatch(r"toolu_[0-9a-f]{32}", tu[0].id) is not None, "tool_use id is toolu_ + 32 hex")
    msgs.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tu[0].id, "content": "21 C"}]})
    second = c.messages.create(model="claude-sonnet-4-5", max_tokens=2048, tools=tools, messages=msgs)
    check(second.content[-1].text == ANSWER and second.stop_reason == "end_turn", "messages tool_result -> answer")
    check(second.usage.cache_read_input_tokens == first.usage.cache_read_input_tokens
          + first.usage.cache_creation_input_tokens + first.usage.output_tokens,
          "messages tool turn reuses the live KV")

    hello = [{"role": "user", "content": "hello"}]
    n = c.messages.count_tokens(model="claude-sonnet-4-5", messages=hello)
    check(n.input_tokens > 0, "count_tokens")
    n_off = c.messages.count_tokens(model="claude-sonnet-4-5", messages=hello, thinking={"type": "disabled"})
    check(n_off.input_tokens == n.input_tokens, "count_tokens: same length with thinking off (</think> vs <think>)")
    n_max = c.messages.count_tokens(model="claude-sonnet-4-5", messages=hello, extra_body={"output_config": {"effort": "max"}})
    check(n_max.input_tokens == n.input_tokens, "count_tokens: Think Max not applied at ctx 8192")

    expect_error(lambda: srv.anthropic("wrong").messages.create(model="m", max_tokens=8, messages=hello),
                 anthropic.AuthenticationError, "anthropic 401")
    expect_error(lambda: c.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "word " * 9000}]),
                 anthropic.BadRequestError, "anthropic 400 (context) in Anthropic shape",
                 lambda e: isinstance(e.body, dict) and e.body.get("type") == "error"
                 and "context size" in e.body["error"]["message"])


def kv_files(d):
    return {f for f in os.listdir(d) if f.endswith(".kv")} if os.path.isdir(d) else set()


def test_restart(cmd, base_args, kv_dir, log_dir):
    print("disk KV cache across restarts")
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "plain question one"}]

    # Life A: one request, then SIGTERM -> drain -> shutdown checkpoint.
    srv = Server(cmd, base_args, os.path.join(log_dir, "life-a.log"))
    r1 = srv.openai().chat.completions.create(model="deepseek-chat", messages=turn1)
    answer1 = r1.choices[0].message.content
    check(answer1 == PLAIN, "life A: answer")
    rc = srv.stop(signal.SIGTERM)
    check(rc == 0, f"life A: SIGTERM -> clean exit (status {rc})")
    check("stored shutdown checkpoint" in srv.log_text(), "life A: shutdown checkpoint written")
    files_a = kv_files(kv_dir)

    # Life B: the extended conversation restores life A's checkpoint; only the tail is prefilled.
    srv = Server(cmd, base_args, os.path.join(log_dir, "life-b.log"))
    turn2 = turn1 + [{"role": "assistant", "content": answer1}, {"role": "user", "content": "plain question two"}]
    r2 = srv.openai().chat.completions.create(model="deepseek-chat", messages=turn2)
    answer2 = r2.choices[0].message.content
    cached = r2.usage.prompt_tokens_details.cached_tokens
    pre = srv.metric("ds4_prefilled_tokens_total")
    check(cached == r1.usage.prompt_tokens + r1.usage.completion_tokens,
          f"life B: restores the shutdown checkpoint ({cached} tokens)")
    check(pre == r2.usage.prompt_tokens - cached and 0 < pre < 20,
          f"life B: /metrics: only the new tail is prefilled ({pre:.0f} of {r2.usage.prompt_tokens} tokens)")
    check(srv.metric('ds4_cache_lookups_total{source="disk"}') == 1, "life B: disk hit counted")
    rc = srv.stop(signal.SIGINT)
    check(rc == 0, f"life B: SIGINT -> clean exit (status {rc})")
    new = kv_files(kv_dir) - files_a
    check(len(new) == 1, f"life B: wrote one new (shutdown) checkpoint ({len(new)})")

    # Life C: flip one byte in the middle of life B's checkpoint; the server must ignore that file
    # (log line, failure counted, file removed) and fall back to life A's checkpoint.
    if len(new) == 1:
        victim = os.path.join(kv_dir, next(iter(new)))
        with open(victim, "r+b") as f:
            size = f.seek(0, 2)
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 0x01]))
    srv = Server(cmd, base_args, os.path.join(log_dir, "life-c.log"))
    turn3 = turn2 + [{"role": "assistant", "content": answer2}, {"role": "user", "content": "plain question three"}]
    r3 = srv.openai().chat.completions.create(model="deepseek-chat", messages=turn3)
    cached3 = r3.usage.prompt_tokens_details.cached_tokens
    check(r3.choices[0].message.content == PLAIN, "life C: answer")
    check(srv.metric("ds4_kv_disk_load_failures_total") == 1, "life C: the damaged file failed verification")
    check(cached3 == cached, f"life C: fell back to life A's checkpoint ({cached3} cached, want {cached})")
    check(srv.metric("ds4_prefilled_tokens_total") == r3.usage.prompt_tokens - cached3,
          "life C: /metrics agrees with usage")
    check(re.search(r"ignoring .*" + re.escape(next(iter(new), "?")), srv.log_text()) is not None,
          "life C: log line names the ignored file")
    check(not os.path.exists(os.path.join(kv_dir, next(iter(new), "?"))), "life C: the damaged file was removed")
    rc = srv.stop()
    check(rc == 0, f"life C: clean exit (status {rc})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True, help="server command, e.g. 'target/release/ds4 serve'")
    a = ap.parse_args()
    print(f"openai {openai.__version__}, anthropic {anthropic.__version__}; server: {a.server}")
    tmp = tempfile.mkdtemp(prefix="ds4-sdk-")
    # `ds4 serve` takes ds4's single-instance lock (/tmp/ds4.lock): one of our own, so a ds4
    # process elsewhere on this machine (another engineer's, another CI run) does not refuse it.
    os.environ.setdefault("DS4_LOCK_FILE", os.path.join(tmp, "ds4.lock"))
    script = os.path.join(tmp, "script.json")
    with open(script, "w") as f:
        json.dump(SCRIPT, f)
    kv = os.path.join(tmp, "kv")
    trace = os.path.join(tmp, "trace.txt")
    base = ["--port", "0", "--ctx", "8192", "--seed", "1", "--api-key", KEY, "--test-script", script,
            "--kv-disk-dir", kv, "--kv-cache-min-tokens", "16"]
    t0 = time.time()
    srv = Server(a.server, base + ["--trace", trace], os.path.join(tmp, "server.log"))
    try:
        test_openai(srv, trace)
        test_anthropic(srv)
    except Exception as e:  # noqa: BLE001
        check(False, f"unexpected {type(e).__name__}: {e}")
    finally:
        rc = srv.stop()
    check(rc == 0, "server exits cleanly on SIGTERM")
    shutil.rmtree(kv, ignore_errors=True)
    try:
        test_restart(a.server, base, kv, tmp)
    except Exception as e:  # noqa: BLE001
        check(False, f"unexpected {type(e).__name__}: {e}")
    print(f"{len(failures)} failure(s) in {time.time() - t0:.1f}s (logs in {tmp})")
    if failures:
        for f in failures:
            print("FAILED:", f)
        sys.exit(1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
