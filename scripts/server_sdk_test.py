#!/usr/bin/env python3
"""Drive a live ds4 server on loopback with the official `openai` and `anthropic` Python SDKs.

The server runs the tiny built-in model (random weights) with a TEST-ONLY script
(`--test-script`): for matching prompts the worker emits scripted text token by token instead
of sampling, through the real session / parser / streaming path, so tool-call round trips and
reasoning separation are exercised end to end.

Checks: chat (plain + streaming, reasoning separated, usage incl. streamed usage), tool calls
round trip (call -> tool result -> answer) on chat, Anthropic messages and Responses, streaming
tool calls, legacy completions, Responses streaming through the SDK's strict stream helper,
Anthropic streaming helper, count_tokens, models, errors (401, 400 context_length_exceeded),
prefix reuse from /metrics, and a restart that reuses the disk KV cache (SIGTERM -> shutdown
checkpoint -> new process -> extended request prefills only the new tail).

Usage: server_sdk_test.py --server "target/debug/examples/tiny_serve"   (or "ds4 serve")
"""

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import anthropic
import httpx
import openai

KEY = "sdk-test-key"

TOOL_CALL = (
    "The user asks for the weather, so I call get_weather.</think>\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="unit" string="true">celsius</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)

SCRIPT = [
    {"match": "<tool_result>", "text": "The tool says 21 degrees.</think>It is 21 degrees in Paris."},
    {"match": "weather", "text": TOOL_CALL},
    {"match": "plain", "text": "A plain answer without thinking."},
    {"text": "The user greets me; I greet back.</think>Hello from ds4!"},
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


class Server:
    def __init__(self, cmd, args, log_path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(shlex.split(cmd) + args, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log_path
        self.url = None
        t0 = time.time()
        while time.time() - t0 < 120:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited early:\n{open(log_path).read()}")
            m = re.search(r"listening on (http://[0-9.:]+)", open(log_path).read())
            if m:
                self.url = m.group(1)
                break
            time.sleep(0.1)
        if not self.url:
            raise SystemExit("server did not start")

    def metric(self, series):
        text = httpx.get(self.url + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
        for line in text.splitlines():
            if not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                if k == series:
                    return float(v)
        raise KeyError(series)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        self.log.close()
        return rc


def weather_tool_openai():
    return [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}}]


def test_openai(srv):
    print("openai SDK")
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    models = c.models.list()
    check(models.data[0].id == "deepseek-v4-flash", "models.list")
    check(c.models.retrieve("deepseek-v4-flash").id == "deepseek-v4-flash", "models.retrieve")

    # Chat, reasoning separated, usage.
    r = c.chat.completions.create(model="deepseek-v4-flash",
                                  messages=[{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": "hello there"}])
    m = r.choices[0].message
    check(m.content == "Hello from ds4!", f"chat content ({m.content!r})")
    check(getattr(m, "reasoning_content", None) == "The user greets me; I greet back.", "chat reasoning_content separated")
    check(r.choices[0].finish_reason == "stop", "chat finish_reason stop")
    check(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
          and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "chat usage")

    # Streaming chat with usage.
    content, reasoning, usage, finish = "", "", None, None
    for ch in c.chat.completions.create(model="deepseek-v4-flash", stream=True,
                                        stream_options={"include_usage": True},
                                        messages=[{"role": "user", "content": "hello again"}]):
        if ch.usage:
            usage = ch.usage
        for choice in ch.choices:
            content += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            finish = choice.finish_reason or finish
    check(content == "Hello from ds4!" and reasoning == "The user greets me; I greet back.",
          "chat stream content and reasoning_content deltas")
    check(finish == "stop" and usage is not None and usage.completion_tokens > 0, "chat stream usage chunk")

    # Tool call round trip with prefix reuse.
    tools = weather_tool_openai()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the weather in Paris?"}]
    r1 = c.chat.completions.create(model="deepseek-v4-flash", messages=msgs, tools=tools)
    m1 = r1.choices[0].message
    check(r1.choices[0].finish_reason == "tool_calls", "chat tool call finish_reason")
    call = m1.tool_calls[0]
    check(call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"},
          "chat tool call arguments")
    check(re.fullmatch(r"call_[0-9a-f]{32}", call.id) is not None, "tool call id is call_ + 32 hex")
    msgs.append(m1.model_dump(exclude_none=True))
    msgs.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})})
    before = srv.metric("ds4_prefilled_tokens_total")
    r2 = c.chat.completions.create(model="deepseek-v4-flash", messages=msgs, tools=tools)
    after = srv.metric("ds4_prefilled_tokens_total")
    check(r2.choices[0].message.content == "It is 21 degrees in Paris.", "chat tool result -> answer")
    cached = r2.usage.prompt_tokens_details.cached_tokens
    check(cached == r1.usage.prompt_tokens + r1.usage.completion_tokens - 1,
          f"tool turn reuses the live KV ({cached} cached of {r2.usage.prompt_tokens})")
    check(after - before == r2.usage.prompt_tokens - cached,
          f"only the new tail is prefilled ({after - before:.0f} tokens)")

    # Streaming tool calls.
    calls = {}
    for ch in c.chat.completions.create(model="deepseek-v4-flash", stream=True, tools=tools,
                                        messages=[{"role": "user", "content": "weather in Paris, streamed"}]):
        for choice in ch.choices:
            for tc in choice.delta.tool_calls or []:
                e = calls.setdefault(tc.index, {"id": None, "name": "", "args": ""})
                e["id"] = tc.id or e["id"]
                if tc.function:
                    e["name"] += tc.function.name or ""
                    e["args"] += tc.function.arguments or ""
    check(len(calls) == 1 and calls[0]["name"] == "get_weather"
          and json.loads(calls[0]["args"]) == {"city": "Paris", "unit": "celsius"}, "chat streamed tool_calls")

    # Legacy completions: raw text (reasoning and </think> included).
    r = c.completions.create(model="deepseek-v4-flash", prompt="hello", max_tokens=64)
    check(r.choices[0].text == "The user greets me; I greet back.</think>Hello from ds4!", "completions raw text")

    # Responses: non-streaming tool call, then streaming answer via the SDK's stream helper.
    rtools = [{"type": "function", "name": "get_weather", "description": "Current weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    inp = [{"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]}]
    resp = c.responses.create(model="deepseek-v4-flash", input=inp, tools=rtools,
                              reasoning={"effort": "high", "summary": "auto"}, instructions=SYSTEM)
    fcs = [o for o in resp.output if o.type == "function_call"]
    rs = [o for o in resp.output if o.type == "reasoning"]
    check(resp.status == "completed" and len(fcs) == 1 and json.loads(fcs[0].arguments)["city"] == "Paris",
          "responses function_call")
    check(len(rs) == 1 and rs[0].summary[0].text.startswith("The user asks"), "responses reasoning summary")
    check(resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0, "responses usage")
    inp += [o.model_dump(exclude_none=True) for o in resp.output]
    inp.append({"type": "function_call_output", "call_id": fcs[0].call_id, "output": "21 C"})
    deltas = []
    types = []
    with c.responses.stream(model="deepseek-v4-flash", input=inp, tools=rtools, instructions=SYSTEM,
                            reasoning={"effort": "high", "summary": "auto"}) as stream:
        for ev in stream:
            types.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = stream.get_final_response()
    check("".join(deltas) == "It is 21 degrees in Paris." and final.output_text == "It is 21 degrees in Paris.",
          "responses stream text (SDK stream helper)")
    check(types[0] == "response.created" and types[-1] == "response.completed"
          and "response.reasoning_summary_text.delta" in types, "responses stream event sequence")
    check(final.usage.input_tokens_details.cached_tokens > 0, "responses continuation reuses the live KV")

    # Errors.
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        check(False, "401 without the right key")
    except openai.AuthenticationError:
        check(True, "401 without the right key")
    try:
        c.chat.completions.create(model="deepseek-v4-flash",
                                  messages=[{"role": "user", "content": "word " * 9000}])
        check(False, "context_length_exceeded")
    except openai.BadRequestError as e:
        check(e.code == "context_length_exceeded", "context_length_exceeded (400)")


def test_anthropic(srv):
    print("anthropic SDK")
    c = anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=120)
    tools = [{"name": "get_weather", "description": "Current weather for a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]

    m = c.messages.create(model="claude-sonnet-4-5", max_tokens=2048, system=SYSTEM,
                          thinking={"type": "enabled", "budget_tokens": 1024},
                          messages=[{"role": "user", "content": "hello there"}])
    kinds = [b.type for b in m.content]
    check(kinds == ["thinking", "text"], f"messages blocks {kinds}")
    check(m.content[0].thinking == "The user greets me; I greet back." and m.content[1].text == "Hello from ds4!",
          "messages thinking separated from text")
    u = m.usage
    check(m.stop_reason == "end_turn" and u.output_tokens > 0
          and u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens > 0, "messages usage")

    # Streaming helper.
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=2048,
                           messages=[{"role": "user", "content": "hello, streamed"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check(text == "Hello from ds4!" and final.content[0].type == "thinking", "messages stream text and thinking")

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
    check(second.content[-1].text == "It is 21 degrees in Paris.", "messages tool_result -> answer")
    check(second.usage.cache_read_input_tokens == first.usage.cache_read_input_tokens
          + first.usage.cache_creation_input_tokens + first.usage.output_tokens - 1,
          "messages tool turn reuses the live KV")

    n = c.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hello"}])
    check(n.input_tokens > 0, "count_tokens")


def test_restart(cmd, base_args, kv_dir, log_dir):
    print("disk KV cache across a restart")
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "plain question one"}]
    srv = Server(cmd, base_args, os.path.join(log_dir, "restart-a.log"))
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    r1 = c.chat.completions.create(model="deepseek-chat", messages=turn1)
    answer = r1.choices[0].message.content
    check(answer == "A plain answer without thinking.", "non-thinking answer (deepseek-chat alias)")
    rc = srv.stop()
    check(rc == 0, f"SIGTERM: clean exit (status {rc})")
    check("stored shutdown checkpoint" in open(srv.log_path).read(), "shutdown checkpoint written")
    srv = Server(cmd, base_args, os.path.join(log_dir, "restart-b.log"))
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "plain question two"}]
    r2 = c.chat.completions.create(model="deepseek-chat", messages=turn2)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    pre = srv.metric("ds4_prefilled_tokens_total")
    check(cached == r1.usage.prompt_tokens + r1.usage.completion_tokens,
          f"restarted server restores the checkpoint ({cached} tokens)")
    check(pre == r2.usage.prompt_tokens - cached, f"and prefills only the new tail ({pre:.0f} tokens)")
    check(srv.metric('ds4_cache_lookups_total{source="disk"}') == 1, "disk hit counted")
    srv.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True, help="server command, e.g. 'target/debug/ds4 serve'")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ds4-sdk-")
    script = os.path.join(tmp, "script.json")
    with open(script, "w") as f:
        json.dump(SCRIPT, f)
    kv = os.path.join(tmp, "kv")
    base = ["--port", "0", "--ctx", "8192", "--seed", "1", "--api-key", KEY, "--test-script", script,
            "--kv-disk-dir", kv, "--kv-cache-min-tokens", "16", "--trace", os.path.join(tmp, "trace.txt")]
    t0 = time.time()
    srv = Server(a.server, base, os.path.join(tmp, "server.log"))
    try:
        test_openai(srv)
        test_anthropic(srv)
    finally:
        rc = srv.stop()
    check(rc == 0, "server exits cleanly on SIGTERM")
    import shutil
    shutil.rmtree(kv, ignore_errors=True)
    test_restart(a.server, base, kv, tmp)
    print(f"{len(failures)} failure(s) in {time.time() - t0:.1f}s (logs in {tmp})")
    if failures:
        for f in failures:
            print("FAILED:", f)
        sys.exit(1)


if __name__ == "__main__":
    main()
