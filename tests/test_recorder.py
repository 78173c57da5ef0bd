"""`recorder.flow_row`, the flow-log row of one request, on synthetic flows (mitmproxy's test helpers)."""

import asyncio
import gzip
import json

import pytest
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from claudeflare import recorder
from claudeflare.flowlog import FlowLog, open_db
from claudeflare.flows import FlowState, FlowStates
from claudeflare.offloop import LOOP_PARSE_LIMIT
from claudeflare.recorder import Recorder, SideParser, flow_row
from claudeflare.storable import storable
from claudeflare.usage import SSEUsageParser

MODEL = "claude-sonnet-4-6"
ASKED = {"model": MODEL, "stream": True, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
SENT_AT, FIRST_BYTE, ENDED = 1000.0, 1000.25, 1002.0
STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"model":"claude-sonnet-4-6","usage":{"input_tokens":1000,'
    b'"cache_read_input_tokens":3000,"cache_creation_input_tokens":400,"output_tokens":1}}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":200}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
COST = (1000 * 3.0 + 200 * 15.0 + 3000 * 0.30 + 400 * 3.75) / 1e6  # prices.toml, claude-sonnet-4-6


def pool_flow(
    body=ASKED, status=200, headers=(), content: bytes | None = None, error: str | None = None
) -> http.HTTPFlow:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = tutils.treq(
        method=b"POST",
        path=b"/v1/messages?beta=true",
        content=raw,
        timestamp_start=SENT_AT,
        timestamp_end=SENT_AT + 0.01,
    )
    response = False
    if content is not None:
        response = tutils.tresp(
            status_code=status,
            headers=http.Headers([(k.encode(), v.encode()) for k, v in headers]),
            content=b"",
            timestamp_start=FIRST_BYTE,
            timestamp_end=ENDED,
        )
        response.raw_content = content
    return tflow.tflow(req=request, resp=response, err=mflow.Error(error) if error else False)


def state(**known) -> FlowState:
    return FlowState(
        **{
            "id": "r1",
            "started_at": "2026-11-30T12:00:00.000Z",
            "client": "laptop",
            "session": "s1",
            "strategy": "session",
            "account": "a",
            "account_kind": "api-key",
            "attempts": 1,
            **known,
        }
    )


def test_a_reply_not_streamed_gives_its_usage_cost_and_timing():
    reply = {
        "id": "msg_1",
        "type": "message",
        "model": MODEL,
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 1000,
            "output_tokens": 200,
            "cache_read_input_tokens": 3000,
            "cache_creation_input_tokens": 400,
        },
    }
    flow = pool_flow(
        {**ASKED, "stream": False, "model": "claude-sonnet-4-6-latest"},
        content=json.dumps(reply).encode(),
        headers=[("content-type", "application/json"), ("request-id", "req_011")],
    )
    failover = {"account": "b", "status": 529, "reason": "overloaded"}
    row = flow_row(flow, state(failovers=[failover]), None)
    assert row["model"] == MODEL  # what served it, not what was asked for
    assert (
        row["input_tokens"],
        row["output_tokens"],
        row["cache_read_input_tokens"],
        row["cache_creation_input_tokens"],
    ) == (1000, 200, 3000, 400)
    assert row["cost_usd"] == pytest.approx(COST) and row["priced"] == 1
    assert (row["status"], row["error"], row["stream"], row["stop_reason"]) == (200, None, 0, "end_turn")
    assert (row["method"], row["path"], row["request_id"]) == ("POST", "/v1/messages", "req_011")
    assert row["ttfb_ms"] == 250.0 and row["duration_ms"] == 2000.0
    assert (row["id"], row["account"], row["account_kind"], row["client"], row["session"], row["attempts"]) == (
        "r1",
        "a",
        "api-key",
        "laptop",
        "s1",
        1,
    )
    assert json.loads(row["failovers"]) == [failover]


def test_a_stream_is_read_on_the_side_chunk_by_chunk_untouched():
    flow = pool_flow(content=b"", headers=[("content-type", "text/event-stream")])
    flow.response.raw_content = None  # streamed: mitmproxy keeps no body
    known = state()

    async def stream():
        known.parser = SideParser(SSEUsageParser(), known)
        pieces = [STREAM[i : i + 7] for i in range(0, len(STREAM), 7)]  # lines and JSON split anywhere
        assert [known.parser(p) for p in pieces] == pieces
        return flow_row(flow, known, None)

    row = asyncio.run(stream())
    assert known.first_byte_at is not None and row["ttfb_ms"] == round((known.first_byte_at - SENT_AT) * 1000, 2)
    assert (row["model"], row["stream"], row["input_tokens"], row["output_tokens"], row["stop_reason"]) == (
        MODEL,
        1,
        1000,
        200,
        "end_turn",
    )
    assert row["cost_usd"] == pytest.approx(COST)


def test_a_retried_stream_arrives_whole_and_encoded_and_is_read_in_full():
    flow = pool_flow(
        content=gzip.compress(STREAM),
        headers=[("content-type", "text/event-stream; charset=utf-8"), ("content-encoding", "gzip")],
    )
    row = flow_row(flow, state(attempts=2), None)
    assert (row["model"], row["stream"], row["input_tokens"], row["output_tokens"], row["attempts"]) == (
        MODEL,
        1,
        1000,
        200,
        2,
    )
    assert row["cost_usd"] == pytest.approx(COST) and row["ttfb_ms"] == 250.0


def test_an_error_without_a_reply_keeps_what_was_asked():
    flow = pool_flow(error="Connection refused")
    row = flow_row(flow, state(), "Connection refused")
    assert (row["status"], row["error"], row["model"], row["stream"], row["ttfb_ms"]) == (
        None,
        "Connection refused",
        MODEL,
        1,
        None,
    )
    assert (row["input_tokens"], row["cost_usd"], row["priced"], row["request_id"]) == (0, 0.0, 1, None)
    assert row["duration_ms"] > 0


def test_an_error_reply_names_its_type():
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "req_9"}
    flow = pool_flow(status=529, content=json.dumps(body).encode(), headers=[("content-type", "application/json")])
    row = flow_row(flow, state(), None)
    assert (row["status"], row["error"], row["model"], row["output_tokens"]) == (529, "overloaded_error", MODEL, 0)


@pytest.mark.parametrize("content", [b'{"id":"msg_1","type":"message","content":[]}', b"<html>Bad Gateway</html>", b""])
def test_a_reply_without_usage_costs_nothing_and_keeps_the_model_asked_for(content):
    flow = pool_flow({**ASKED, "stream": False}, content=content, headers=[("content-type", "application/json")])
    row = flow_row(flow, state(), None)
    assert (row["model"], row["stream"], row["status"], row["error"]) == (MODEL, 0, 200, None)
    assert (row["input_tokens"], row["output_tokens"], row["cost_usd"], row["priced"], row["stop_reason"]) == (
        0,
        0,
        0.0,
        1,
        None,
    )


def test_a_hostile_model_is_stored_as_short_plain_text_and_flagged_unpriced():
    hostile = "<script>alert(1)</script>\x00\r\nX-Injected: 1\ud800" + "x" * 10_000
    usage = {"usage": {"input_tokens": 5, "output_tokens": 7}}  # a reply naming no model: the client's counts
    flow = pool_flow(
        {**ASKED, "model": hostile}, content=json.dumps(usage).encode(), headers=[("content-type", "application/json")]
    )
    row = flow_row(flow, state(), None)
    assert (
        row["model"] == hostile and row["cost_usd"] == 0.0 and row["priced"] == 0
    )  # tokens of a model without a price
    stored = storable(row)["model"]
    assert len(stored) <= 100 and stored.isprintable() and stored.startswith("<script>alert(1)</script>?")
    stored.encode("utf-8")  # no lone surrogate left for SQLite to refuse


@pytest.mark.parametrize(
    "body", [{**ASKED, "model": ["claude-opus-4-1"], "stream": "yes"}, b"{not json", b"[1, 2]", "\ud800"]
)
def test_a_request_body_that_names_no_model_gives_none(body):
    flow = pool_flow(body if isinstance(body, (bytes, dict)) else json.dumps(body).encode(), content=b"", headers=[])
    row = flow_row(flow, state(), None)
    assert (row["model"], row["stream"], row["status"]) == (None, 0, 200)


def test_a_big_body_is_read_only_off_the_loop():
    body = {**ASKED, "system": "s" * LOOP_PARSE_LIMIT}
    assert flow_row(pool_flow(body, content=b"", headers=[]), state(), None)["model"] is None  # at shutdown: not read
    summarized = flow_row(pool_flow(body, content=b"", headers=[]), state(request_summary=(MODEL, True)), None)
    assert (summarized["model"], summarized["stream"]) == (MODEL, 1)


@pytest.mark.parametrize(
    "streamed, error, status",
    [
        (False, "HTTP body too large", 502),  # never reached the client: mitmproxy answered 502 itself
        (False, "peer closed connection without sending complete message body", 502),
        (False, "Client disconnected.", 200),  # the client left: the upstream's status stands
        (True, "peer closed connection without sending complete message body", 200),  # its head was already sent
    ],
)
def test_the_status_is_the_one_the_client_got(streamed, error, status):
    flow = pool_flow(content=b"{}", headers=[("content-type", "application/json")], error=error)
    flow.response.stream = streamed
    row = flow_row(flow, state(), error)
    assert (row["status"], row["error"]) == (status, error)


def test_a_flow_that_cannot_be_read_still_gets_one_row_and_open_flows_get_theirs_at_shutdown(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(recorder, "flow_row", broken)
    states = FlowStates()
    log = Recorder(states)
    log.flowlog = FlowLog(tmp_path / "log.db").start()
    unreadable, open_ = pool_flow(content=b"{}", headers=[]), pool_flow()
    for flow, account in ((unreadable, "a"), (open_, "b")):
        known = states.start(flow)
        known.account, known.client = account, "laptop"
        log.requestheaders(flow)
    log.record(unreadable)
    log.record(unreadable)  # a second record of the same flow adds no row
    monkeypatch.undo()
    log.done()  # the flow still open is logged as cut off by the shutdown
    rows = {r["account"]: r for r in open_db(tmp_path / "log.db")["requests"].rows}
    assert len(rows) == 2
    assert (rows["a"]["error"], rows["a"]["client"], rows["a"]["attempts"]) == (
        "claudeflare: flow unreadable",
        "laptop",
        0,
    )
    assert (rows["b"]["error"], rows["b"]["model"], rows["b"]["status"]) == ("proxy shut down", MODEL, None)
