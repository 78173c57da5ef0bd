"""`claudeflare tui` in a real terminal (tmux) beside a real mitmdump: the screen after traffic and
after pausing an account with a key press."""

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from claudeflare.accounts import load_accounts

from harness import api_key_accounts, db_rows, wait_until

CLAUDEFLARE = Path(sys.executable).parent / "claudeflare"


@pytest.fixture
def tmux(tmp_path):
    """A tmux server of this test's own (its own socket), killed at the end."""
    if not shutil.which("tmux"):
        pytest.fail("tmux is missing: scripts/setup installs it")
    socket = f"claudeflare-tui-{uuid.uuid4().hex[:8]}"

    def run(*args):
        return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=10)

    yield run
    run("kill-server")


def test_the_tui_shows_traffic_and_pauses_an_account(fake, home, start_proxy, tmux):
    api_key_accounts(fake, home, ("alpha", 1), ("beta", 1))
    proxy = start_proxy(home)
    env = f"CLAUDEFLARE_HOME={home} TERM=xterm-256color"
    started = tmux("new-session", "-d", "-x", "200", "-y", "50", f"env {env} {CLAUDEFLARE} tui")
    assert started.returncode == 0, started.stderr

    def screen() -> str:
        return tmux("capture-pane", "-p").stdout

    assert wait_until(lambda: "alpha" in screen() and "beta" in screen(), timeout=20), screen()
    assert wait_until(lambda: "No proxy running" not in screen(), timeout=10), screen()
    for _ in range(3):
        reply = requests.post(
            f"{proxy.url}/v1/messages",
            timeout=10,
            json={"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert reply.status_code == 200
    db_rows(home, expect=3)
    assert wait_until(lambda: "3 requests" in screen() and screen().count("claude-sonnet-4-5") >= 3, timeout=10), (
        screen()
    )

    tmux("send-keys", "p")  # the cursor is on the first account
    assert wait_until(lambda: load_accounts(home).accounts[0].paused, timeout=10), screen()
    assert wait_until(
        lambda: any(line.lstrip("│ ").startswith("alpha") and "paused" in line for line in screen().splitlines()),
        timeout=10,
    ), screen()
    assert not load_accounts(home).accounts[1].paused

    proxy.stop()
    assert wait_until(lambda: "No proxy running" in screen(), timeout=20), screen()
