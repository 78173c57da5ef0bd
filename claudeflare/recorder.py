"""The Recorder addon: reads usage on the side of each reply and writes one flow-log row per request."""

import asyncio
import json
import logging
import time
from functools import partial
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from .accounts import apply_control
from .config import DB_FILE, resolve_home
from .flowlog import FlowLog
from .flows import FlowState, FlowStates, is_event_stream, request_summary
from .offloop import LOOP_PARSE_LIMIT, off_loop
from .pricing import cost_usd
from .retention import REQUEST_KEEP_DAYS
from .storable import storable
from .usage import SSEUsageParser, Usage, usage_from_json

logger = logging.getLogger(__name__)
MAX_KEEP_DAYS = 100 * 365  # further back than datetime reaches is no retention at all


class SideParser:
    """The stream callback: passes each chunk on untouched and reads usage from it on the side; the
    first chunk is read only after it has been written, so parsing never delays time to first byte."""

    def __init__(self, parser: SSEUsageParser, state: FlowState, before=None):
        self.parser = parser
        self.state = state
        self.before = before  # another stream callback, whose output this one reads (providers.Provider.stream)
        self.pending: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def __call__(self, chunk: bytes) -> bytes:
        if self.before:
            chunk = self.before(chunk)
            if not chunk:
                return []  # nothing whole yet: an empty chunk would end a chunked reply
        if not chunk:
            return chunk
        if self.state.first_byte_at is None:
            # The first chunk is what the client waits for: read it only after it has gone out.
            self.state.first_byte_at = time.time()
            self.loop.call_soon(self.drain)
            self.pending.append(chunk)
        elif self.pending:
            self.pending.append(chunk)  # keep the order behind a chunk not read yet
        else:
            self.parser.feed(chunk)
        return chunk

    def drain(self) -> None:
        pending, self.pending = self.pending, []
        for chunk in pending:
            self.parser.feed(chunk)

    @property
    def usage(self) -> Usage:
        self.drain()  # what has arrived so far, all of it
        return self.parser.usage


class Recorder:
    def __init__(self, states: FlowStates | None = None) -> None:
        self.states = states or FlowStates()  # shared with the Claudeflare addon
        self.flowlog: FlowLog | None = None
        self.live: dict[str, http.HTTPFlow] = {}  # logged at shutdown if still open
        self.metrics = None  # metrics.Metrics: counts each row logged

    def load(self, loader) -> None:
        loader.add_option("claudeflare_db", str, "", f"SQLite flow log (default: {DB_FILE} in claudeflare_home).")
        loader.add_option(
            "claudeflare_keep_days",
            int,
            int(REQUEST_KEEP_DAYS),
            "Delete request rows older than this many days (0: keep all).",
        )

    def configure(self, updated: set[str]) -> None:
        if "claudeflare_keep_days" in updated:
            if not 0 <= ctx.options.claudeflare_keep_days <= MAX_KEEP_DAYS:
                raise exceptions.OptionsError(f"claudeflare_keep_days must be from 0 (keep all) to {MAX_KEEP_DAYS}")
            if self.flowlog:
                self.flowlog.keep_days = ctx.options.claudeflare_keep_days
        if not {"claudeflare_db", "claudeflare_home"} & updated:
            return
        home = resolve_home(ctx.options.claudeflare_home)
        path = Path(ctx.options.claudeflare_db).expanduser().resolve() if ctx.options.claudeflare_db else home / DB_FILE
        if self.flowlog and self.flowlog.path == path:
            return
        if self.flowlog:
            self.flowlog.close()
        self.flowlog = FlowLog(
            path, control=partial(apply_control, home), keep_days=ctx.options.claudeflare_keep_days
        ).start()

    @property
    def backlog(self) -> int:
        """Flow-log rows not written yet."""
        return self.flowlog.backlog if self.flowlog else 0

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state:
            self.live[state.id] = flow

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state is None or flow.response is None or not is_event_stream(flow.response):
            return
        if flow.response.raw_content is not None:
            return  # fetched whole by our own client (a retry): read in full when recorded
        before = flow.response.stream if callable(flow.response.stream) else None
        flow.response.stream = state.parser = SideParser(
            SSEUsageParser(flow.response.headers.get("content-encoding")), state, before
        )

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self.summarize(flow)
        finally:
            self.record(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        try:
            await self.summarize(flow)
        finally:
            self.record(flow, flow.error.msg if flow.error else "error")

    async def summarize(self, flow: http.HTTPFlow) -> None:
        """The model of a big request body whose reply names none, read off the loop for `flow_row`."""
        state = self.states.get(flow)
        body = flow.request.raw_content
        if state is None or state.logged or not body or len(body) <= LOOP_PARSE_LIMIT:
            return
        usage = reply_usage(flow, state)
        if usage is None or usage.model is None:
            state.request_summary = await off_loop(request_summary, body=body)

    def done(self) -> None:
        for flow in list(self.live.values()):
            self.record(flow, "proxy shut down")
        if self.flowlog:
            self.flowlog.close()
            self.flowlog = None

    def record(self, flow: http.HTTPFlow, error: str | None = None) -> None:
        state = self.states.get(flow)
        if state is None or state.logged or self.flowlog is None:
            return
        state.logged = True
        self.live.pop(state.id, None)
        try:
            row = flow_row(flow, state, error)
        except Exception:  # a bug reading this flow: still a row, with what is known for sure
            logger.exception("claudeflare: reading flow %s for the log failed", state.id)
            row = {
                "id": state.id,
                "started_at": state.started_at,
                "account": state.account,
                "client": state.client,
                "session": state.session,
                "attempts": state.attempts,
                "error": "claudeflare: flow unreadable",
            }
        row = storable(row)
        self.flowlog.log(row)
        if self.metrics:
            self.metrics.observe(row)


def reply_usage(flow: http.HTTPFlow, state: FlowState) -> Usage | None:
    if state.parser:
        return state.parser.usage
    response = flow.response
    if response is None or not response.raw_content:
        return None
    encoding = response.headers.get("content-encoding")
    if is_event_stream(response):  # a stream that was retried arrives whole
        parser = SSEUsageParser(encoding)
        parser.feed(response.raw_content)
        return parser.usage
    return usage_from_json(response.raw_content, encoding)


def client_status(flow: http.HTTPFlow) -> int | None:
    """The status the client got. A reply not streamed that fails before it is whole (over
    body_size_limit, cut short) never reaches the client: mitmproxy answers 502 itself instead."""
    response = flow.response
    if response is None:
        return None
    if flow.error and not response.stream and "disconnected" not in flow.error.msg.lower():
        return 502
    return response.status_code


def flow_row(flow: http.HTTPFlow, state: FlowState, error: str | None) -> dict:
    request, response = flow.request, flow.response
    usage = reply_usage(flow, state) or Usage()
    body = request.raw_content or b""
    if usage.model is not None:
        model, stream = usage.model, False
    else:  # a big body is read off the loop beforehand (Recorder.summarize), or not at all (at shutdown)
        model, stream = state.request_summary or (
            request_summary(body) if len(body) <= LOOP_PARSE_LIMIT else (None, False)
        )
    usage.model = model
    cost = cost_usd(usage)
    tokens = (
        usage.input_tokens + usage.output_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    )
    first_byte = state.first_byte_at or (response.timestamp_start if response else None)
    end = (response.timestamp_end if response else None) or time.time()
    return {
        "id": state.id,
        "started_at": state.started_at,
        "account": state.account,
        "strategy": state.strategy,
        "session": state.session,
        "client": state.client,
        "method": request.method,
        "path": state.endpoint or request.path.split("?", 1)[0],  # the client's: a provider may send it elsewhere
        "model": usage.model,
        "stream": int(stream or state.parser is not None or (response is not None and is_event_stream(response))),
        "status": client_status(flow),
        "error": usage.error_type or error,
        "ttfb_ms": round((first_byte - request.timestamp_start) * 1000, 2) if first_byte else None,
        "duration_ms": round((end - request.timestamp_start) * 1000, 2),
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cost_usd": cost or 0.0,
        "priced": int(cost is not None or not tokens),  # 0 flags tokens of a model without a price
        "attempts": state.attempts,
        "failovers": json.dumps(state.failovers) if state.failovers else None,
        "stop_reason": usage.stop_reason,
        "request_id": response.headers.get("request-id") if response else None,
        "account_kind": state.account_kind,
        "provider": state.provider,
    }
