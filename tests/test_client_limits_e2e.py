"""Client keys with limits (issue #13, part 1) through a real mitmdump: rpm, concurrency, model
allow-list, expiry, budget — and spend counted from the flow log, so it survives a restart."""

import json
import socket
import sqlite3
import threading
import time

import requests
from click.testing import CliRunner

from claudeflare.cli import cli

from harness import api_key_accounts, db_rows, wait_until

SONNET, HAIKU = "claude-sonnet-4-6", "claude-haiku-4-5"


def client_key(home, *args) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), "client-key", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def ask(proxy, key, model=SONNET, body=None, **headers):
    data = (
        body or json.dumps({"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}).encode()
    )
    return requests.post(
        f"{proxy.url}/v1/messages",
        data=data,
        timeout=30,
        headers={"x-api-key": key, "content-type": "application/json", **headers},
    )


def error_of(response) -> tuple[str, str]:
    body = response.json()
    assert body["type"] == "error" and body["request_id"].startswith("req_")
    return body["error"]["type"], body["error"]["message"]


def test_rpm_refuses_with_retry_after_to_the_next_minute(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    key = client_key(home, "create", "ci", "--rpm", "2")
    proxy = start_proxy(home)
    if time.time() % 60 > 55:  # keep the three requests inside one UTC minute
        time.sleep(61 - time.time() % 60)
    assert [ask(proxy, key).status_code for _ in range(2)] == [200, 200]
    refused = ask(proxy, key)
    assert refused.status_code == 429
    kind, message = error_of(refused)
    assert kind == "rate_limit_error" and "2 request(s) per minute" in message
    assert 1 <= int(refused.headers["retry-after"]) <= 60 - int(time.time() % 60) + 1
    assert len(fake.requests) == 2  # the refused one never went upstream


def test_concurrency_refuses_while_a_slow_request_runs_and_frees_its_slot(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    key = client_key(home, "create", "ci", "--concurrency", "1")
    proxy = start_proxy(home)
    slow = []
    thread = threading.Thread(target=lambda: slow.append(ask(proxy, key, **{"x-fake-first-byte-ms": "1500"})))
    thread.start()
    assert wait_until(lambda: len(fake.requests) == 1)
    second = ask(proxy, key)
    assert second.status_code == 429
    kind, message = error_of(second)
    assert kind == "rate_limit_error" and "1 concurrent request(s)" in message and second.headers["retry-after"] == "1"
    thread.join()
    assert slow[0].status_code == 200
    assert ask(proxy, key).status_code == 200  # the slot came back with the reply


def test_model_allow_list_refuses_other_models_however_the_body_names_them(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    key = client_key(home, "create", "ci", "--models", "claude-haiku-*")
    proxy = start_proxy(home)
    assert ask(proxy, key, HAIKU).status_code == 200
    refused = ask(proxy, key, SONNET)
    assert refused.status_code == 403
    kind, message = error_of(refused)
    assert kind == "permission_error" and SONNET in message and "claude-haiku-*" in message
    # Spellings a byte search would miss: a JSON escape, and a second "model" key (which parsers may take).
    escaped = b'{"model": "claude-sonnet\\u002d4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
    twice = b'{"model": "claude-haiku-4-5", "model": "claude-sonnet-4-6", "max_tokens": 5, "messages": []}'
    assert [ask(proxy, key, body=b).status_code for b in (escaped, twice)] == [403, 403]
    assert len(fake.requests) == 1


def test_an_expired_key_is_refused_until_its_expiry_is_cleared(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    key = client_key(home, "create", "ci", "--expires", "2020-01-31")
    proxy = start_proxy(home)
    refused = ask(proxy, key)
    assert refused.status_code == 401
    kind, message = error_of(refused)
    assert kind == "authentication_error" and "expired at 2020-01-31T00:00:00Z" in message
    client_key(home, "set", "ci", "--clear", "expires")
    assert wait_until(lambda: ask(proxy, key).status_code == 200, timeout=5)


def test_budget_refuses_once_spent_and_still_after_a_restart(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    key = client_key(home, "create", "ci", "--budget-usd", "0.5", "--per", "day")
    other = client_key(home, "create", "other", "--budget-usd", "0.5", "--per", "day")
    proxy = start_proxy(home)
    # 200k input tokens of Sonnet at $3 per million: $0.60, over the budget in one request.
    assert ask(proxy, key, **{"x-fake-input-tokens": "200000"}).status_code == 200
    refused = ask(proxy, key)
    assert refused.status_code == 429
    kind, message = error_of(refused)
    assert kind == "rate_limit_error" and "$0.60 of its $0.50 budget per day" in message
    midnight = (time.time() // 86400 + 1) * 86400
    assert abs(int(refused.headers["retry-after"]) - (midnight - time.time())) <= 2
    assert ask(proxy, other).status_code == 200  # one client's spend is its own
    assert len(db_rows(home, "status = 200", expect=2)) == 2

    proxy.stop()
    proxy = start_proxy(home)
    assert ask(proxy, key).status_code == 429  # counted from the flow log, not from memory
    assert ask(proxy, other).status_code == 200

    listed = {r["name"]: r for r in json.loads(client_key(home, "list", "--json"))}
    assert (
        round(listed["ci"]["spend_usd"], 2) == 0.6
        and listed["ci"]["budget_usd"] == 0.5
        and listed["ci"]["per"] == "day"
    )
    assert "$0.60 of $0.50/day" in client_key(home, "list")

    def published():  # the dashboard's table, from the running proxy
        conn = sqlite3.connect(home / "claudeflare.db")
        try:
            return {r[0]: r[1:] for r in conn.execute("select name, spend_usd, budget_usd from client_limits")}
        finally:
            conn.close()

    assert wait_until(lambda: round(published().get("ci", (0,))[0], 2) == 0.6)
    assert published()["ci"][1] == 0.5


def test_a_client_that_hangs_up_mid_body_gives_its_slot_back(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    key = client_key(home, "create", "ci", "--concurrency", "1")
    proxy = start_proxy(home)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(
            f"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1:{proxy.port}\r\nx-api-key: {key}\r\n"
            'content-type: application/json\r\ncontent-length: 1000\r\n\r\n{"model"'.encode()
        )
        time.sleep(0.5)  # the head is in: the slot is taken
        assert ask(proxy, key).status_code == 429
    assert wait_until(lambda: ask(proxy, key).status_code == 200, timeout=5)
