"""Vertex AI accounts through a real mitmdump, against tests/fake_vertex.py: google-auth's
service-account flow, rawPredict and streamRawPredict with the model in the URL, Google's 429
RESOURCE_EXHAUSTED as a limit of the account, and no token anywhere it must not be."""

import json
import os

import anthropic
import httpx

from claudeflare.config import ensure_home

from fake_vertex import FakeVertex
from harness import api_key_accounts, db_rows, raw_stream, sse_events


def add_vertex(home, vertex, tmp_path, priority=0, adc=False):
    """A vertex account with a service-account file: named in accounts.toml, or found by ADC
    (GOOGLE_APPLICATION_CREDENTIALS, which the returned environment sets)."""
    ensure_home(home)
    sa = tmp_path / "sa.json"
    sa.write_text(json.dumps(vertex.service_account()))
    os.chmod(sa, 0o600)
    with open(home / "accounts.toml", "a") as f:
        f.write(
            f'\n[[accounts]]\nname = "vertex"\nprovider = "vertex"\nregion = "us-east5"\nbase_url = "{vertex.url}"\n'
            f"{'' if adc else f'credentials_file = {json.dumps(str(sa))}'}\npriority = {priority}\n"
        )
    return {"GOOGLE_APPLICATION_CREDENTIALS": str(sa), "GCE_METADATA_HOST": "127.0.0.1:9"} if adc else None


def test_vertex_serves_the_sdk_and_raw_streams_with_a_google_token(fake, home, start_proxy, tmp_path):
    with FakeVertex() as vertex:
        add_vertex(home, vertex, tmp_path)
        proxy = start_proxy(home)
        client = anthropic.Anthropic(base_url=proxy.url, api_key="client-key-ignored", max_retries=0)
        reply = client.messages.create(
            model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.content[0].text == "hello from vertex" and reply.usage.output_tokens == 7
        with client.messages.stream(
            model="claude-haiku-4-5-20251001", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        ) as s:
            assert s.get_final_text() == "hello from vertex"
        r = raw_stream(proxy.url, "claude-opus-4-1")
        events = sse_events(r.text)
        assert r.status_code == 200 and events[0] == "event: message_start" and events[-1] == "event: message_stop"

        assert [(c["region"], c["model"], c["method"]) for c in vertex.requests] == [
            ("us-east5", "claude-sonnet-4-5@20250929", "rawPredict"),
            ("us-east5", "claude-haiku-4-5@20251001", "streamRawPredict"),
            ("us-east5", "claude-opus-4-1@20250805", "streamRawPredict"),
        ]
        sent = json.loads(vertex.requests[0]["body"])
        assert sent["anthropic_version"] == "vertex-2023-10-16" and "model" not in sent and sent["max_tokens"] == 20
        assert vertex.token_calls == 1  # one token, kept until it expires
        assert not [r for r in fake.requests if r["path"] == "/v1/messages"]

        unknown = httpx.post(
            f"{proxy.url}/v1/messages",
            timeout=30,
            json={"model": "claude-sonnet-0", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert unknown.status_code == 404 and unknown.json()["type"] == "error"
        assert unknown.json()["error"] == {
            "type": "not_found_error",
            "message": "Vertex AI: Publisher Model claude-sonnet-0 was not found.",
        }

        rows = db_rows(home, expect=4)
        assert [(r["provider"], r["status"], r["stream"]) for r in rows] == [
            ("vertex", 200, 0),
            ("vertex", 200, 1),
            ("vertex", 200, 1),
            ("vertex", 404, 0),
        ]
        assert [r["output_tokens"] for r in rows[:3]] == [7, 7, 7]
        assert {r["path"] for r in rows} == {
            "/v1/messages"
        }  # the client's path, not Vertex's (message_ok counts it)  # usage read from the JSON and beside the streams
        token = next(iter(vertex.tokens))
        proxy.stop()
        for where in (home / "claudeflare.db", proxy.log):
            assert token not in where.read_bytes().decode("latin-1")
        assert "PRIVATE KEY" not in proxy.output()


def test_resource_exhausted_limits_the_vertex_account_and_traffic_moves(fake, home, start_proxy, tmp_path):
    api_key_accounts(fake, home, ("key", 1, 1))  # priority 1: takes traffic only while vertex can't
    with FakeVertex() as vertex:
        env = add_vertex(home, vertex, tmp_path, priority=0, adc=True)  # Application Default Credentials
        vertex.limit = 1
        proxy = start_proxy(home, env=env)

        def ask():
            body = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
            return httpx.post(f"{proxy.url}/v1/messages", timeout=30, json=body)

        assert ask().json()["content"][0]["text"] == "hello from vertex"
        moved = ask()
        assert moved.status_code == 200 and moved.json()["model"] == "claude-sonnet-4-5"  # served by the key
        assert ask().status_code == 200
        assert [c["status"] for c in vertex.requests] == [200, 429]  # benched after its 429: not asked again
        assert [r["account"] for r in fake.requests if r["path"] == "/v1/messages"] == ["key", "key"]
        rows = db_rows(home, expect=3)
        assert [(r["account"], r["provider"]) for r in rows] == [
            ("vertex", "vertex"),
            ("key", "anthropic"),
            ("key", "anthropic"),
        ]
        assert json.loads(rows[1]["failovers"]) == [{"account": "vertex", "status": 429, "reason": "limited"}]
