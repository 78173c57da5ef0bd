"""Token usage of Anthropic `/v1/messages` replies, streamed (SSE) or not.

`SSEUsageParser` reads usage on the side of a stream that is forwarded untouched: it is fed every
chunk as it passes, decodes Content-Encoding incrementally, and never raises, so a malformed reply
can cost the flow log its numbers but never the client its answer.
"""

import json
import logging
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # the backport mitmproxy itself depends on
    from backports import zstd

logger = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # longest SSE line parsed; longer ones are dropped so newline-free garbage can't grow memory
DECODE_STEP = 1 << 20  # most bytes one decompress call may produce, so a small chunk can't balloon memory
MAX_JSON_BODY = 32 << 20  # largest decoded non-streamed body worth parsing

_COUNT_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
_USAGE_EVENTS = frozenset({b"message_start", b"message_delta", b"error"})
DECODE_ERRORS = (zlib.error, brotli.error, zstd.ZstdError, EOFError)


@dataclass
class Usage:
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0  # the part of cache_creation_input_tokens written with a 1-hour TTL
    stop_reason: str | None = None
    error_type: str | None = None  # e.g. "overloaded_error", from an error body or an in-stream `event: error`
    error_message: str | None = None


# --- Content-Encoding -------------------------------------------------------------------------


class _Decoder(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...


class _FramedDecoder:
    """Decompresses member after member (concatenated gzip members and zstd frames are legal),
    at most DECODE_STEP bytes of output per call."""

    def __init__(self, new: Callable[[], object]):
        self._new = new
        self._obj = new()

    def feed(self, data: bytes) -> Iterator[bytes]:
        while True:
            out = self._obj.decompress(data, DECODE_STEP)
            if out:
                yield out
            if self._obj.eof:
                data = self._obj.unused_data
                self._obj = self._new()
                if not data:
                    return
            else:
                data = self._rest(out)
                if data is None:
                    return

    def _rest(self, out: bytes) -> bytes | None:
        """What to feed next within the member, or None when the input is used up."""
        raise NotImplementedError


class _ZlibDecoder(_FramedDecoder):
    """gzip, zlib or raw deflate."""

    def __init__(self, wbits: int):
        super().__init__(lambda: zlib.decompressobj(wbits))

    def _rest(self, out: bytes) -> bytes | None:
        tail = self._obj.unconsumed_tail
        return tail if tail or len(out) >= DECODE_STEP else None  # a full step may leave output pending


class _DeflateDecoder:
    """HTTP `deflate` should be zlib-wrapped, but some servers send raw deflate: sniff the zlib header."""

    def __init__(self) -> None:
        self._head = b""
        self._inner: _ZlibDecoder | None = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._inner is None:
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, b""
            zlib_wrapped = data[0] & 0x0F == 8 and int.from_bytes(data[:2]) % 31 == 0
            self._inner = _ZlibDecoder(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
        yield from self._inner.feed(data)


class _BrotliDecoder:
    def __init__(self) -> None:
        self._obj = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        out = self._obj.process(data, output_buffer_limit=DECODE_STEP)
        yield out
        # A full step may hold output back even when can_accept_more_data() already says True.
        while len(out) >= DECODE_STEP or not self._obj.can_accept_more_data():
            out = self._obj.process(b"", output_buffer_limit=DECODE_STEP)
            if not out:
                return
            yield out


class _ZstdDecoder(_FramedDecoder):
    def __init__(self) -> None:
        super().__init__(zstd.ZstdDecompressor)

    def _rest(self, out: bytes) -> bytes | None:
        return None if self._obj.needs_input else b""  # input is buffered inside; fetch the pending output


_DECODERS: dict[str, Callable[[], _Decoder]] = {
    "gzip": lambda: _ZlibDecoder(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _ZlibDecoder(16 + zlib.MAX_WBITS),
    "deflate": _DeflateDecoder,
    "br": _BrotliDecoder,
    "zstd": _ZstdDecoder,
}


def _new_decoder(content_encoding: str | None) -> _Decoder | None:
    """None for an identity body; ValueError for an encoding we can't decode."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return None
    factory = _DECODERS.get(encoding)
    if factory is None:
        raise ValueError(f"unsupported content-encoding {content_encoding!r}")
    return factory()


# --- Field extraction ---------------------------------------------------------------------------


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # `type is` rejects bools


def _apply_usage(usage: Usage, raw: object) -> None:
    """Copy each well-typed count present in `raw`; later values replace earlier ones (they are cumulative)."""
    if not isinstance(raw, dict):
        return
    for field in _COUNT_FIELDS:
        value = raw.get(field)
        if _is_count(value):
            setattr(usage, field, value)
    split = raw.get("cache_creation")
    if isinstance(split, dict) and _is_count(one_hour := split.get("ephemeral_1h_input_tokens")):
        usage.cache_creation_1h_input_tokens = one_hour


def _apply_error(usage: Usage, body: dict) -> None:
    error = body.get("error")
    error = error if isinstance(error, dict) else {}
    kind, message = error.get("type"), error.get("message")
    usage.error_type = kind if isinstance(kind, str) and kind else "error"  # an error without a type is still an error
    usage.error_message = message if isinstance(message, str) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


# --- SSE ----------------------------------------------------------------------------------------


class SSEUsageParser:
    """Accumulates `Usage` from an SSE reply fed chunk by chunk (chunks may split lines and characters)."""

    def __init__(self, content_encoding: str | None = None):
        self.usage = Usage()
        self.seen_events = False  # a well-formed event was parsed: the body is SSE, not garbage
        self._pending: list[bytes] = []  # pieces of the incomplete last line
        self._pending_len = 0
        self._dropping = False  # inside an over-long line: discard up to the next newline
        self._event: bytes | None = None  # name from the last `event:` line, for the next `data:` line
        self._stopped = False
        try:
            self._decoder = _new_decoder(content_encoding)
        except ValueError as e:
            logger.debug("not reading usage: %s", e)
            self._decoder = None
            self._stopped = True

    def feed(self, chunk: bytes) -> None:
        if self._stopped or not chunk:
            return
        try:
            chunk = bytes(chunk)  # keep no view of a caller's mutable buffer
            if self._decoder is None:
                self._feed_text(chunk)
            else:
                for piece in self._decoder.feed(chunk):
                    self._feed_text(piece)
        except DECODE_ERRORS as e:
            logger.debug("stopped reading usage: undecodable body (%s)", e)
            self._stopped = True
        except Exception:
            logger.exception("stopped reading usage: parser failure")
            self._stopped = True

    def _feed_text(self, data: bytes) -> None:
        if not self._pending and not self._dropping and data.endswith(b"\n\n"):
            # Whole events, the usual chunk: once the stream is known good, only those that may carry
            # usage or an error are read line by line (not content deltas nor pings).
            for event in data.split(b"\n\n")[:-1]:
                if self.seen_events and b"message_" not in event and b"error" not in event:
                    continue
                for line in event.split(b"\n"):
                    self._line(line)
                self._event = None  # the blank line that ended it
            return
        lines = data.split(b"\n")
        if len(lines) == 1:
            self._buffer(data)
            return
        first = lines[0]
        if self._pending:
            first = b"".join(self._pending) + first
            self._pending.clear()
            self._pending_len = 0
        if self._dropping:
            self._dropping = False
        else:
            self._line(first)
        for line in lines[1:-1]:
            self._line(line)
        self._buffer(lines[-1])

    def _buffer(self, part: bytes) -> None:
        if not part or self._dropping:
            return
        self._pending.append(part)
        self._pending_len += len(part)
        if self._pending_len > MAX_LINE:
            self._pending.clear()
            self._pending_len = 0
            self._dropping = True

    def _line(self, line: bytes) -> None:
        if len(line) > MAX_LINE:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._event = None  # a blank line ends the event
        elif line.startswith(b"data:"):
            self._data(line[5:])
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()

    def _data(self, payload: bytes) -> None:
        name, self._event = self._event, None
        # Most events are content deltas: once the stream is known good, skip them without parsing JSON.
        if name and self.seen_events and name not in _USAGE_EVENTS:
            return
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        kind = name.decode("utf-8", "replace") if name else event.get("type")
        if not isinstance(kind, str) or not kind:
            return
        self.seen_events = True
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self.usage.model = _str_or_none(message.get("model")) or self.usage.model
                _apply_usage(self.usage, message.get("usage"))
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(stop_reason := delta.get("stop_reason"), str):
                self.usage.stop_reason = stop_reason
            _apply_usage(self.usage, event.get("usage"))
        elif kind == "error":
            _apply_error(self.usage, event)


# --- Non-streamed replies -----------------------------------------------------------------------


def decode_body(body: bytes, content_encoding: str | None) -> bytes | None:
    """`body` decoded, or None past MAX_JSON_BODY decoded (a bomb); ValueError for an unknown encoding,
    one of DECODE_ERRORS for a corrupt body."""
    decoder = _new_decoder(content_encoding)
    if decoder is None:
        return body
    pieces, size = [], 0
    for piece in decoder.feed(body):
        size += len(piece)
        if size > MAX_JSON_BODY:
            return None
        pieces.append(piece)
    return b"".join(pieces)


def usage_from_json(body: bytes, content_encoding: str | None = None) -> Usage | None:
    """Usage of a non-streamed reply, or the error of an error body; None when the body is no JSON object."""
    try:
        data = decode_body(body, content_encoding)
        parsed = json.loads(data) if data else None
    except (ValueError, RecursionError, *DECODE_ERRORS) as e:
        logger.debug("no usage in reply body: %s", e)
        return None
    if not isinstance(parsed, dict):
        return None
    usage = Usage(model=_str_or_none(parsed.get("model")), stop_reason=_str_or_none(parsed.get("stop_reason")))
    _apply_usage(usage, parsed.get("usage"))
    if parsed.get("type") == "error" or isinstance(parsed.get("error"), dict):
        _apply_error(usage, parsed)
    return usage
