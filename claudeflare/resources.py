"""Files and Message Batches stay with the account that created them (contract §10).

Another account answers 404 for a file or batch it does not hold, so a request that names one —
in its path, or as `"file_id"` in a message's content blocks — goes to its owner and nowhere else.
`Owners` maps each id seen in a reply to its account: read on the event loop, loaded from table
`resources` at start, and written through the flow log's thread. A list call (`GET /v1/files`,
`GET /v1/messages/batches`) has no single owner: the proxy asks every usable account and merges
the answers newest first (`list_pool`).
"""

import asyncio
import json
import logging
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

import httpx
from mitmproxy import http

from .accounts import Account, Pool
from .credentials import Credential
from .flowlog import query_readonly
from .flows import error_response, inject_credential

logger = logging.getLogger(__name__)

ID = "[A-Za-z0-9_-]{1,200}"  # after the prefix; anything else is no id of ours
PATH_ID = re.compile(rf"/v1/(?:files/(file_{ID})|messages/batches/(msgbatch_{ID}))(?:/|$)")
FILE_ID_KEY = b'"file_id"'
FILE_ID_VALUE = re.compile(rf'\s{{0,64}}:\s{{0,64}}"(file_{ID})"'.encode())
MAX_BODY_IDS, MAX_BODY_KEYS = 100, 1000  # a hostile body costs a bounded number of steps
LISTS = {"/v1/files": "files", "/v1/messages/batches": "message batches"}
CREATES = {"/v1/files", "/v1/messages/batches"}
PREFIXES = {"file_": "file", "msgbatch_": "batch"}
# The merged list is built from each account's newest items: this many per page, this many pages.
UPSTREAM_PAGE, UPSTREAM_PAGES = 1000, 5
MAX_LIST_REPLY = 16 * 1024 * 1024
LIST_TIMEOUT = 60.0
OUR_PARAMS = {"limit", "after_id", "before_id", "page", "ids"}  # applied to the merged list, not sent upstream


def kind_of(resource_id: str) -> str | None:
    return next((kind for prefix, kind in PREFIXES.items() if resource_id.startswith(prefix)), None)


def path_of(request: http.Request) -> str:
    return request.path.split("?", 1)[0]


def path_ids(path: str) -> list[str]:
    """The file or batch a path names: /v1/files/file_…[/content], /v1/messages/batches/msgbatch_…[/…]."""
    found = PATH_ID.match(path)
    return [found.group(1) or found.group(2)] if found else []


def body_file_ids(body: bytes) -> list[str]:
    """The distinct `file_id`s of a JSON body, read without parsing it (bounded, any garbage welcome):
    each `"file_id"` key followed by a `file_…` string, unless its quote is escaped (then it is text)."""
    ids: dict[str, None] = {}
    at = body.find(FILE_ID_KEY)
    for _ in range(MAX_BODY_KEYS):
        if at < 0 or len(ids) >= MAX_BODY_IDS:
            break
        if body[at - 1 : at] != b"\\":
            if found := FILE_ID_VALUE.match(body, at + len(FILE_ID_KEY)):
                ids[found.group(1).decode("ascii")] = None
        at = body.find(FILE_ID_KEY, at + len(FILE_ID_KEY))
    return list(ids)


def named_ids(request: http.Request) -> list[str]:
    """Every file or batch a request names. Only message bodies are looked into: an upload's content
    may well contain `"file_id"` without meaning one."""
    path = path_of(request)
    ids = path_ids(path)
    if request.method == "POST" and path.startswith("/v1/messages"):
        ids += body_file_ids(request.raw_content or b"")
    return ids


def list_kind(request: http.Request) -> str | None:
    """What a list call lists (`files`, `message batches`), or None when the request is no list call."""
    return LISTS.get(path_of(request).rstrip("/")) if request.method == "GET" else None


def reply_id(body: bytes) -> str | None:
    """The `id` of a created file or batch, from its (small) JSON reply."""
    if len(body) > 1024 * 1024:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    found = data.get("id") if isinstance(data, dict) else None
    return found if isinstance(found, str) and kind_of(found) and len(found) <= 200 else None


class Owners:
    """Which account holds each file and batch. Read on the event loop; `store(id, account or None)`
    queues the change (id, account, kind) for the flow log's writer thread (never SQLite on the loop)."""

    def __init__(self, store: Callable[[str, str | None, str | None], None]):
        self.store = store
        self.owners: dict[str, str] = {}

    def load(self, db: Path) -> None:
        """Before traffic: table `resources` of the flow log (empty when there is none yet)."""
        self.owners.update((r["id"], r["account"]) for r in query_readonly(db, "select id, account from resources"))

    def get(self, resource_id: str) -> str | None:
        return self.owners.get(resource_id)

    def remember(self, resource_id: str, account: str) -> None:
        if self.owners.get(resource_id) != account:
            self.owners[resource_id] = account
            self.store(resource_id, account, kind_of(resource_id))

    def forget(self, resource_id: str) -> None:
        if self.owners.pop(resource_id, None) is not None:
            self.store(resource_id, None, None)

    def owner_for(
        self, request: http.Request, pool: Pool, describe: Callable[[Account], str]
    ) -> tuple[str | None, http.Response | None]:
        """(the account the request must go to, or None for normal routing; a refusal instead when
        that account can't serve). Ids the pool never saw route normally."""
        owned = {i: self.owners[i] for i in named_ids(request) if i in self.owners}
        names = set(owned.values())
        if not names:
            return None, None
        if len(names) > 1:
            which = ", ".join(f"{i} ({a})" for i, a in sorted(owned.items()))
            return None, error_response(
                400,
                "invalid_request_error",
                f"Claudeflare: this request names resources of different accounts: {which}. "
                "Files and batches live in the account that created them; use one account's per request.",
            )
        (name,) = names
        what = ", ".join(sorted(owned))
        account = next((a for a in pool.accounts if a.name == name), None)
        if account is None:
            # Gone for good as far as the pool knows: as if it were deleted (SDKs don't retry a 404).
            return None, error_response(
                404,
                "not_found_error",
                f"Claudeflare: {what} belongs to account '{name}', which is no longer in the pool. "
                "Add that account back under the same name to reach it.",
            )
        if account not in pool.usable():
            # A state a person can fix (resume, log in): a 503 says "try again later".
            return None, error_response(
                503,
                "api_error",
                f"Claudeflare: {what} belongs to account '{name}', which is {describe(account)}. "
                f"Only that account can serve it: `claudeflare resume {name}` or `claudeflare login {name}`.",
            )
        return name, None

    def observe(self, request: http.Request, response: http.Response | None, account: str) -> None:
        """After the reply: remember who created a file or batch; forget one that was deleted, or that
        its owner no longer knows (a 404 for the object itself: expired, or deleted elsewhere)."""
        if response is None:
            return
        path = path_of(request).rstrip("/")
        named = path_ids(path)
        if response.status_code == 200 and request.method == "POST" and path in CREATES:
            if created := reply_id(response.get_content(strict=False) or b""):
                self.remember(created, account)
        elif named and (
            (response.status_code == 200 and request.method == "DELETE")
            or (response.status_code == 404 and request.method == "GET" and path.endswith("/" + named[0]))
        ):
            self.forget(named[0])


def pool_results_url(item: dict) -> dict:
    """A batch's `results_url` is absolute, on Anthropic's host: a client following it (the SDKs'
    `batches.results()` does) would go around the pool, with a key Anthropic doesn't know. As a path,
    it resolves against whatever base URL the client reaches the pool by."""
    url = item.get("results_url")
    if isinstance(url, str) and "://" in url:
        path = "/" + url.split("://", 1)[1].partition("/")[2]
        if path.startswith("/v1/messages/batches/"):
            item["results_url"] = path
    return item


def localize_batch_reply(request: http.Request, response: http.Response | None) -> None:
    """`pool_results_url` on a batch object the upstream returned (create, retrieve, cancel)."""
    if response is None or response.status_code != 200 or not path_of(request).startswith("/v1/messages/batches"):
        return
    body = response.get_content(strict=False) or b""
    if b'"results_url"' not in body or len(body) > 1024 * 1024:
        return
    try:
        batch = json.loads(body)
    except (ValueError, RecursionError):
        return
    if isinstance(batch, dict) and batch.get("type") == "message_batch":
        response.set_content(json.dumps(pool_results_url(batch)).encode())


# --- list calls answered by the pool ------------------------------------------------------------


def created_key(item: dict) -> tuple[float, str]:
    """Newest first by `created_at` (RFC 3339); an item without a readable one sorts last."""
    try:
        when = datetime.fromisoformat(str(item.get("created_at"))).timestamp()
    except (ValueError, OverflowError):
        when = float("-inf")
    return when, str(item.get("id"))


def page_query(query) -> tuple[int, str | None, str | None, set[str] | None]:
    """(limit, after_id, before_id, ids) of a list call; ValueError with a message for a bad one.
    `page` (the SDK's opaque cursor, `page_<id>` from our `next_page`) means after that id."""
    raw = query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ValueError("limit: Input should be an integer between 1 and 1000")
    after, before, cursor = query.get("after_id"), query.get("before_id"), query.get("page")
    if cursor:
        if not cursor.startswith("page_"):
            raise ValueError("page: not a cursor from this pool")
        after = after or cursor[5:]
    if after and before:
        raise ValueError("after_id and before_id are mutually exclusive")
    ids = set(query.get_all("ids") + query.get_all("ids[]")) or None
    return int(raw), after, before, ids


def merged_page(items: list[dict], limit: int, after: str | None, before: str | None, ids: set[str] | None) -> dict:
    """One page of the pool's merged list, as Anthropic pages its own: newest first; `after_id` the
    items older than that one, `before_id` the `limit` items just newer than it. An id not in the
    list gives an empty page."""
    items = sorted(items, key=created_key, reverse=True)
    if ids is not None:
        items = [i for i in items if i.get("id") in ids]
    order = [i.get("id") for i in items]
    if after or before:
        if (after or before) not in order:
            chosen, more = [], False
        elif after:
            start = order.index(after) + 1
            chosen, more = items[start : start + limit], start + limit < len(items)
        else:
            end = order.index(before)
            chosen, more = items[max(0, end - limit) : end], end > limit
    else:
        chosen, more = items[:limit], len(items) > limit
    first, last = (chosen[0].get("id"), chosen[-1].get("id")) if chosen else (None, None)
    return {
        "data": chosen,
        "has_more": more,
        "first_id": first,
        "last_id": last,
        "next_page": f"page_{last}" if more and last and not before else None,
    }


async def fetch_all(client: httpx.AsyncClient, url: str, params: list, headers: list) -> list[dict]:
    """One account's items, newest first, following its pages (bounded). Raises on any refusal."""
    items: list[dict] = []
    after = None
    for _ in range(UPSTREAM_PAGES):
        query = [*params, ("limit", str(UPSTREAM_PAGE)), *([("after_id", after)] if after else [])]
        async with client.stream("GET", f"{url}?{urlencode(query)}", headers=headers, timeout=LIST_TIMEOUT) as reply:
            body = bytearray()
            async for chunk in reply.aiter_bytes():
                body += chunk
                if len(body) > MAX_LIST_REPLY:
                    raise ValueError("list reply too large")
        if reply.status_code != 200:
            raise LookupError(reply.status_code)
        page = json.loads(body) if len(body) < 256 * 1024 else await asyncio.to_thread(json.loads, bytes(body))
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(data, list):
            raise ValueError("list reply without data")
        items += [i for i in data if isinstance(i, dict) and isinstance(i.get("id"), str) and kind_of(i["id"])]
        after = page.get("last_id")
        if not page.get("has_more") or not isinstance(after, str):
            break
    return items


async def list_pool(
    flow: http.HTTPFlow,
    accounts: list[tuple[Account, Credential]],
    client: httpx.AsyncClient,
    headers: http.Headers,
    owners: Owners,
) -> http.Response:
    """The answer to a list call: every account's items merged (see `merged_page`); an account that
    can't answer is left out and named in `x-claudeflare-unlisted`."""
    request = flow.request
    kind = LISTS[path_of(request).rstrip("/")]
    try:
        limit, after, before, ids = page_query(request.query)
    except ValueError as e:
        return error_response(400, "invalid_request_error", f"Claudeflare: {e}")
    url = f"{request.scheme}://{request.host}:{request.port}{path_of(request)}"
    params = [(k, v) for k, v in request.query.items(multi=True) if k not in OUR_PARAMS]

    def sent(account: Account, credential: Credential) -> list:
        h = headers.copy()
        inject_credential(h, account, credential)
        h["accept-encoding"] = "identity"  # read here, not passed on
        return [(k, v) for k, v in h.items(multi=True) if k.lower() not in ("host", "content-length", "connection")]

    results = await asyncio.gather(
        *(fetch_all(client, url, params, sent(a, c)) for a, c in accounts), return_exceptions=True
    )
    merged, unlisted = [], []
    for (account, _), result in zip(accounts, results, strict=True):
        if isinstance(result, BaseException):
            why = f"status {result.args[0]}" if isinstance(result, LookupError) else type(result).__name__
            logger.warning("claudeflare: %s of %s not listed: %s", kind, account.name, why)
            unlisted.append(f"{account.name} ({why})")
            continue
        for item in result:
            owners.remember(item["id"], account.name)
            pool_results_url(item)
        merged += result
    if unlisted and len(unlisted) == len(accounts):
        return error_response(
            502, "api_error", f"Claudeflare: no account could list its {kind}: {', '.join(unlisted)}."
        )
    page = merged_page(merged, limit, after, before, ids)
    extra = {"x-claudeflare-unlisted": ", ".join(unlisted)} if unlisted else {}
    return http.Response.make(200, json.dumps(page), {"content-type": "application/json", **extra})
