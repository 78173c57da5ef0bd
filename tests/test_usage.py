import asyncio
import gzip
import json
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from claudeflare.flows import FlowState
from claudeflare.recorder import SideParser
from claudeflare.usage import MAX_LINE, SSEUsageParser, Usage, usage_from_json, zstd

MODEL = "claude-sonnet-4-5-20250929"


def frame(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def text_delta(text: str) -> bytes:
    return frame(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
    )


MESSAGE_START = frame(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "usage": {
                "input_tokens": 12,
                "cache_creation_input_tokens": 2000,
                "cache_read_input_tokens": 30000,
                "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 500},
                "output_tokens": 1,
            },
        },
    },
)
STREAM = b"".join(
    [
        MESSAGE_START,
        frame(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        frame("ping", {"type": "ping"}),
        text_delta("héllo ✓"),
        text_delta(" and more ✓✓ text"),
        frame("content_block_stop", {"type": "content_block_stop", "index": 0}),
        frame(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 42},
            },
        ),
        frame("message_stop", {"type": "message_stop"}),
    ]
)
COMPRESSORS = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress, "zstd": zstd.compress}
EXPECTED = Usage(
    model=MODEL,
    input_tokens=12,
    output_tokens=42,
    cache_read_input_tokens=30000,
    cache_creation_input_tokens=2000,
    cache_creation_1h_input_tokens=500,
    stop_reason="end_turn",
)


def parse(*chunks: bytes, encoding: str | None = None) -> SSEUsageParser:
    parser = SSEUsageParser(encoding)
    for chunk in chunks:
        parser.feed(chunk)
    return parser


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_whole_stream():
    parser = parse(STREAM)
    assert parser.usage == EXPECTED
    assert parser.seen_events


def test_byte_by_byte():
    assert parse(*pieces(STREAM, 1)).usage == EXPECTED


def test_every_single_split_position():
    for i in range(len(STREAM) + 1):
        assert parse(STREAM[:i], STREAM[i:]).usage == EXPECTED, f"split at {i}"


def test_split_inside_a_multibyte_character():
    check = "✓".encode()
    at = STREAM.index(check)
    for offset in (1, 2):
        assert parse(STREAM[: at + offset], STREAM[at + offset :]).usage == EXPECTED


def test_crlf_line_endings():
    assert parse(STREAM.replace(b"\n", b"\r\n")).usage == EXPECTED


def test_type_read_from_json_without_event_lines_or_space_after_colon():
    lenient = b"\n".join(
        line.replace(b"data: ", b"data:") for line in STREAM.split(b"\n") if not line.startswith(b"event:")
    )
    assert parse(*pieces(lenient, 5)).usage == EXPECTED


@pytest.mark.parametrize(
    "encoding, compress",
    [
        ("gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),
        ("br", brotli.compress),
        ("zstd", zstd.compress),
    ],
)
def test_encoded_stream_in_small_chunks(encoding, compress):
    encoded = compress(STREAM)
    assert parse(*pieces(encoded, 7), encoding=encoding).usage == EXPECTED
    assert parse(*pieces(encoded, 1), encoding=encoding).usage == EXPECTED


def test_concatenated_gzip_members_and_zstd_frames():
    half = STREAM.index(b"event: message_delta")
    for encoding, compress in (("gzip", gzip.compress), ("zstd", zstd.compress)):
        encoded = compress(STREAM[:half]) + compress(STREAM[half:])
        assert parse(*pieces(encoded, 11), encoding=encoding).usage == EXPECTED


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_large_decoded_output_comes_out_in_steps(encoding):
    filler = text_delta("x" * 4000) * 1000  # ~4 MB decoded from a few KB
    encoded = COMPRESSORS[encoding](MESSAGE_START + filler + STREAM[len(MESSAGE_START) :])
    assert parse(encoded, encoding=encoding).usage == EXPECTED


def test_unknown_encoding_reads_nothing_and_never_raises():
    parser = parse(STREAM, encoding="compress")
    assert parser.usage == Usage()
    assert not parser.seen_events


def test_decode_error_stops_parsing_and_keeps_usage_so_far():
    encoded = gzip.compress(MESSAGE_START)
    parser = parse(encoded[:-8], encoding="gzip")  # whole deflate data, no trailer yet
    assert parser.usage.input_tokens == 12
    parser.feed(b"\xff" * 64 + STREAM)  # corrupt trailer, then more bytes that are not gzip
    parser.feed(STREAM)
    assert parser.usage.input_tokens == 12
    assert parser.usage.output_tokens == 1


def test_unknown_events_and_ping_are_ignored():
    noise = frame("ping", {"type": "ping"}) + frame(
        "future_event", {"type": "future_event", "usage": {"output_tokens": 999}}
    )
    at = STREAM.index(b"event: message_delta")
    assert parse(noise + STREAM[:at] + noise + STREAM[at:] + noise).usage == EXPECTED


def test_in_stream_error_event():
    error = frame("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    usage = parse(MESSAGE_START + text_delta("partial") + error).usage
    assert (usage.error_type, usage.error_message) == ("overloaded_error", "Overloaded")
    assert usage.input_tokens == 12


def test_error_event_without_details_still_reports_an_error():
    usage = parse(frame("error", {"type": "error", "error": "boom"})).usage
    assert (usage.error_type, usage.error_message) == ("error", None)


def test_message_delta_counts_are_cumulative_latest_wins():
    deltas = frame("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 10}}) + frame(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 25, "input_tokens": 40},
        },
    )
    usage = parse(MESSAGE_START + deltas).usage
    assert (usage.output_tokens, usage.input_tokens, usage.stop_reason) == (25, 40, "tool_use")
    assert usage.cache_read_input_tokens == 30000  # absent from the deltas: kept from message_start


def test_cache_creation_1h_split():
    usage = parse(MESSAGE_START).usage
    assert (usage.cache_creation_input_tokens, usage.cache_creation_1h_input_tokens) == (2000, 500)


@pytest.mark.parametrize("bad", ["x", None, True, -1, 1.5, [1], {"n": 1}])
def test_bad_values_are_ignored(bad):
    start = {
        "type": "message_start",
        "message": {"model": 7, "usage": {"input_tokens": bad, "output_tokens": 3, "cache_creation": bad}},
    }
    delta = {"type": "message_delta", "delta": {"stop_reason": [bad]}, "usage": {"output_tokens": bad}}
    usage = parse(frame("message_start", start) + frame("message_delta", delta)).usage
    assert usage == Usage(output_tokens=3)


def test_malformed_events_are_skipped():
    junk = (
        b"event: message_start\ndata: {not json\n\n"
        b"event: message_start\ndata: [1, 2]\n\n"
        b'event: message_delta\ndata: {"type": "message_delta", "usage": 5, "delta": []}\n\n'
        b"data: \xff\xfe\xfd\n\n"
        b"data: " + b"[" * 100_000 + b"\n\n"
        b": a comment\nretry: 100\nid: 3\n\n"
    )
    assert parse(junk + STREAM + junk).usage == EXPECTED


def test_garbage_is_not_sse():
    parser = parse(b"<html>502 Bad Gateway</html>\n", b"data: nope\n\n")
    assert not parser.seen_events
    assert parser.usage == Usage()


def test_huge_line_without_newline_stays_bounded():
    parser = SSEUsageParser()
    for _ in range(50):
        parser.feed(b"x" * 100_000)
        assert parser._pending_len <= MAX_LINE
    parser.feed(b"x" * (3 * MAX_LINE))  # one chunk larger than the cap
    assert parser._pending_len <= MAX_LINE
    parser.feed(b'xx data: {"type": "message_start"}\n')  # the tail of the dropped line is dropped too
    assert not parser.seen_events
    parser.feed(STREAM)
    assert parser.usage == EXPECTED


def test_feed_copies_mutable_buffers():
    parser = SSEUsageParser()
    at = STREAM.index(b"event: message_delta") + 30  # mid-line, so a piece is buffered
    for chunk in (STREAM[:at], STREAM[at:]):
        buffer = bytearray(chunk)
        parser.feed(buffer)
        buffer[:] = b"\0" * len(buffer)  # the caller reuses its buffer
    assert parser.usage == EXPECTED


def test_usage_from_json_message():
    body = {
        "id": "msg_1",
        "type": "message",
        "model": MODEL,
        "content": [{"type": "text", "text": "hi ✓"}],
        "stop_reason": "max_tokens",
        "usage": {
            "input_tokens": 5,
            "output_tokens": 7,
            "cache_read_input_tokens": 3,
            "cache_creation_input_tokens": 0,
        },
    }
    expected = Usage(model=MODEL, input_tokens=5, output_tokens=7, cache_read_input_tokens=3, stop_reason="max_tokens")
    assert usage_from_json(json.dumps(body).encode()) == expected
    assert usage_from_json(gzip.compress(json.dumps(body).encode()), "gzip") == expected
    assert usage_from_json(brotli.compress(json.dumps(body).encode()), "br") == expected


def test_usage_from_json_error_body():
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"},"request_id":"req_1"}'
    usage = usage_from_json(body)
    assert (usage.error_type, usage.error_message) == ("rate_limit_error", "slow down")
    assert usage.input_tokens == 0


@pytest.mark.parametrize(
    "body, encoding",
    [
        (b"", None),
        (b"not json", None),
        (b"[1]", None),
        (b"\xff\xfe", None),
        (b"[" * 100_000, None),
        (b"{}", "compress"),
        (b"{}", "gzip"),
    ],
)
def test_usage_from_json_none_cases(body, encoding):
    assert usage_from_json(body, encoding) is None


ENCODINGS = st.sampled_from([None, *COMPRESSORS])


@st.composite
def chunkings(draw, data: bytes):
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=10), ENCODINGS)
def test_arbitrary_bytes_never_raise_nor_change_chunks(chunks, encoding):
    parser = SSEUsageParser(encoding)
    for chunk in chunks:
        copy = bytearray(chunk)
        parser.feed(copy)
        assert copy == chunk
    assert isinstance(parser.usage, Usage)


@settings(max_examples=200, deadline=None)
@given(st.data(), ENCODINGS)
def test_arbitrary_sse_like_text_never_raises(data, encoding):
    lines = data.draw(
        st.lists(
            st.sampled_from([b"event: message_start", b"data: {", b"data: null", b"\r", b"", b"data:"])
            | st.binary(max_size=40)
        )
    )
    raw = b"\n".join(lines) + STREAM
    encoded = raw if encoding is None else COMPRESSORS[encoding](raw)
    parse(*data.draw(chunkings(encoded)), encoding=encoding)


@settings(max_examples=300, deadline=None)
@given(st.data(), ENCODINGS)
def test_valid_stream_split_anywhere_gives_the_same_usage(data, encoding):
    encoded = STREAM if encoding is None else COMPRESSORS[encoding](STREAM)
    assert parse(*data.draw(chunkings(encoded)), encoding=encoding).usage == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=10), ENCODINGS)
def test_the_stream_callback_forwards_arbitrary_chunks_unchanged(chunks, encoding):
    """What mitmproxy sends on is what the recorder's stream callback returns: exactly the input."""

    async def run():
        state = FlowState(id="x", started_at="t")
        side = SideParser(SSEUsageParser(encoding), state)
        forwarded = [side(chunk) for chunk in [*chunks, b""]]
        await asyncio.sleep(0)  # the first chunk is parsed after it went out
        return forwarded, side.usage

    forwarded, usage = asyncio.run(run())
    assert forwarded == [*chunks, b""] and isinstance(usage, Usage)
