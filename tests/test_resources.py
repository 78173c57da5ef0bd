"""Units of claudeflare/resources.py: finding ids, the owner registry and its table, the merged list."""

import json
import sqlite3

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from claudeflare.accounts import Account, Pool
from claudeflare.credentials import Credential
from claudeflare.flowlog import FlowLog
from claudeflare.resources import (
    Owners,
    body_file_ids,
    list_kind,
    localize_batch_reply,
    merged_page,
    named_ids,
    page_query,
    path_ids,
    reply_id,
)


def request(method="GET", path="/v1/files", body=b""):
    return tutils.treq(method=method.encode(), path=path.encode(), content=body)


def test_path_ids():
    assert path_ids("/v1/files/file_011Cabc") == ["file_011Cabc"]
    assert path_ids("/v1/files/file_011Cabc/content") == ["file_011Cabc"]
    assert path_ids("/v1/messages/batches/msgbatch_01x/results") == ["msgbatch_01x"]
    assert path_ids("/v1/messages/batches/msgbatch_01x/cancel") == ["msgbatch_01x"]
    for other in (
        "/v1/files",
        "/v1/messages",
        "/v1/files/file_a.b",
        "/v1/files/notafile",
        "/x/v1/files/file_a",
        "/v1/files/file_" + "a" * 201,
        "/v1/messages/batches/file_a",
    ):
        assert path_ids(other) == []


def test_body_file_ids_tolerate_garbage_and_ignore_text():
    doc = {"type": "document", "source": {"type": "file", "file_id": "file_A1"}}
    body = json.dumps(
        {"messages": [{"role": "user", "content": [doc, doc, {"type": "text", "text": '"file_id": "file_T"'}]}]}
    )
    assert body_file_ids(body.encode()) == ["file_A1"]  # once; the one inside a string is text, not a block
    assert body_file_ids(b'{"file_id" : "file_B2"') == ["file_B2"]  # truncated JSON still says which
    assert body_file_ids(b'\xff\x00"file_id":"file_C3"\xfe') == ["file_C3"]
    assert body_file_ids(b'{"file_id": 5, "x": "file_D"}') == []
    assert body_file_ids(b'{"other": "file_E"}') == []
    many = b"".join(b'"file_id":"file_%d",' % i for i in range(500))
    assert len(body_file_ids(many)) == 100  # bounded
    hostile = b'"file_id"' * 5000 + b'"file_id":"file_late"'
    assert body_file_ids(hostile) == []  # past the bound: routed as usual, at no cost to the event loop
    assert body_file_ids(b'"file_id"' + b" " * 1000 + b':"file_far"') == []


def test_named_ids_reads_message_bodies_only():
    body = b'{"messages":[{"content":[{"source":{"type":"file","file_id":"file_X"}}]}]}'
    assert named_ids(request("POST", "/v1/messages?beta=true", body)) == ["file_X"]
    assert named_ids(request("POST", "/v1/messages/batches", body)) == ["file_X"]
    assert named_ids(request("POST", "/v1/files", body)) == []  # an upload's content means nothing
    assert named_ids(request("GET", "/v1/files/file_Y/content")) == ["file_Y"]


def test_list_kind_and_reply_id():
    assert list_kind(request("GET", "/v1/files?beta=true")) == "files"
    assert list_kind(request("GET", "/v1/messages/batches")) == "message batches"
    assert list_kind(request("POST", "/v1/files")) is None
    assert list_kind(request("GET", "/v1/files/file_a")) is None
    assert reply_id(b'{"id": "file_1", "type": "file"}') == "file_1"
    assert reply_id(b'{"id": "msgbatch_1"}') == "msgbatch_1"
    for junk in (b"", b"[]", b'{"id": 3}', b'{"id": "msg_1"}', b"\xff", b"[" * 100000):
        assert reply_id(junk) is None


def items(*specs):
    return [{"id": i, "created_at": at} for i, at in specs]


def test_merged_page_newest_first_with_cursors():
    everything = items(
        ("f1", "2026-01-01T00:00:01Z"), ("f3", "2026-01-01T00:00:03.5Z"), ("f2", "2026-01-01T00:00:02Z"), ("f0", None)
    )
    page = merged_page(everything, 2, None, None, None)
    assert [i["id"] for i in page["data"]] == ["f3", "f2"] and page["has_more"] and page["next_page"] == "page_f2"
    assert (page["first_id"], page["last_id"]) == ("f3", "f2")
    assert [i["id"] for i in merged_page(everything, 2, "f2", None, None)["data"]] == ["f1", "f0"]
    older = merged_page(everything, 5, "f2", None, None)
    assert not older["has_more"] and older["next_page"] is None
    newer = merged_page(everything, 1, None, "f1", None)
    assert [i["id"] for i in newer["data"]] == ["f2"] and newer["has_more"]
    assert merged_page(everything, 5, "nope", None, None)["data"] == []
    assert [i["id"] for i in merged_page(everything, 5, None, None, {"f1", "f0"})["data"]] == ["f1", "f0"]
    assert merged_page([], 20, None, None, None) == {
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
        "next_page": None,
    }


def test_page_query():
    def q(**params):
        return page_query(request("GET", "/v1/files?" + "&".join(f"{k}={v}" for k, v in params.items())).query)

    assert q() == (20, None, None, None)
    assert q(limit=5, page="page_f9") == (5, "f9", None, None)
    for bad in (
        {"limit": 0},
        {"limit": 1001},
        {"limit": "x"},
        {"limit": "-1"},
        {"page": "f9"},
        {"after_id": "a", "before_id": "b"},
    ):
        with pytest.raises(ValueError):
            q(**bad)


def pool_of(*accounts):
    return Pool(
        accounts=list(accounts), credentials={a.name: Credential(api_key=f"sk-ant-api03-{a.name}") for a in accounts}
    )


def test_owner_for_pins_and_refuses_clearly():
    stored = []
    owners = Owners(lambda *change: stored.append(change))
    owners.remember("file_a", "a")
    owners.remember("file_a", "a")  # unchanged: nothing to write
    owners.remember("file_b", "b")
    assert stored == [("file_a", "a", "file"), ("file_b", "b", "file")]
    pool = pool_of(Account("a", "api-key"), Account("b", "api-key", paused=True))
    describe = lambda account: pool.state(account)  # noqa: E731
    assert owners.owner_for(request("GET", "/v1/files/file_a"), pool, describe) == ("a", None)
    assert owners.owner_for(request("GET", "/v1/files/file_new"), pool, describe) == (None, None)
    _, paused = owners.owner_for(request("GET", "/v1/files/file_b"), pool, describe)
    assert paused.status_code == 503 and "'b', which is paused" in json.loads(paused.content)["error"]["message"]
    both = b'[{"file_id":"file_a"},{"file_id":"file_b"}]'
    _, mixed = owners.owner_for(request("POST", "/v1/messages", both), pool, describe)
    assert mixed.status_code == 400 and json.loads(mixed.content)["error"]["type"] == "invalid_request_error"
    _, gone = owners.owner_for(request("GET", "/v1/files/file_a"), pool_of(Account("b", "api-key")), describe)
    body = json.loads(gone.content)
    assert gone.status_code == 404 and body["error"]["type"] == "not_found_error" and "'a'" in body["error"]["message"]


def test_observe_remembers_creations_and_forgets_deletions():
    stored = []
    owners = Owners(lambda *change: stored.append(change))
    created = http.Response.make(200, b'{"id": "msgbatch_9", "type": "message_batch"}')
    owners.observe(request("POST", "/v1/messages/batches"), created, "a")
    owners.observe(request("POST", "/v1/files"), http.Response.make(400, b'{"id": "file_no"}'), "a")
    assert owners.get("msgbatch_9") == "a" and owners.get("file_no") is None
    owners.observe(request("DELETE", "/v1/messages/batches/msgbatch_9"), http.Response.make(404), "a")
    assert owners.get("msgbatch_9") == "a"  # a failed delete forgets nothing
    owners.observe(request("DELETE", "/v1/messages/batches/msgbatch_9"), http.Response.make(200), "a")
    assert owners.get("msgbatch_9") is None and stored[-1] == ("msgbatch_9", None, None)
    owners.remember("file_7", "a")
    owners.observe(request("GET", "/v1/files/file_7/contentt"), http.Response.make(404), "a")
    assert owners.get("file_7") == "a"  # a 404 for some other path says nothing about the file
    owners.observe(request("GET", "/v1/files/file_7"), http.Response.make(404), "a")
    assert owners.get("file_7") is None  # its owner no longer has it


def test_owners_are_written_by_the_flow_log_and_loaded_again(tmp_path):
    path = tmp_path / "log.db"
    log = FlowLog(path, interval=60).start()  # only close() wakes it: the changes wait in its queue
    owners = Owners(log.resource_owner)
    owners.remember("file_1", "a")
    owners.remember("msgbatch_1", "b")
    owners.remember("file_1", "c")
    owners.remember("file_2", "a")
    owners.forget("file_2")
    log.close()
    conn = sqlite3.connect(path)
    assert conn.execute("select id, account, kind from resources order by id").fetchall() == [
        ("file_1", "c", "file"),
        ("msgbatch_1", "b", "batch"),
    ]
    conn.close()
    again = Owners(lambda *change: None)
    again.load(path)
    assert again.owners == {"file_1": "c", "msgbatch_1": "b"}
    empty = Owners(lambda *change: None)
    empty.load(tmp_path / "none.db")
    assert empty.owners == {}


def test_batch_results_url_leads_back_through_the_pool():
    batch = {
        "type": "message_batch",
        "id": "msgbatch_1",
        "results_url": "https://api.anthropic.com/v1/messages/batches/msgbatch_1/results",
    }
    reply = http.Response.make(200, json.dumps(batch), {"content-type": "application/json"})
    localize_batch_reply(request("GET", "/v1/messages/batches/msgbatch_1"), reply)
    assert json.loads(reply.content)["results_url"] == "/v1/messages/batches/msgbatch_1/results"
    elsewhere = {**batch, "results_url": "https://example.com/elsewhere"}
    untouched = http.Response.make(200, json.dumps(elsewhere))
    localize_batch_reply(request("GET", "/v1/messages/batches/msgbatch_1"), untouched)
    assert json.loads(untouched.content) == elsewhere
    garbage = http.Response.make(200, b'{"results_url": ')
    localize_batch_reply(request("GET", "/v1/messages/batches/msgbatch_1"), garbage)
    assert garbage.content == b'{"results_url": '
