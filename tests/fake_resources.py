"""Files and Message Batches for the fake Anthropic upstream (contract §10): each lives in the account
that created it, and any other account answers 404 `not_found_error` for it.

FakeAnthropic owns one `FakeResources` (`fake.resources`), registers its routes and asks it, for a
message, whether a `file_id` in its content belongs to the account (`missing_file`).

Shapes follow Anthropic's API:
- `POST /v1/files` (multipart, field `file`) → `{"id": "file_…", "type": "file", "filename", "mime_type",
  "size_bytes", "created_at", "downloadable"}`. Uploaded files are not downloadable (only files a tool
  made are); the control header `x-fake-downloadable: 1` on the upload makes one that is.
- `GET /v1/files` (`limit` 1..1000, default 20; `after_id` / `before_id`) → `{"data", "first_id", "last_id",
  "has_more"}`, newest first; `GET` / `DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`.
- `POST /v1/messages/batches` (`{"requests": [{"custom_id", "params"}]}`) → a `message_batch` in
  `in_progress`; it ends `batch_seconds` after creation (default 0.3 s), when its `results_url` and
  `…/results` (JSON lines, one succeeded message per request) become available. `GET` list and one,
  `POST …/cancel` (→ `canceling`, then `ended` with the requests canceled), `DELETE` once ended.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import secrets
import time
from datetime import UTC, datetime

from aiohttp import web

BATCH_TTL_S = 24 * 3600


def rfc3339_us(epoch: float) -> str:
    """Microseconds, so objects made in one second still sort by creation."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def page(items: list[dict], query) -> dict | str:
    """Anthropic's list page over `items` (newest first), or an error message for a bad query."""
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        return "limit: Input should be a valid integer"
    if not 1 <= limit <= 1000:
        return "limit: Input should be between 1 and 1000"
    ids = [item["id"] for item in items]
    after, before = query.get("after_id"), query.get("before_id")
    if after and before:
        return "after_id and before_id are mutually exclusive"
    if after:
        start = ids.index(after) + 1 if after in ids else len(ids)
        chosen, more = items[start : start + limit], start + limit < len(items)
    elif before:
        end = ids.index(before) if before in ids else 0
        chosen, more = items[max(0, end - limit) : end], end - limit > 0
    else:
        chosen, more = items[:limit], limit < len(items)
    return {
        "data": chosen,
        "has_more": more,
        "first_id": chosen[0]["id"] if chosen else None,
        "last_id": chosen[-1]["id"] if chosen else None,
    }


class FakeResources:
    def __init__(self, fake):
        self.fake = fake  # its lock guards the state below
        self.reset()

    def reset(self) -> None:
        self.batch_seconds = 0.3
        self.files: dict[str, dict] = {}  # id -> {"account", "meta", "content"}
        self.batches: dict[str, dict] = {}  # id -> {"account", "created", "requests", "canceled_at"}

    def routes(self, r) -> None:
        r.add_post("/v1/files", self.upload)
        r.add_get("/v1/files", self.list_files)
        r.add_get("/v1/files/{id}", self.get_file)
        r.add_delete("/v1/files/{id}", self.delete_file)
        r.add_get("/v1/files/{id}/content", self.file_content)
        r.add_post("/v1/messages/batches", self.create_batch)
        r.add_get("/v1/messages/batches", self.list_batches)
        r.add_get("/v1/messages/batches/{id}", self.get_batch)
        r.add_delete("/v1/messages/batches/{id}", self.delete_batch)
        r.add_get("/v1/messages/batches/{id}/results", self.batch_results)
        r.add_post("/v1/messages/batches/{id}/cancel", self.cancel_batch)

    def owner(self, resource_id: str) -> str | None:
        """Which account holds this file or batch (for test assertions)."""
        with self.fake._lock:
            found = self.files.get(resource_id) or self.batches.get(resource_id)
            return found["account"] if found else None

    def missing_file(self, payload: dict, account: str) -> str | None:
        """A `file_id` named in the message's content blocks that this account does not hold."""
        for message in payload.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            for block in content if isinstance(content, list) else []:
                source = block.get("source") if isinstance(block, dict) else None
                if isinstance(source, dict) and source.get("type") == "file":
                    file_id = source.get("file_id")
                    with self.fake._lock:
                        found = self.files.get(file_id) if isinstance(file_id, str) else None
                    if not found or found["account"] != account:
                        return str(file_id)
        return None

    # --- files -----------------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        account, _, refused = self.fake._auth_or_error(request)
        if refused:
            return refused
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return self.fake._error(request, 400, "Content-Type must be multipart/form-data")
        raw = await request.read()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw
        )
        part = next(
            (p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "file"), None
        )
        if part is None:
            return self.fake._error(request, 400, "file: Field required")
        content = part.get_payload(decode=True) or b""
        now = time.time()
        meta = {
            "id": "file_011C" + secrets.token_hex(12),
            "type": "file",
            "filename": part.get_filename() or "upload",
            "mime_type": part.get_content_type(),
            "size_bytes": len(content),
            "created_at": rfc3339_us(now),
            "downloadable": request.headers.get("x-fake-downloadable") == "1",
        }
        with self.fake._lock:
            self.files[meta["id"]] = {"account": account, "meta": meta, "content": content}
        return web.json_response(meta)

    async def list_files(self, request: web.Request) -> web.Response:
        account, _, refused = self.fake._auth_or_error(request)
        if refused:
            return refused
        with self.fake._lock:
            mine = [f["meta"] for f in self.files.values() if f["account"] == account]
        result = page(sorted(mine, key=lambda m: m["created_at"], reverse=True), request.query)
        return self.fake._error(request, 400, result) if isinstance(result, str) else web.json_response(result)

    def _file(self, request: web.Request) -> tuple[dict | None, web.Response | None]:
        account, _, refused = self.fake._auth_or_error(request)
        if refused:
            return None, refused
        file_id = request.match_info["id"]
        with self.fake._lock:
            found = self.files.get(file_id)
        if not found or found["account"] != account:
            return None, self.fake._error(request, 404, f"File not found: {file_id}")
        return found, None

    async def get_file(self, request: web.Request) -> web.Response:
        found, refused = self._file(request)
        return refused or web.json_response(found["meta"])

    async def delete_file(self, request: web.Request) -> web.Response:
        found, refused = self._file(request)
        if refused:
            return refused
        with self.fake._lock:
            self.files.pop(found["meta"]["id"], None)
        return web.json_response({"id": found["meta"]["id"], "type": "file_deleted"})

    async def file_content(self, request: web.Request) -> web.Response:
        found, refused = self._file(request)
        if refused:
            return refused
        if not found["meta"]["downloadable"]:
            return self.fake._error(
                request,
                400,
                f"File {found['meta']['id']} is not downloadable: only files created by tools can be downloaded.",
            )
        return web.Response(body=found["content"], content_type=found["meta"]["mime_type"])

    # --- batches ---------------------------------------------------------------------------------

    def _batch_view(self, batch: dict, now: float) -> dict:
        """Caller holds the lock."""
        created, canceled_at = batch["created"], batch["canceled_at"]
        ends = min(
            created + self.batch_seconds, canceled_at + self.batch_seconds if canceled_at else created + BATCH_TTL_S
        )
        ended = now >= ends
        n = len(batch["requests"])
        done_as = "canceled" if canceled_at else "succeeded"
        status = "ended" if ended else ("canceling" if canceled_at else "in_progress")
        counts = {"processing": 0 if ended else n, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            counts[done_as] = n
        return {
            "id": batch["id"],
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": rfc3339_us(ends) if ended else None,
            "created_at": rfc3339_us(created),
            "expires_at": rfc3339_us(created + BATCH_TTL_S),
            "archived_at": None,
            "cancel_initiated_at": rfc3339_us(canceled_at) if canceled_at else None,
            "results_url": f"{self.fake.url}/v1/messages/batches/{batch['id']}/results" if ended else None,
        }

    async def create_batch(self, request: web.Request) -> web.Response:
        account, _, refused = self.fake._auth_or_error(request)
        if refused:
            return refused
        try:
            payload = json.loads(await request.read())
            requests = payload["requests"]
            assert isinstance(requests, list) and requests
            custom_ids = [r["custom_id"] for r in requests if isinstance(r.get("params"), dict)]
            assert len(custom_ids) == len(requests) and all(isinstance(c, str) for c in custom_ids)
        except (ValueError, KeyError, TypeError, AttributeError, AssertionError, RecursionError):
            return self.fake._error(request, 400, "requests: a non-empty list of {custom_id, params} is required")
        batch = {
            "id": "msgbatch_01" + secrets.token_hex(12),
            "account": account,
            "created": time.time(),
            "requests": custom_ids,
            "canceled_at": None,
        }
        with self.fake._lock:
            self.batches[batch["id"]] = batch
            return web.json_response(self._batch_view(batch, time.time()))

    async def list_batches(self, request: web.Request) -> web.Response:
        account, _, refused = self.fake._auth_or_error(request)
        if refused:
            return refused
        now = time.time()
        with self.fake._lock:
            mine = [self._batch_view(b, now) for b in self.batches.values() if b["account"] == account]
        result = page(sorted(mine, key=lambda b: b["created_at"], reverse=True), request.query)
        return self.fake._error(request, 400, result) if isinstance(result, str) else web.json_response(result)

    def _batch(self, request: web.Request) -> tuple[dict | None, web.Response | None]:
        account, _, refused = self.fake._auth_or_error(request)
        if refused:
            return None, refused
        batch_id = request.match_info["id"]
        with self.fake._lock:
            found = self.batches.get(batch_id)
        if not found or found["account"] != account:
            return None, self.fake._error(request, 404, f"Message batch not found: {batch_id}")
        return found, None

    async def get_batch(self, request: web.Request) -> web.Response:
        found, refused = self._batch(request)
        if refused:
            return refused
        with self.fake._lock:
            return web.json_response(self._batch_view(found, time.time()))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        found, refused = self._batch(request)
        if refused:
            return refused
        now = time.time()
        with self.fake._lock:
            if self._batch_view(found, now)["processing_status"] == "in_progress":
                found["canceled_at"] = now
            return web.json_response(self._batch_view(found, now))

    async def delete_batch(self, request: web.Request) -> web.Response:
        found, refused = self._batch(request)
        if refused:
            return refused
        with self.fake._lock:
            if self._batch_view(found, time.time())["processing_status"] != "ended":
                return self.fake._error(request, 400, "A batch can only be deleted once it has ended; cancel it first.")
            self.batches.pop(found["id"], None)
        return web.json_response({"id": found["id"], "type": "message_batch_deleted"})

    async def batch_results(self, request: web.Request) -> web.Response:
        found, refused = self._batch(request)
        if refused:
            return refused
        with self.fake._lock:
            view = self._batch_view(found, time.time())
        if view["processing_status"] != "ended":
            return self.fake._error(request, 400, f"Batch {found['id']} has not ended yet; results are not available.")
        lines = []
        for custom_id in found["requests"]:
            if found["canceled_at"]:
                result = {"type": "canceled"}
            else:
                result = {
                    "type": "succeeded",
                    "message": {
                        "id": "msg_01" + secrets.token_hex(11),
                        "type": "message",
                        "role": "assistant",
                        "model": "claude-sonnet-4-5-20250929",
                        "content": [{"type": "text", "text": "ok"}],
                        "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": 5, "output_tokens": 1},
                    },
                }
            lines.append(json.dumps({"custom_id": custom_id, "result": result}))
        return web.Response(body="\n".join(lines) + "\n", content_type="application/binary")
