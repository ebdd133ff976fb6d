"""The OpenAI-compatible HTTP front end, end to end: a real agentd (tiny model) on a free
loopback port, driven by the official `openai` package and by LangChain's ChatOpenAI, as
agent frameworks drive it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from daemonproc import DaemonProc

AGENTCTL = str(Path(sys.executable).parent / "agentctl")


def _http(d: DaemonProc) -> dict:
    with d.client() as c:
        return c.status()["http"]


def _openai(d: DaemonProc, key: str | None = None) -> openai.OpenAI:
    http = _http(d)
    key = key or Path(http["token_file"]).read_text().strip()
    return openai.OpenAI(base_url=http["base_url"], api_key=key, max_retries=0, timeout=60)


def _history(d: DaemonProc, name: str) -> list[dict]:
    with d.client() as c:
        return c.history(name)["messages"]


def _names(d: DaemonProc) -> list[str]:
    with d.client() as c:
        return [a["name"] for a in c.list()["agents"]]


@pytest.fixture(scope="module")
def daemon(tiny_llama_dir):
    home = Path(tempfile.mkdtemp(prefix="ad-", dir="/tmp"))
    d = DaemonProc(home, tiny_llama_dir, "--http", "127.0.0.1:0").start()
    yield d
    d.kill()
    shutil.rmtree(home, ignore_errors=True)


def test_chat_completions_plain_then_streamed_record_each_turn_once(daemon):
    client = _openai(daemon)
    convo = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    first = client.chat.completions.create(model="agent:chat", messages=convo, max_tokens=6)
    reply = first.choices[0].message.content
    assert first.choices[0].finish_reason in ("stop", "length") and reply
    assert first.usage.prompt_tokens > 0 and first.usage.prompt_tokens_details.cached_tokens == 0

    # The client resends the whole conversation, as Chat Completions clients do.
    convo += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Numbers: 0 1 2"}]
    stream = client.chat.completions.create(model="agent:chat", messages=convo, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    # Only the new turn was prefilled: the first turn came from the agent's cache.
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert usage.prompt_tokens > usage.prompt_tokens_details.cached_tokens

    history = _history(daemon, "chat")
    assert history == [convo[1], convo[2], convo[3], {"role": "assistant", "content": streamed}]
    with daemon.client() as c:
        assert c.show("chat")["system"] == "You are terse."
    models = [m.id for m in client.models.list().data]
    assert "agent:chat" in models and "tiny-llama" in models

    # The base model's id: stateless, nothing recorded, but a resent prefix is reused in memory.
    before = _names(daemon)
    s1 = client.chat.completions.create(model="tiny-llama", messages=convo, max_tokens=3)
    s2 = client.chat.completions.create(model="tiny-llama", messages=convo + [
        {"role": "assistant", "content": s1.choices[0].message.content}, {"role": "user", "content": "More."}],
        max_tokens=3)
    assert s2.usage.prompt_tokens_details.cached_tokens >= s1.usage.prompt_tokens - 1
    assert _names(daemon) == before


def test_a_diverging_conversation_keeps_the_old_one_as_a_branch(daemon):
    client = _openai(daemon)
    base = [{"role": "user", "content": "What are the steps?"}]
    a1 = client.chat.completions.create(model="agent:div", messages=base, max_tokens=4).choices[0].message.content
    grown = base + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And the impact?"}]
    client.chat.completions.create(model="agent:div", messages=grown, max_tokens=4)
    before = _history(daemon, "div")
    assert len(before) == 4

    edited = [{"role": "user", "content": "What is the business impact?"}]  # the first turn, edited
    resp = client.chat.completions.create(model="agent:div", messages=edited, max_tokens=4)
    branch = resp.model_extra["agentd"]["branch"]
    assert branch == "div.b1"
    assert _history(daemon, branch) == before  # nothing was lost
    after = _history(daemon, "div")
    assert after[0] == edited[0] and len(after) == 2

    # Another system prompt is a divergence too; a second branch gets the next free name.
    resp = client.chat.completions.create(
        model="agent:div", messages=[{"role": "system", "content": "Be brief."}] + edited, max_tokens=4)
    assert resp.model_extra["agentd"]["branch"] == "div.b2"
    assert _history(daemon, "div.b2") == after


def test_responses_api_appends_follows_previous_ids_and_is_retrievable(daemon):
    client = _openai(daemon)
    r1 = client.responses.create(model="agent:resp", input="Hello!", max_output_tokens=5)
    assert r1.status in ("completed", "incomplete") and r1.output_text
    r2 = client.responses.create(model="agent:resp", input="Numbers: 0 1 2", previous_response_id=r1.id,
                                 max_output_tokens=5)
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens
    # Without previous_response_id the input is simply the agent's next turn.
    r3 = client.responses.create(model="agent:resp", input=[{"role": "user", "content": "More?"}],
                                 max_output_tokens=5)
    history = _history(daemon, "resp")
    assert [m["content"] for m in history[0::2]] == ["Hello!", "Numbers: 0 1 2", "More?"]
    assert [m["content"] for m in history[1::2]] == [r1.output_text, r2.output_text, r3.output_text]

    got = client.responses.retrieve(r2.id)
    assert got.id == r2.id and got.output_text == r2.output_text and got.previous_response_id == r1.id

    # Continuing from r1 again drops r2 and r3 from the agent: they are kept as a branch.
    r4 = client.responses.create(model="agent:resp", input="Again", previous_response_id=r1.id, max_output_tokens=5)
    branch = r4.model_extra["agentd"]["branch"]
    assert _history(daemon, branch) == history
    assert [m["content"] for m in _history(daemon, "resp")] == ["Hello!", r1.output_text, "Again", r4.output_text]

    # The stream: deltas, then a final response whose text is what was recorded.
    events = list(client.responses.create(model="agent:resp", input="Stream", max_output_tokens=5, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[0].type == "response.created" and events[-1].response.output_text == deltas
    assert _history(daemon, "resp")[-1]["content"] == deltas

    # A conversation may name the agent instead of the model.
    r5 = client.responses.create(model="tiny-llama", conversation="agent:resp", input="Via the conversation",
                                 max_output_tokens=5)
    assert _history(daemon, "resp")[-2:] == [{"role": "user", "content": "Via the conversation"},
                                              {"role": "assistant", "content": r5.output_text}]

    # The base model's id is a stateless chain; previous_response_id carries its context.
    s1 = client.responses.create(model="tiny-llama", input="Hello!", max_output_tokens=4)
    s2 = client.responses.create(model="tiny-llama", input="And?", previous_response_id=s1.id, max_output_tokens=4)
    assert s2.usage.input_tokens > s1.usage.input_tokens
    assert "agent:tiny-llama" not in [m.id for m in client.models.list().data]


def test_stop_sequences_end_the_reply(daemon):
    client = _openai(daemon)
    ask = [{"role": "user", "content": "Numbers: 0 1 2 3"}]
    full = client.chat.completions.create(model="agent:stop1", messages=ask, max_tokens=12).choices[0].message.content
    stop = full[3:5]
    assert full.index(stop) > 0, full  # a cut that leaves some text
    cut = client.chat.completions.create(model="agent:stop2", messages=ask, max_tokens=12, stop=stop)
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert _history(daemon, "stop2")[-1]["content"] == full[: full.index(stop)]


def test_every_request_needs_the_key(daemon):
    with pytest.raises(openai.AuthenticationError) as err:
        _openai(daemon, key="not-the-key").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    base = _http(daemon)["base_url"]
    resp = httpx.post(base + "/chat/completions", json={"model": "agent:x", "messages": []})
    assert resp.status_code == 401 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(base.removesuffix("/v1") + "/").status_code == 401  # the status page too


def test_bad_requests_get_openai_errors(daemon):
    client = _openai(daemon)
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="agent:e", messages=hi, max_tokens=2, extra_body={"best_of": 3})
    assert "best_of" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="agent:../etc", messages=hi, max_tokens=2)
    assert err.value.body["code"] == "invalid_agent_name"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=hi, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="agent:e", messages=hi, max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="agent:e", messages=hi, max_tokens=2, stop=["a", "b", "c", "d", "e"])
    assert "stop" in err.value.message
    http = _http(daemon)
    key = Path(http["token_file"]).read_text().strip()
    big = httpx.post(http["base_url"] + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                     content=b"{" + b" " * (10 * 2**20) + b"}")
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_busy_agent_and_a_client_that_disconnects_mid_stream(daemon):
    client = _openai(daemon)
    client.chat.completions.create(model="agent:busy", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    before = _history(daemon, "busy")
    convo = before + [{"role": "user", "content": "Tell me everything."}]
    stream = client.chat.completions.create(model="agent:busy", messages=convo, max_tokens=8000, stream=True)
    next(iter(stream))  # generating now
    with pytest.raises(openai.ConflictError) as err:
        client.chat.completions.create(model="agent:busy", messages=convo, max_tokens=2)
    assert err.value.body["code"] == "agent_busy"
    stream.close()  # the client goes away: its turn is cancelled, nothing is recorded
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.chat.completions.create(model="agent:busy", messages=before + [
                {"role": "user", "content": "Short one."}], max_tokens=2)
            break
        except openai.ConflictError:
            time.sleep(0.1)
    history = _history(daemon, "busy")
    assert history[:2] == before and history[2]["content"] == "Short one." and len(history) == 4
    with daemon.client() as c:
        assert not [a for a in c.list()["agents"] if a["name"].startswith("busy.")]  # no branch: nothing diverged


def test_tool_calls_and_tool_results_are_kept_in_the_transcript(daemon):
    client = _openai(daemon)
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time",
                                               "parameters": {"type": "object", "properties": {}}}}]
    convo = [{"role": "user", "content": "What time is it?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    client.chat.completions.create(model="agent:tools", messages=convo, tools=tools, max_tokens=3)
    history = _history(daemon, "tools")
    assert history[1]["tool_calls"][0]["function"]["name"] == "get_time"
    assert history[2] == {"role": "tool", "content": "12:00", "tool_call_id": "call_1"}
    # Resent with the arguments re-serialized, it still extends the transcript: no branch.
    convo[1]["tool_calls"][0]["function"]["arguments"] = "{ }"
    convo += [{"role": "assistant", "content": history[3]["content"]}, {"role": "user", "content": "Thanks"}]
    resp = client.chat.completions.create(model="agent:tools", messages=convo, tools=tools, max_tokens=3)
    assert resp.model_extra["agentd"]["branch"] is None


def test_langchain_chat_openai_two_turns(daemon):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage

    http = _http(daemon)
    llm = langchain_openai.ChatOpenAI(model="agent:lc", base_url=http["base_url"], max_tokens=5, max_retries=0,
                                      api_key=Path(http["token_file"]).read_text().strip())
    messages = [SystemMessage("You are terse."), HumanMessage("Hello!")]
    messages.append(llm.invoke(messages))
    messages.append(HumanMessage("Numbers: 0 1 2"))
    second = llm.invoke(messages)
    assert second.usage_metadata["input_token_details"]["cache_read"] > 0
    history = _history(daemon, "lc")
    assert [m["content"] for m in history] == ["Hello!", messages[2].content, "Numbers: 0 1 2", second.content]


def test_agentctl_http_env_status_and_open(daemon):
    args = [AGENTCTL, "--socket", str(daemon.socket)]
    env = json.loads(subprocess.run(args + ["--json", "http-env"], capture_output=True, text=True, check=True).stdout)
    http = _http(daemon)
    assert env == {"base_url": http["base_url"], "api_key": Path(http["token_file"]).read_text().strip()}
    exports = subprocess.run(args + ["http-env"], capture_output=True, text=True, check=True).stdout
    assert f"export OPENAI_BASE_URL={http['base_url']}" in exports and "export OPENAI_API_KEY=" in exports
    assert http["base_url"] in subprocess.run(args + ["status"], capture_output=True, text=True, check=True).stdout
    url = subprocess.run(args + ["open", "--no-browser"], capture_output=True, text=True, check=True).stdout.strip()
    with httpx.Client() as browser:
        page = browser.get(url, follow_redirects=True)
        assert page.status_code == 200 and "Agents" in page.text
        cookie = next(c for c in browser.cookies.jar)
        assert cookie.has_nonstandard_attr("HttpOnly")
        assert browser.get(http["base_url"] + "/models").status_code == 401  # the cookie is for the page only
        key = Path(http["token_file"]).read_text().strip()
        assert key not in cookie.value  # nor does it hold the key, which would open the API
        with httpx.Client() as other:
            bearer = other.get(http["base_url"] + "/models", headers={"Authorization": f"Bearer {cookie.value}"})
            assert bearer.status_code == 401
        with httpx.Client(cookies={cookie.name: key}) as forger:
            assert forger.get(f"http://{http['address']}/").status_code == 401  # the key is no page cookie either
    assert oct((Path(http["token_file"]).stat().st_mode) & 0o777) == "0o600"


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_status_page_in_headless_chromium(daemon, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium installed (make setup installs Debian's package when run as root)")
    http = _http(daemon)
    key = Path(http["token_file"]).read_text().strip()
    _openai(daemon).chat.completions.create(model="agent:page", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2)
    url = f"http://{http['address']}/login?key={key}"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"]
    shot = tmp_path / "status.png"
    # One launch: the key-bearing URL sets the cookie and redirects to /, whose DOM and
    # screenshot are what a person would see.
    dom = subprocess.run(flags + ["--dump-dom", f"--screenshot={shot}", "--window-size=1100,800", url],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'id="agent-page"' in dom and "memory pressure" in dom and "Quarantined cache files" in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000  # a rendered page


def test_a_turn_after_a_restart_is_served_from_the_disk_cache(tiny_llama_dir, home):
    d = DaemonProc(home, tiny_llama_dir, "--http", "127.0.0.1:0").start()
    try:
        incident = " ".join(["The payment API returns a 500 error when the card token expires during checkout."] * 8)
        convo = [{"role": "user", "content": incident}]
        first = _openai(d).chat.completions.create(model="agent:r", messages=convo, max_tokens=8)
        convo += [{"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": "Why?"}]
        assert d.stop() == 0  # SIGTERM: the cache is flushed
        d.start()
        again = _openai(d).chat.completions.create(model="agent:r", messages=convo, max_tokens=4)
        usage = again.usage
        assert again.model_extra["agentd"]["cache_source"] == "disk"
        assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
        # Only the new turn (and the random reply's re-tokenized tail) is prefilled again.
        assert usage.prompt_tokens_details.cached_tokens >= 0.8 * usage.prompt_tokens
        assert len(_history(d, "r")) == 4
    finally:
        d.kill()


def test_an_explicit_port_that_is_taken_is_a_configuration_error(tiny_llama_dir, home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = DaemonProc(home, tiny_llama_dir, "--http", f"127.0.0.1:{port}")
        with pytest.raises(RuntimeError, match="exited with 78"):
            d.start()
        assert f"cannot serve HTTP on 127.0.0.1:{port}" in d.stderr()
    d = DaemonProc(home, tiny_llama_dir, "--http", "10.1.2.3:80")
    with pytest.raises(RuntimeError, match="exited with 78"):
        d.start()
    assert "not a loopback address" in d.stderr()


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{% for tool_call in message.tool_calls or [] %}<tool_call>{{ tool_call.name or tool_call.function.name }}"
    "{{ tool_call.function.arguments | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_reach_the_chat_template_of_a_model_that_calls_tools(tiny_llama_dir, home):
    model = home / "tool-llama"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    d = DaemonProc(home, model, "--http", "127.0.0.1:0").start()
    try:
        client = _openai(d)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        ask = [{"role": "user", "content": "Weather?"}]
        plain = client.chat.completions.create(model="tool-llama", messages=ask, max_tokens=2)
        with_tools = client.chat.completions.create(model="tool-llama", messages=ask, tools=tools, max_tokens=2)
        assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens  # the template rendered them
        none = client.chat.completions.create(model="tool-llama", messages=ask, tools=tools, tool_choice="none",
                                              max_tokens=2)
        assert none.usage.prompt_tokens == plain.usage.prompt_tokens
        # The stored call renders with its arguments as a mapping (as mlx_lm.server does).
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        convo = ask + [{"role": "assistant", "content": "", "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        client.chat.completions.create(model="agent:w", messages=convo, tools=tools, max_tokens=2)
        assert _history(d, "w")[1]["tool_calls"] == [call]
    finally:
        d.kill()


def test_the_default_port_taken_means_socket_only_with_a_warning(tiny_llama_dir, home):
    from agentd.http_server import DEFAULT_HTTP

    host, port = DEFAULT_HTTP.rsplit(":", 1)
    holder = socket.socket()
    try:
        holder.bind((host, int(port)))  # if something else holds it already, it is taken all the same
        holder.listen()
    except OSError:
        pass
    try:
        d = DaemonProc(home, tiny_llama_dir, env={"AGENTD_HTTP": ""}).start()  # no --http: the default
        try:
            assert _http(d) is None
            assert f"HTTP: {DEFAULT_HTTP} is taken" in d.stderr()
            off = subprocess.run([AGENTCTL, "--socket", str(d.socket), "--json", "http-env"], capture_output=True,
                                 text=True)
            assert off.returncode == 1 and json.loads(off.stdout)["error"]["code"] == "HTTP_OFF"
        finally:
            d.kill()
    finally:
        holder.close()
