"""Portable agents: `agentctl export` from one home, `agentctl import` into another daemon,
and every kind of bad bundle refused with one line, changing nothing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentctl.client import AgentdError, Client, ConnectionLost
from agentd import bundle, responses
from agentd import protocol as p
from daemonproc import DaemonProc

AGENTCTL = str(Path(sys.executable).parent / "agentctl")
SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them."
TURNS = (
    "The payment API returns a 500 error when the card token expires during checkout.",
    "What are the detailed steps to fix that API bug from our previous discussion?",
)
NEXT = "Business impact: revenue, customers, support tickets?"


def chat(client: Client, name: str, message: str, max_tokens: int = 12) -> dict:
    stream = client.chat(name, message, max_tokens=max_tokens)
    pieces = list(stream)
    result = stream.wait()
    assert "".join(pieces) == result["text"]
    return result


def agentctl(d: DaemonProc, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([AGENTCTL, "--socket", str(d.socket), *args], input=input, capture_output=True, timeout=120)


def home_files(d: DaemonProc) -> set[str]:
    """Every file of the daemon's home but the records, the lock and the log (which change anyway)."""
    data = d.home / "data"
    return {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()
            and not p.name.startswith("agents.db") and p.name != "agentd.lock" and p.parent.name != "log"}


def reframe(blob: bytes, edit) -> bytes:
    """A bundle whose header `edit` changed, with sizes and checksum made consistent again:
    what a careless or hostile tool would write. Tensor data stays as it was."""
    _, version, hlen, dlen = bundle.PREAMBLE.unpack_from(blob)
    start = bundle.PREAMBLE.size
    header = json.loads(blob[start:start + hlen])
    edit(header)
    raw = json.dumps(header).encode()
    data = blob[start + hlen:start + hlen + dlen]
    body = bundle.PREAMBLE.pack(bundle.MAGIC, version, len(raw), len(data)) + raw + data
    return body + hashlib.sha256(body).digest()


def resum(body: bytes) -> bytes:
    """`body` (a bundle without its trailer) with a valid trailer."""
    return body + hashlib.sha256(body).digest()


# ---- the round trip ---------------------------------------------------------------------


def _round_trip(tmp: Path, model: Path, max_tokens: int, *, turns=TURNS) -> tuple[dict, dict, dict]:
    """Chat in home A (never saved), export with agentctl, then the original's next reply;
    import into home B (a new daemon), and the imported agent's next reply."""
    bundle_path = tmp / "x.agent"
    with DaemonProc(tmp / "a", model, "--flush-interval", "3600") as a:
        with a.client() as c:
            c.create("x", role="Technical Specialist", system=SYSTEM)
            for message in turns:
                chat(c, "x", message, max_tokens=max_tokens)
            assert c.show("x")["agent"]["dirty"] is True  # the latest turns exist only in memory
            history = c.history("x")["messages"]
        r = agentctl(a, "--json", "export", "x", "-o", str(bundle_path))
        assert r.returncode == 0, r.stderr
        exported = json.loads(r.stdout)
        with a.client() as c:
            original = chat(c, "x", NEXT, max_tokens=max_tokens)
    assert exported["bytes"] == bundle_path.stat().st_size
    assert exported["sha256"] == hashlib.sha256(bundle_path.read_bytes()).hexdigest()
    with DaemonProc(tmp / "b", model) as b:
        r = agentctl(b, "--json", "import", str(bundle_path))
        assert r.returncode == 0, r.stderr
        imported = json.loads(r.stdout)
        with b.client() as c:
            assert c.history("x")["messages"] == history
            again = chat(c, "x", NEXT, max_tokens=max_tokens)
    assert imported["cache_imported"] is True and imported["cache_tokens"] == exported["cache_tokens"]
    assert (imported["bytes"], imported["sha256"]) == (exported["bytes"], exported["sha256"])
    return exported, original, again


def test_an_imported_gemma3_agent_whose_window_wrapped_continues_token_for_token(tmp_path, tiny_gemma_dir):
    exported, original, again = _round_trip(tmp_path, tiny_gemma_dir, 12)
    assert exported["cache_tokens"] > 16 * 3  # the 16-token sliding windows have wrapped
    assert original["cache_source"] == "memory"
    assert again["cache_source"] == "disk"
    assert again["text"] == original["text"]
    # From the cache, not re-prefilled: the whole exported context is the prompt's prefix.
    assert again["cached_tokens"] == original["cached_tokens"] == exported["cache_tokens"]
    assert again["prefilled_tokens"] == original["prefilled_tokens"] == again["prompt_tokens"] - exported["cache_tokens"]


@pytest.mark.model
def test_an_imported_agent_of_the_default_model_continues_token_for_token(tmp_path, default_model_dir):
    exported, original, again = _round_trip(tmp_path, default_model_dir, 8, turns=TURNS[:1])
    assert again["cache_source"] == "disk"
    assert again["text"] == original["text"]
    assert again["cached_tokens"] == original["cached_tokens"] == exported["cache_tokens"]
    assert again["prefilled_tokens"] == again["prompt_tokens"] - exported["cache_tokens"]


def test_another_models_bundle_brings_its_transcript_and_the_cache_is_rebuilt(tmp_path, tiny_gemma_dir, tiny_llama_dir):
    with DaemonProc(tmp_path / "a", tiny_gemma_dir) as a:
        with a.client() as c:
            c.create("x", system=SYSTEM)
            chat(c, "x", TURNS[0])
            history = c.history("x")["messages"]
            blob = bytearray()
            c.export("x", blob.extend)
    (tmp_path / "x.agent").write_bytes(blob)
    with DaemonProc(tmp_path / "b", tiny_llama_dir) as b:
        r = agentctl(b, "import", str(tmp_path / "x.agent"))
        assert r.returncode == 0, r.stderr
        line = r.stdout.decode()
        assert "without its KV cache: it was made by another model (tiny-gemma3;" in line
        assert "rebuilt from the transcript on first use" in line
        assert home_files(b) == set()  # the record only: no cache file
        with b.client() as c:
            assert c.history("x")["messages"] == history
            assert chat(c, "x", NEXT)["cache_source"] == "rebuilt"


def test_export_to_stdout_import_from_stdin_under_a_new_name(tmp_path, tiny_llama_dir):
    with DaemonProc(tmp_path / "a", tiny_llama_dir) as a:
        with a.client() as c:
            c.create("x", system=SYSTEM)
            chat(c, "x", TURNS[0])
        out = agentctl(a, "export", "x", "-o", "-")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(bundle.MAGIC) and b"Exported agent x to stdout" in out.stderr
        r = agentctl(a, "import", "-", "--name", "y", input=out.stdout)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().startswith("Imported agent y (2 messages) with its KV cache")
        with a.client() as c:
            assert c.history("y") == c.history("x")
            assert chat(c, "y", NEXT)["text"] == chat(c, "x", NEXT)["text"]
        assert agentctl(a, "--json", "export", "x", "-o", "-").returncode == 2  # stdout is the bundle's


# ---- bad bundles ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def victim(tmp_path_factory, tiny_llama_dir):
    """One daemon with an agent 'x' and a good bundle of it; each bad input goes at it."""
    root = tmp_path_factory.mktemp("victim")
    with DaemonProc(root, tiny_llama_dir) as d:
        with d.client() as c:
            c.create("x", system=SYSTEM)
            chat(c, "x", TURNS[0])
            good = bytearray()
            c.export("x", good.extend)
            c.save()
        yield d, bytes(good), root


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1:]


def _tensor_offset(blob: bytes) -> int:
    _, _, hlen, _ = bundle.PREAMBLE.unpack_from(blob)
    return bundle.PREAMBLE.size + hlen


def _preamble(blob: bytes, **changes) -> bytes:
    magic, version, hlen, dlen = bundle.PREAMBLE.unpack_from(blob)
    fields = {"magic": magic, "version": version, "hlen": hlen, "dlen": dlen, **changes}
    return bundle.PREAMBLE.pack(*fields.values()) + blob[bundle.PREAMBLE.size:]


def _set(path: str, value):
    def edit(h):
        node = h
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


def _drop_last_token(h):
    h["cache"]["tokens"].pop()
    h["cache"]["n_tokens"] -= 1


BAD = {
    "truncated": (lambda g: g[: len(g) // 2], "BAD_BUNDLE", "the bundle is truncated"),
    "truncated-in-the-preamble": (lambda g: g[:10], "BAD_BUNDLE", "the bundle is truncated"),
    "empty": (lambda g: b"", "BAD_BUNDLE", "the bundle is truncated (0 bytes)"),
    "byte-flipped-in-the-tensors": (lambda g: _flip(g, _tensor_offset(g) + 1000), "BAD_BUNDLE", "checksum mismatch"),
    "byte-flipped-in-the-header": (lambda g: _flip(g, bundle.PREAMBLE.size + 40), "BAD_BUNDLE", ""),
    "byte-flipped-in-the-checksum": (lambda g: _flip(g, len(g) - 1), "BAD_BUNDLE", "checksum mismatch"),
    "oversized-cache": (lambda g: _preamble(g, dlen=bundle.MAX_DATA_BYTES + 1), "BAD_BUNDLE",
                        "the bundle's cache would be"),
    "oversized-header": (lambda g: _preamble(g, hlen=bundle.MAX_HEADER_BYTES + 1), "BAD_BUNDLE",
                         "the bundle's header would be"),
    "longer-than-it-says": (lambda g: g + b"\0" * 10, "BAD_BUNDLE", "longer than its header says"),
    "wrong-version": (lambda g: resum(_preamble(g, version=2)[:-32]), "BAD_BUNDLE",
                      "bundle format version 2; this agentd reads version 1"),
    "wrong-version-in-the-header": (lambda g: reframe(g, _set("format_version", 7)), "BAD_BUNDLE",
                                    "bundle format version 7"),
    "not-a-bundle-text": (lambda g: b"hello, I am a text file\n" * 10, "BAD_BUNDLE", "not an agentd agent bundle"),
    "invalid-name-inside": (lambda g: reframe(g, _set("agent.name", "a/../../etc/evil")), "INVALID_NAME",
                            "the bundle's agent name 'a/../../etc/evil' may only contain"),
    "taken-name": (lambda g: g, "ALREADY_EXISTS", "agent 'x' already exists"),
    "lies-about-a-tensor-size": (lambda g: reframe(g, _set("cache.tensors.0.nbytes", 10)), "BAD_BUNDLE",
                                 "claims 10 bytes"),
    "lies-about-a-tensor-shape": (lambda g: reframe(g, _set("cache.tensors.0.shape", [1, 2, 3, 4])), "BAD_BUNDLE",
                                  "its shape and dtype make"),
    "lies-about-the-section-size": (lambda g: resum(_preamble(g, dlen=bundle.PREAMBLE.unpack_from(g)[3] - 8)[:-40]),
                                    "BAD_BUNDLE", "the file holds"),
    "lies-about-n_tokens": (lambda g: reframe(g, _set("cache.n_tokens", 3)), "BAD_BUNDLE",
                            "n_tokens 3 does not match"),
    "lies-about-its-token-count": (lambda g: reframe(g, _drop_last_token), "BAD_BUNDLE",
                                   "the header says"),
    "unknown-cache-class": (lambda g: reframe(g, _set("cache.layers.0.class", "os.system")), "BAD_BUNDLE",
                            "unknown cache class 'os.system'"),
    "tensor-of-an-unknown-dtype": (lambda g: reframe(g, _set("cache.tensors.0.dtype", "object")), "BAD_BUNDLE",
                                   "dtype 'object'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_bundle_is_refused_in_one_line_and_changes_nothing(victim, case, tmp_path):
    d, good, _ = victim
    make, code, message = BAD[case]
    path = tmp_path / "bad.agent"
    path.write_bytes(make(good))
    with d.client() as c:
        before = c.list()["agents"]
    files = home_files(d)
    own_name = case in ("taken-name", "invalid-name-inside")  # the bundle's own name is the point
    args = ["import", str(path)] if own_name else ["import", str(path), "--name", "fresh"]
    r = agentctl(d, *args)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("Error: ") and message in err, err
    assert "Traceback" not in err
    r = agentctl(d, "--json", *args)
    assert json.loads(r.stdout)["error"]["code"] == code
    with d.client() as c:
        assert c.list()["agents"] == before
    assert home_files(d) == files


def test_an_invalid_or_taken_new_name_is_refused_before_the_upload(victim, tmp_path):
    d, good, _ = victim
    path = tmp_path / "good.agent"
    path.write_bytes(good)
    r = agentctl(d, "--json", "import", str(path), "--name", "../x")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "INVALID_NAME"
    r = agentctl(d, "--json", "import", str(path), "--name", "X")  # differs from 'x' only in case
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "ALREADY_EXISTS"
    with d.client() as c:
        assert [a["name"] for a in c.list()["agents"]] == ["x"]


def test_a_cache_file_is_not_a_bundle_and_a_missing_file_is_one_line(victim, tmp_path):
    d, _, root = victim
    r = agentctl(d, "import", str(root / "data" / "caches" / "agents" / "x" / "manifest.json"), "--name", "y")
    assert r.returncode == 1 and r.stderr.decode() == "Error: not an agentd agent bundle\n"
    r = agentctl(d, "import", str(tmp_path / "nope.agent"))
    assert r.returncode == 1 and r.stderr.decode().startswith("Error: cannot read") and r.stderr.count(b"\n") == 1


def test_export_refusals_leave_no_file(victim, tmp_path, monkeypatch):
    d, _, _ = victim
    monkeypatch.chdir(tmp_path)  # agentctl export writes NAME.agent in the current directory
    r = agentctl(d, "--json", "export", "ghost")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "NOT_FOUND"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x.agent").write_bytes(b"keep me")
    r = agentctl(d, "export", "x")
    assert r.returncode == 1 and "exists; give --force" in r.stderr.decode()
    assert (tmp_path / "x.agent").read_bytes() == b"keep me"
    assert agentctl(d, "export", "x", "--force").returncode == 0
    assert (tmp_path / "x.agent").read_bytes().startswith(bundle.MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.agent"]


def test_an_upload_out_of_step_is_an_error_and_the_daemon_keeps_serving(victim):
    d, good, _ = victim
    with d.client() as c:
        with pytest.raises(AgentdError, match="a chunk outside an import upload"):
            c.request(p.Chunk(b"abc"))
        # An upload interrupted by another request: the error, then the daemon hangs up.
        rid = c._send(p.Import(name="z"))
        c._send_frame(p.Chunk(good[:100]), rid)
        c._send_frame(p.Ping(), rid)
        frame = c._recv_response(rid)
        assert isinstance(frame, responses.Error) and frame.code == "BAD_REQUEST"
        assert "expected the import's chunks" in frame.message
        with pytest.raises(ConnectionLost):
            c._recv_response(rid)
    with d.client() as c:
        assert [a["name"] for a in c.list()["agents"]] == ["x"]


# ---- a crash during an import leaves nothing or everything --------------------------------

CRASH = r"""
import os, sys
from pathlib import Path
from agentd import bundle, portable
from agentd.agents import AgentStore
from agentd.engine import Engine

home, model, blob, where = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]).read_bytes(), sys.argv[4]
store = AgentStore(home, Engine(model))
if where == "before-the-rename":
    real = store._replace
    def write_then_die(tmp_write):
        def write(tmp):
            tmp_write(tmp)
            os._exit(137)  # the temp file is whole, the rename never happens
        return write
    store._replace = lambda path, write: real(path, write_then_die(write))
else:  # the cache file is in place, the record not yet
    store.records.add = lambda rec: os._exit(137)
portable.import_agent(store, bundle.read_bytes(blob), "y")
"""


@pytest.mark.parametrize("where", ["before-the-rename", "before-the-record"])
def test_a_crash_during_an_import_leaves_nothing_or_everything(victim, tiny_llama_dir, tmp_path, where):
    d, good, _ = victim
    (tmp_path / "x.agent").write_bytes(good)
    home = tmp_path / "h" / "data"
    home.mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", CRASH, str(home), str(tiny_llama_dir), str(tmp_path / "x.agent"), where],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 137, r.stderr
    with DaemonProc(tmp_path / "h", tiny_llama_dir) as after:
        with after.client() as c:
            names = [a["name"] for a in c.list()["agents"]]
            if where == "before-the-rename":
                assert names == [] and home_files(after) == set()
            else:
                assert names == ["y"]
                assert c.history("y")["messages"] == bundle.read_bytes(good).record["messages"]
                assert chat(c, "y", NEXT)["cache_source"] == "disk"


# ---- the reader, in pieces --------------------------------------------------------------


def test_the_reader_gives_the_same_bundle_whatever_the_pieces(victim):
    _, good, _ = victim
    whole = bundle.read_bytes(good)
    for size in (1, 7, 28, 4096):
        reader = bundle.BundleReader()
        for lo in range(0, len(good), size):
            reader.feed(good[lo:lo + size])
        got = reader.finish()
        assert (got.record, got.model, got.sha256, got.cache.tokens) == (whole.record, whole.model, whole.sha256,
                                                                         whole.cache.tokens)
        assert bytes(got.cache.data) == bytes(whole.cache.data)


# ---- over HTTP --------------------------------------------------------------------------


def test_export_and_import_over_http(tmp_path, tiny_llama_dir):
    import httpx

    def base_and_key(d: DaemonProc) -> tuple[str, dict]:
        with d.client() as c:
            http = c.status()["http"]
        return http["base_url"], {"Authorization": f"Bearer {Path(http['token_file']).read_text().strip()}"}

    with DaemonProc(tmp_path / "a", tiny_llama_dir, "--http", "127.0.0.1:0") as a, \
            DaemonProc(tmp_path / "b", tiny_llama_dir, "--http", "127.0.0.1:0") as b:
        with a.client() as c:
            c.create("x", system=SYSTEM)
            chat(c, "x", TURNS[0])
        url, auth = base_and_key(a)
        assert httpx.get(f"{url}/agents/x/export").status_code == 401  # the key is needed
        missing = httpx.get(f"{url}/agents/ghost/export", headers=auth)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        with httpx.stream("GET", f"{url}/agents/x/export", headers=auth, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
            blob = b"".join(r.iter_bytes())
        with a.client() as c:
            original = chat(c, "x", NEXT)
        url, auth = base_and_key(b)
        bad = httpx.post(f"{url}/agents/import", headers=auth, content=blob[:-5], timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_bundle"
        assert "truncated" in bad.json()["error"]["message"]

        def pieces():
            for lo in range(0, len(blob), 100_000):
                yield blob[lo:lo + 100_000]

        r = httpx.post(f"{url}/agents/import", params={"name": "y"}, headers=auth, content=pieces(), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["cache_imported"] is True and r.json()["agent"]["name"] == "y"
        again = httpx.post(f"{url}/agents/import", params={"name": "y"}, headers=auth, content=blob, timeout=60)
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_exists"
        with b.client() as c:
            assert [x["name"] for x in c.list()["agents"]] == ["y"]
            imported = chat(c, "y", NEXT)
    assert imported["cache_source"] == "disk" and imported["text"] == original["text"]
    assert imported["cached_tokens"] == original["cached_tokens"]


def test_a_bundle_made_with_other_kv_bits_brings_its_transcript_only(tmp_path):
    import tinymodels

    model = tinymodels.make_tiny_llama(tmp_path / "hd32", head_dim=32)  # mlx quantizes groups of 32+
    with DaemonProc(tmp_path / "a", model, "--kv-bits", "8", "--kv-group-size", "32") as a:
        with a.client() as c:
            c.create("x", system=SYSTEM)
            chat(c, "x", TURNS[0])
            blob = bytearray()
            c.export("x", blob.extend)
    with DaemonProc(tmp_path / "b", model) as b:
        with b.client() as c:
            result = c.import_([bytes(blob)])
            assert result["cache_imported"] is False
            assert result["cache_reason"] == ("it was made with --kv-bits 8 (group 32); "
                                              "this daemon runs a full-precision cache")
            assert chat(c, "x", NEXT)["cache_source"] == "rebuilt"


def test_an_upload_cut_off_by_a_half_close_is_answered_and_imports_nothing(victim):
    """A client that sends `import` and then half-closes (nc -N) gets one error frame saying
    the upload ended early, instead of a silent hang-up; nothing is imported."""
    import socket
    import struct

    from agentd.framing import decode_body, encode_frame

    victim, _, _ = victim
    before = home_files(victim)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(victim.socket))
    try:
        s.sendall(encode_frame(p.Hello(protocol=p.PROTOCOL_VERSION).to_wire(1))
                  + encode_frame(p.Import(name="cutoff").to_wire(2)))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    frames = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        frames.append(decode_body(data[4:4 + n]))
        data = data[4 + n:]
    assert [f["type"] for f in frames] == ["result", "error"]
    assert frames[1]["id"] == 2 and "ended before its last" in frames[1]["message"]
    with victim.client() as c:
        assert "cutoff" not in {a["name"] for a in c.list()["agents"]}
    assert home_files(victim) == before
