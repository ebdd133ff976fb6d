"""`agentctl demo` on a short brief and the real default model: the story holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentctl import demo_script as story
from daemonproc import DaemonProc

pytestmark = pytest.mark.model

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def figures(default_model_dir):
    r = subprocess.run(
        [sys.executable, "-m", "agentctl.cli", "--json", "demo", "--short", "--max-tokens", str(MAX_TOKENS),
         "--model", str(default_model_dir)],
        capture_output=True, text=True, timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Results" in r.stderr  # the story and tables go to stderr under --json
    return json.loads(r.stdout)


def test_session_2_reply_comes_from_the_disk_cache_of_a_new_daemon(figures):
    assert figures["restart"]["exit_code"] == 0
    assert figures["restart"]["new_pid"] != figures["session1_daemon"]["pid"]
    assert figures["session1"]["specialist"]["cache_source"] == "new"
    s2 = figures["session2"]["specialist"]
    assert s2["cache_source"] == "disk"
    assert s2["cached_tokens"] >= figures["session1"]["specialist"]["prompt_tokens"]
    assert figures["rebuild"]["cache_source"] == "rebuilt"
    assert figures["rebuild"]["prefilled_tokens"] > s2["prefilled_tokens"]
    # The fork was taken before the question: both saw exactly the same prompt.
    assert figures["rebuild"]["prompt_tokens"] == s2["prompt_tokens"]
    assert set(figures["saved_agents"]) == {"specialist", "analyst", "coordinator"}


def test_restored_specialist_answers_exactly_as_one_that_never_left_memory(figures, default_model_dir, home):
    with DaemonProc(home, default_model_dir) as d:
        with d.client(timeout=1200) as c:
            role, _ = story.ROLES["specialist"]
            c.create("twin", role=role, system=story.system_prompt("specialist", short=True))
            first = c.chat("twin", story.USER_REPORT, max_tokens=MAX_TOKENS).wait()
            follow_up = c.chat("twin", story.FOLLOW_UP, max_tokens=MAX_TOKENS).wait()
    # A turn that runs alone is token-exact across processes: the demo's twin that answered
    # one after another said exactly this.
    assert first["text"] == figures["concurrent"]["alone_texts"]["specialist"]
    assert follow_up["cache_source"] == "memory"
    if figures["concurrent"]["same_answers"]:
        # The demo's specialist (answering beside the analyst, batched) said the same, so its
        # transcript is this twin's: restored from disk, it answers as this one from memory.
        assert first["text"] == figures["session1"]["specialist"]["text"]
        assert follow_up["text"] == figures["session2"]["specialist"]["text"]


def test_the_specialist_and_the_analyst_answered_at_once(figures):
    cc = figures["concurrent"]
    assert cc["at_once_s"] > 0 and cc["one_after_another_s"] > 0
    assert figures["session1"]["specialist"]["cache_source"] == figures["session1"]["analyst"]["cache_source"] == "new"
    assert set(cc["alone_texts"]) == {"specialist", "analyst"}
