"""End to end: Files and Message Batches stay with the account that created them (contract §10),
through a real mitmdump, the fake upstream's per-account files and batches, the SDK and raw HTTP."""

import json
import sqlite3
import time

import anthropic
import requests
from click.testing import CliRunner

from claudeflare.cli import cli

from harness import add_account, api_key_accounts, db_rows, key_for, wait_until

MODEL = "claude-sonnet-4-6"
FILES_BETA = "files-api-2025-04-14"
HEADERS = {"x-api-key": "client", "anthropic-version": "2023-06-01", "anthropic-beta": FILES_BETA}


def sdk(proxy):
    return anthropic.Anthropic(base_url=proxy.url, api_key="client-side-key-ignored", max_retries=0)


def two_accounts(fake, home, start_proxy):
    """Two API-key accounts taking turns: without pinning, every other call would reach the wrong one."""
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    return start_proxy(home, "--set", "claudeflare_strategy=round-robin")


def owners_table(home):
    conn = sqlite3.connect(home / "claudeflare.db")
    try:
        return dict(conn.execute("select id, account from resources").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def ask_about(proxy, file_id, **extra):
    body = {
        "model": MODEL,
        "max_tokens": 20,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "document", "source": {"type": "file", "file_id": file_id}},
                    {"type": "text", "text": "Sum it up"},
                ],
            }
        ],
    }
    return requests.post(f"{proxy.url}/v1/messages", headers={**HEADERS, **extra}, json=body, timeout=30)


def last_account(fake, path):
    return [r["account"] for r in fake.requests if r["path"] == path][-1]


def test_files_go_to_their_owner_and_list_merged(fake, home, start_proxy):
    proxy = two_accounts(fake, home, start_proxy)
    client = sdk(proxy)
    ids = [client.beta.files.upload(file=(f"{i}.txt", b"text %d" % i, "text/plain")).id for i in range(4)]
    owner = {i: fake.resources.owner(i) for i in ids}
    assert sorted(owner.values()) == ["a", "a", "b", "b"]
    assert wait_until(lambda: owners_table(home) == owner)

    for file_id in ids:  # round-robin would send every other one to the account without it
        meta = client.beta.files.retrieve_metadata(file_id)
        assert meta.id == file_id and last_account(fake, f"/v1/files/{file_id}") == owner[file_id]
        reply = ask_about(proxy, file_id)
        assert reply.status_code == 200, reply.text
        assert last_account(fake, "/v1/messages") == owner[file_id]

    # The list: every account's files, newest first, paged by the SDK over the merged order.
    assert [f.id for f in client.beta.files.list()] == ids[::-1]
    first = requests.get(f"{proxy.url}/v1/files", params={"limit": 3}, headers=HEADERS, timeout=10).json()
    assert [f["id"] for f in first["data"]] == ids[:0:-1] and first["has_more"] is True and first["last_id"] == ids[1]
    rest = requests.get(f"{proxy.url}/v1/files", params={"after_id": ids[1]}, headers=HEADERS, timeout=10).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False
    newer = requests.get(
        f"{proxy.url}/v1/files", params={"before_id": ids[1], "limit": 1}, headers=HEADERS, timeout=10
    ).json()
    assert [f["id"] for f in newer["data"]] == [ids[2]]
    assert [f.id for f in client.beta.files.list(limit=1)] == ids[::-1]  # SDK auto-paging via next_page

    bad = requests.get(f"{proxy.url}/v1/files", params={"limit": "0"}, headers=HEADERS, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"

    client.beta.files.delete(ids[0])
    assert fake.resources.owner(ids[0]) is None
    assert wait_until(lambda: ids[0] not in owners_table(home))
    rows = db_rows(home, "path = '/v1/files' and method = 'GET'", expect=6)
    assert all(r["account"] is None and r["status"] in (200, 400) for r in rows)
    assert {r["attempts"] for r in rows if r["status"] == 200} == {2}


def test_batches_stay_with_their_owner_across_a_restart(fake, home, start_proxy, tmp_path):
    proxy = two_accounts(fake, home, start_proxy)
    fake.resources.batch_seconds = 0.3
    client = sdk(proxy)
    params = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    ids = [client.messages.batches.create(requests=[{"custom_id": f"r{i}", "params": params}]).id for i in range(2)]
    owner = {i: fake.resources.owner(i) for i in ids}
    assert sorted(owner.values()) == ["a", "b"]
    assert [b.id for b in client.messages.batches.list()] == ids[::-1]
    assert wait_until(lambda: owners_table(home) == owner)
    proxy.stop()

    proxy = start_proxy(home, "--set", "claudeflare_strategy=round-robin")  # owners come back from the database
    client = sdk(proxy)
    time.sleep(0.35)
    for batch_id in ids * 2:  # twice: round-robin alternates underneath
        assert client.messages.batches.retrieve(batch_id).processing_status == "ended"
        assert last_account(fake, f"/v1/messages/batches/{batch_id}") == owner[batch_id]
    for i, batch_id in enumerate(ids):
        # The SDK follows results_url: it must lead back through the pool, not to the upstream.
        assert client.messages.batches.retrieve(batch_id).results_url == f"/v1/messages/batches/{batch_id}/results"
        assert [r.custom_id for r in client.messages.batches.results(batch_id)] == [f"r{i}"]
        assert last_account(fake, f"/v1/messages/batches/{batch_id}/results") == owner[batch_id]
        raw = requests.get(f"{proxy.url}/v1/messages/batches/{batch_id}/results", headers=HEADERS, timeout=10)
        assert raw.status_code == 200 and json.loads(raw.text.splitlines()[0])["result"]["type"] == "succeeded"
    assert {b.results_url for b in client.messages.batches.list()} == {f"/v1/messages/batches/{i}/results" for i in ids}
    client.messages.batches.delete(ids[0])
    assert wait_until(lambda: list(owners_table(home)) == [ids[1]])
    fresh = client.messages.batches.create(requests=[{"custom_id": "c", "params": params}])
    assert client.messages.batches.cancel(fresh.id).processing_status == "canceling"
    assert last_account(fake, f"/v1/messages/batches/{fresh.id}/cancel") == fake.resources.owner(fresh.id)


def test_owner_limited_paused_or_removed(fake, home, start_proxy):
    proxy = two_accounts(fake, home, start_proxy)
    file_id = sdk(proxy).beta.files.upload(file=("x.txt", b"x", "text/plain")).id
    owner = fake.resources.owner(file_id)
    other = "b" if owner == "a" else "a"

    # Rate limited: only the owner has the file, so its refusal is the answer; nothing moves.
    fake.set_fault(owner, "status:429", count=5)
    before = len([r for r in fake.requests if r["account"] == other])
    refused = ask_about(proxy, file_id)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert len([r for r in fake.requests if r["account"] == other]) == before
    # The owner is benched now, yet only it can answer: it is asked again, and says so itself.
    asked = len(fake.requests)
    assert ask_about(proxy, file_id).status_code == 429 and fake.requests[asked]["account"] == owner
    fake.clear_faults()
    assert ask_about(proxy, file_id).status_code == 200  # no wait for the bench: the owner serves again

    runner = CliRunner()
    assert runner.invoke(cli, ["--home", str(home), "pause", owner]).exit_code == 0
    assert wait_until(
        lambda: requests.get(f"{proxy.url}/v1/files/{file_id}", headers=HEADERS, timeout=10).status_code == 503
    )
    paused = requests.get(f"{proxy.url}/v1/files/{file_id}", headers=HEADERS, timeout=10).json()
    assert (
        paused["error"]["type"] == "api_error"
        and f"'{owner}'" in paused["error"]["message"]
        and "paused" in paused["error"]["message"]
    )
    assert ask_about(proxy, file_id).status_code == 503  # not sent to the other account, which would say 404

    assert runner.invoke(cli, ["--home", str(home), "remove", owner, "--yes"]).exit_code == 0
    assert wait_until(
        lambda: requests.get(f"{proxy.url}/v1/files/{file_id}", headers=HEADERS, timeout=10).status_code == 404
    )
    gone = requests.get(f"{proxy.url}/v1/files/{file_id}", headers=HEADERS, timeout=10).json()
    assert gone["error"]["type"] == "not_found_error" and f"'{owner}'" in gone["error"]["message"]
    assert all(r["account"] == owner for r in fake.requests if r["path"] == f"/v1/files/{file_id}")

    # Unknown ids route normally: the remaining account answers for itself.
    unknown = requests.get(f"{proxy.url}/v1/files/file_unknown", headers=HEADERS, timeout=10)
    assert unknown.status_code == 404 and last_account(fake, "/v1/files/file_unknown") == other


def test_list_names_an_account_that_could_not_answer(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    add_account(home, "ghost", "api-key", 1, api_key=key_for("ghost"))  # a key the upstream refuses
    proxy = start_proxy(home)
    file_id = sdk(proxy).beta.files.upload(file=("x.txt", b"x", "text/plain")).id  # a 401 from ghost fails over
    listed = requests.get(f"{proxy.url}/v1/files", headers=HEADERS, timeout=10)
    assert listed.status_code == 200 and [f["id"] for f in listed.json()["data"]] == [file_id]
    assert listed.headers["x-claudeflare-unlisted"] == "ghost (status 401)"
    assert key_for("a") not in listed.text and key_for("ghost") not in listed.text

    CliRunner().invoke(cli, ["--home", str(home), "pause", "a"])
    assert wait_until(lambda: requests.get(f"{proxy.url}/v1/files", headers=HEADERS, timeout=10).status_code == 502)
    error = requests.get(f"{proxy.url}/v1/files", headers=HEADERS, timeout=10).json()
    assert error["error"]["type"] == "api_error" and "ghost (status 401)" in error["error"]["message"]
