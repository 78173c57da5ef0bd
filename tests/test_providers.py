"""The provider seam (claudeflare/providers): accounts.toml settings, model mapping, where a request
goes and how it is authenticated, and the 404 for a model no usable account serves."""

import asyncio
import gzip
import json
import re

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from claudeflare import providers
from claudeflare.accounts import AccountsError, Pool, parse_accounts
from claudeflare.balancer import Balancer
from claudeflare.credentials import Credential
from claudeflare.flows import FlowState
from claudeflare.ratelimit import Health, Signals
from claudeflare.router import Router
from claudeflare.states import AccountState

COMPATIBLE = """
[[accounts]]
name = "sub"
mode = "max"

[[accounts]]
name = "glm"
provider = "anthropic-compatible"
base_url = "https://llm.example.com:8443/api/anthropic/"
auth = "bearer"
priority = 1
models = { "claude-sonnet-*" = "glm-4.6", "claude-*" = "glm-4.5-air" }
"""


def accounts(text=COMPATIBLE):
    return {a.name: a for a in parse_accounts(text).accounts}


def test_an_account_without_provider_is_anthropic_as_before():
    sub = accounts()["sub"]
    assert (sub.provider, sub.mode, sub.settings) == ("anthropic", "max", None)
    assert providers.of(sub).serves(sub, "anything-at-all") and providers.of(sub).destination(sub) is None


def test_compatible_settings_are_parsed_once():
    glm = accounts()["glm"]
    assert (glm.provider, glm.mode, glm.priority) == ("anthropic-compatible", "api-key", 1)
    assert glm.settings.destination == providers.Destination("https", "llm.example.com", 8443, "/api/anthropic")
    assert glm.settings.auth == "bearer"


@pytest.mark.parametrize(
    "extra, message",
    [
        ('provider = ["anthropic"]\n', "'provider' must be one of"),
        (
            'provider = "openai"\n',
            "'provider' must be one of anthropic, anthropic-compatible, vertex, bedrock, got 'openai'",
        ),
        ('provider = "anthropic-compatible"\n', "'base_url' is required"),
        ('provider = "anthropic-compatible"\nbase_url = "ftp://x"\n', "'base_url' must be http(s)://host"),
        (
            'provider = "anthropic-compatible"\nbase_url = "https://u:secret@x"\n',
            "'base_url' must not hold credentials",
        ),
        ('provider = "anthropic-compatible"\nbase_url = "https://x:99999"\n', "bad port"),
        (
            'provider = "anthropic-compatible"\nbase_url = "https://x"\nauth = "basic"\n',
            "'auth' must be one of x-api-key, bearer",
        ),
        ('provider = "anthropic-compatible"\nbase_url = "https://x"\nmodels = ["a"]\n', "'models' must be a table"),
        (
            'provider = "anthropic-compatible"\nbase_url = "https://x"\nmodels = { "claude-*" = "glm-*" }\n',
            "not a model glob = model name",
        ),
        ('provider = "anthropic-compatible"\nbase_url = "https://x"\nmode = "max"\n', "takes mode 'api-key'"),
        ('mode = "api-key"\nbase_url = "https://x"\n', "base_url not for provider 'anthropic'"),
    ],
)
def test_bad_provider_settings_name_the_account_and_key(extra, message):
    with pytest.raises(AccountsError) as e:
        parse_accounts('[[accounts]]\nname = "a"\n' + extra, "accounts.toml")
    assert "line 1: account 'a': " in str(e.value) and message in str(e.value)
    assert "secret" not in str(e.value)  # a password in the URL is never echoed


def test_models_map_by_the_first_matching_glob_and_only_those_are_served():
    glm = accounts()["glm"]
    compatible = providers.of(glm)
    assert compatible.upstream_model(glm, "claude-sonnet-4-5") == "glm-4.6"  # first match wins
    assert compatible.upstream_model(glm, "claude-opus-4-1") == "glm-4.5-air"
    assert (
        compatible.serves(glm, "glm-4.6") and compatible.upstream_model(glm, "glm-4.6") is None
    )  # a listed name, as is
    assert not compatible.serves(glm, "gpt-5")


def test_a_rewrite_changes_the_top_level_model_only():
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": [{"type": "tool_result", "content": '{"model": "x"}'}]}],
            "tools": [{"name": "t", "input_schema": {"model": "claude-sonnet-4-5"}}],
            "model": "claude-sonnet-4-5",
            "max_tokens": 5,
            "note": "ünïcode",
        }
    ).encode()
    glm = accounts()["glm"]
    state = FlowState(id="x", started_at="now", model="claude-sonnet-4-5")
    rewrite = lambda data: providers.of(glm).rewrite(glm, state, data)  # noqa: E731
    out, path = providers.rewritten(rewrite, body)
    out = json.loads(out)
    assert (
        path is None and out["model"] == "glm-4.6" and out["tools"][0]["input_schema"]["model"] == "claude-sonnet-4-5"
    )
    assert out["note"] == "ünïcode" and out["messages"] == json.loads(body)["messages"]
    assert providers.rewritten(rewrite, b"[1]") is None and providers.rewritten(rewrite, b"{not json") is None


def flow_for(model: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request = http.Request.make(
        "POST",
        "https://api.anthropic.com/v1/messages?beta=true",
        json.dumps({"model": model, "max_tokens": 5, "messages": []}),
        {"content-type": "application/json", "host": "api.anthropic.com"},
    )
    return flow


def test_adapt_sends_each_attempt_where_its_provider_says_and_back():
    found = accounts()
    flow, state = flow_for("claude-sonnet-4-5"), FlowState(id="x", started_at="now", model="claude-sonnet-4-5")
    client_body = flow.request.raw_content

    asyncio.run(providers.adapt(flow.request, state, found["glm"]))
    request = flow.request
    assert (request.scheme, request.host, request.port, request.path) == (
        "https",
        "llm.example.com",
        8443,
        "/api/anthropic/v1/messages?beta=true",
    )
    assert request.headers["host"] == "llm.example.com:8443"
    assert json.loads(request.raw_content)["model"] == "glm-4.6"
    assert request.headers["content-length"] == str(len(request.raw_content))

    asyncio.run(
        providers.adapt(flow.request, state, found["sub"])
    )  # a failover to Anthropic: the client's request again
    assert (request.scheme, request.host, request.port, request.path) == (
        "https",
        "api.anthropic.com",
        443,
        "/v1/messages?beta=true",
    )
    assert request.headers["host"] == "api.anthropic.com"
    assert request.raw_content == client_body and request.headers["content-length"] == str(len(client_body))


@pytest.mark.parametrize(
    "auth, header, value",
    [("bearer", "authorization", "Bearer glm-key-123456"), ("x-api-key", "x-api-key", "glm-key-123456")],
)
def test_compatible_accounts_send_their_key_the_way_the_endpoint_wants(auth, header, value):
    glm = accounts(COMPATIBLE.replace('auth = "bearer"', f'auth = "{auth}"'))["glm"]
    headers = http.Headers(authorization="Bearer client", **{"x-api-key": "client", "anthropic-beta": "x"})
    providers.of(glm).authenticate(headers, glm, Credential(api_key="glm-key-123456"), None)
    assert headers.get(header) == value and len([k for k in headers if k in ("authorization", "x-api-key")]) == 1
    assert headers["anthropic-beta"] == "x"  # no OAuth flag: that is Anthropic's subscriptions' own


def router_for(pool: Pool) -> Router:
    return Router(lambda: pool, Balancer(), Health(), None)


def test_a_model_no_usable_account_serves_gets_a_404_naming_it_and_who_could():
    found = accounts(COMPATIBLE.replace('name = "sub"\nmode = "max"', 'name = "sub"\nmode = "max"\npaused = true'))
    pool = Pool(
        tuple(found.values()), {"glm": Credential(api_key="glm-key-123456"), "sub": Credential(access_token="t" * 20)}
    )
    router = router_for(pool)
    state = FlowState(id="x", started_at="now", model="gpt-5", endpoint="/v1/messages")
    assert router.allowed(pool, state) == []
    reply = router.no_account_response(pool, state)
    error = json.loads(reply.content)
    assert reply.status_code == 404 and error["error"]["type"] == "not_found_error"
    assert "'gpt-5'" in error["error"]["message"] and "sub (paused)" in error["error"]["message"]
    assert "glm" not in error["error"]["message"] and "glm-key" not in reply.text

    served = FlowState(id="y", started_at="now", model="claude-haiku-4-5", endpoint="/v1/messages")
    assert [a.name for a in router.allowed(pool, served)] == ["glm"]


def test_a_model_nobody_lists_says_so():
    found = accounts()
    pool = Pool((found["glm"],), {"glm": Credential(api_key="glm-key-123456")})
    message = json.loads(
        router_for(pool)
        .no_account_response(pool, FlowState(id="x", started_at="now", model="gpt-5", endpoint="/v1/messages"))
        .content
    )["error"]["message"]
    assert "no account lists it" in message and pool.state(found["glm"]) == AccountState.OK


def test_compatible_accounts_serve_the_messages_api_only():
    found = accounts()
    pool = Pool((found["glm"],), {"glm": Credential(api_key="glm-key-123456")})
    upload = FlowState(id="x", started_at="now", endpoint="/v1/files")
    assert router_for(pool).allowed(pool, upload) == []
    message = json.loads(router_for(pool).no_account_response(pool, upload).content)["error"]["message"]
    assert "no usable account serves /v1/files" in message
    counting = FlowState(id="y", started_at="now", model="claude-sonnet-4-5", endpoint="/v1/messages/count_tokens")
    assert router_for(pool).allowed(pool, counting) == [found["glm"]]


VERTEX = """
[[accounts]]
name = "gcp"
provider = "vertex"
region = "us-east5"
project = "my-project"
models = { "claude-sonnet-4-6*" = "claude-sonnet-4-6@20260101" }
"""


def test_vertex_models_map_to_vertex_ids():
    gcp = accounts(VERTEX)["gcp"]
    vertex = providers.of(gcp)
    assert (
        vertex.vertex_model(gcp, "claude-sonnet-4-5-20250929") == "claude-sonnet-4-5@20250929"
    )  # a dated id: NAME@DATE
    assert vertex.vertex_model(gcp, "claude-haiku-4-5") == "claude-haiku-4-5@20251001"  # an alias: the built-in table
    assert vertex.vertex_model(gcp, "claude-sonnet-4-6") == "claude-sonnet-4-6@20260101"  # accounts.toml first
    assert vertex.vertex_model(gcp, "claude-future-9") == "claude-future-9" and not vertex.serves(gcp, "gpt-5")
    assert vertex.destination(gcp) == providers.Destination("https", "us-east5-aiplatform.googleapis.com", 443)
    assert (
        providers.of(gcp).destination(accounts(VERTEX.replace("us-east5", "global"))["gcp"]).host
        == "aiplatform.googleapis.com"
    )


def test_vertex_takes_the_model_out_of_the_body_and_into_the_url():
    gcp = accounts(VERTEX)["gcp"]
    vertex = providers.of(gcp)
    vertex.held["gcp"] = providers.vertex.Held(gcp.settings, project="my-project")
    state = FlowState(id="x", started_at="now", model="claude-sonnet-4-5")
    for stream, method in ((True, "streamRawPredict"), (False, "rawPredict")):
        body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": stream, "messages": []}).encode()
        out, path = providers.rewritten(lambda data: vertex.rewrite(gcp, state, data), body)
        assert (
            path
            == f"/v1/projects/my-project/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:{method}"
        )
        assert json.loads(out) == {
            "anthropic_version": "vertex-2023-10-16",
            "max_tokens": 5,
            "stream": stream,
            "messages": [],
        }
    hostile = json.dumps({"model": "claude-x/../../../v1/projects/other:rawPredict?alt=", "messages": []}).encode()
    _, path = providers.rewritten(lambda data: vertex.rewrite(gcp, state, data), hostile)
    assert (
        path
        == "/v1/projects/my-project/locations/us-east5/publishers/anthropic/models/claude-x%2F..%2F..%2F..%2Fv1%2Fprojects%2Fother%3ArawPredict%3Falt%3D:rawPredict"
    )


@pytest.mark.parametrize(
    "table, message",
    [
        ('region = "us east"\n', "'region' must be a Vertex AI region"),
        ('project = "X!"\n', "'project' must be a Google Cloud project id"),
        ('credentials_file = ""\n', "'credentials_file' is the path"),
        ('auth = "bearer"\n', "auth not for provider 'vertex'"),
    ],
)
def test_bad_vertex_settings(table, message):
    with pytest.raises(AccountsError) as e:
        parse_accounts('[[accounts]]\nname = "gcp"\nprovider = "vertex"\n' + table)
    assert message in str(e.value)


def test_google_errors_become_anthropic_errors_and_a_429_is_a_limit():
    vertex = providers.PROVIDERS["vertex"]
    google = http.Response.make(
        429, json.dumps({"error": {"code": 429, "message": "Quota exceeded.", "status": "RESOURCE_EXHAUSTED"}})
    )
    assert (
        vertex.signals(google, Signals()).exhausted
        and not providers.PROVIDERS["anthropic"].signals(google, Signals()).exhausted
    )
    vertex.reply(google)
    body = json.loads(google.content)
    assert body["type"] == "error" and body["error"] == {
        "type": "rate_limit_error",
        "message": "Vertex AI: Quota exceeded.",
    }
    listed = http.Response.make(
        400, json.dumps([{"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}])
    )
    vertex.reply(listed)
    assert json.loads(listed.content)["error"]["type"] == "invalid_request_error"
    ours = http.Response.make(
        503, json.dumps({"type": "error", "error": {"type": "api_error", "message": "Claudeflare: x"}})
    )
    vertex.reply(ours)
    assert json.loads(ours.content)["error"]["message"] == "Claudeflare: x"  # already Anthropic's shape: left alone


def test_bedrock_event_stream_becomes_sse_frame_by_frame_as_it_arrives():
    from fake_bedrock import chunk, frame

    start, stop = (
        chunk({"type": "message_start", "message": {"id": "m"}}),
        chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": {}}),
    )
    translate = providers.bedrock.EventStreamToSSE()
    out = [translate(start[i : i + 1]) for i in range(len(start))]  # one byte at a time
    assert out[:-1] == [[]] * (len(start) - 1)  # nothing until the frame is whole, then its event at once
    assert out[-1] == b'event: message_start\ndata: {"type":"message_start","message":{"id":"m"}}\n\n'
    assert translate(stop) == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'  # Bedrock's metrics left out

    throttled = frame(
        {":message-type": "exception", ":exception-type": "throttlingException"}, b'{"message":"slow down"}'
    )
    event = providers.bedrock.EventStreamToSSE()(throttled)
    assert event.startswith(b"event: error\n") and json.loads(event.split(b"data: ")[1])["error"] == {
        "type": "rate_limit_error",
        "message": "Amazon Bedrock: slow down",
    }

    torn = bytearray(start)
    torn[-1] ^= 0xFF  # a bad CRC
    broken = providers.bedrock.EventStreamToSSE()
    assert (
        json.loads(broken(bytes(torn)).split(b"data: ")[1])["error"]["message"]
        == "Amazon Bedrock: unreadable event stream"
    )
    assert broken(stop) == []  # nothing after a broken frame is trusted


def test_bedrock_maps_models_and_rewrites_the_body():
    aws = accounts(
        '[[accounts]]\nname = "aws"\nprovider = "bedrock"\nregion = "eu-west-1"\n'
        'models = { "claude-sonnet-4-6*" = "eu.anthropic.claude-sonnet-4-6-v1:0" }\n'
    )["aws"]
    bedrock = providers.of(aws)
    assert bedrock.bedrock_model(aws, "claude-sonnet-4-5") == "anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert bedrock.bedrock_model(aws, "claude-opus-4-1-20250805") == "anthropic.claude-opus-4-1-20250805-v1:0"
    assert bedrock.bedrock_model(aws, "claude-sonnet-4-6") == "eu.anthropic.claude-sonnet-4-6-v1:0"
    assert not bedrock.serves(aws, "claude-unknown") and not bedrock.serves(aws, "gpt-5")
    assert bedrock.destination(aws).host == "bedrock-runtime.eu-west-1.amazonaws.com"
    body = json.dumps({"model": "claude-sonnet-4-6", "stream": True, "max_tokens": 5, "messages": []}).encode()
    out, path = providers.rewritten(lambda data: bedrock.rewrite(aws, None, data), body)
    assert path == "/model/eu.anthropic.claude-sonnet-4-6-v1%3A0/invoke-with-response-stream"
    assert json.loads(out) == {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []}


def test_bedrock_errors_become_anthropic_errors_and_throttling_is_a_limit():
    bedrock = providers.PROVIDERS["bedrock"]
    throttled = http.Response.make(
        429, b'{"message":"Too many requests"}', {"x-amzn-errortype": "ThrottlingException:http://internal.amazon.com/"}
    )
    assert bedrock.signals(throttled, Signals()).account_exhausted
    bedrock.reply(throttled)
    assert json.loads(throttled.content)["error"] == {
        "type": "rate_limit_error",
        "message": "Amazon Bedrock: Too many requests",
    }


def test_an_aws_session_token_is_a_placeholder_in_the_flow():
    from claudeflare import wire

    request = flow_for("claude-sonnet-4-5").request
    wire.conceal(
        request,
        http.Headers(authorization="AWS4-HMAC-SHA256 Credential=AKIA/…", **{"x-amz-security-token": "FwoGZX-session"}),
        "aws",
    )
    assert (
        request.headers["x-amz-security-token"] == "[claudeflare: aws]"
        and "AKIA" not in request.headers["authorization"]
    )
    assert wire.on_wire(request).headers["x-amz-security-token"] == "FwoGZX-session"


def signed_like_botocore(request, headers, key_id: str, secret: str = "stored/secret+key0123456789") -> bool:
    """Whether `headers` carry the SigV4 signature botocore makes of `request` with this key pair."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    signed = AWSRequest(
        "POST",
        request.url,
        data=request.raw_content,
        headers={"content-type": "application/json", "accept": "*/*", "x-amz-date": headers["x-amz-date"]},
    )
    signed.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(Credentials(key_id, secret), "bedrock", "eu-west-1")
    expected = signer.signature(signer.string_to_sign(signed, signer.canonical_request(signed)), signed)
    return headers["authorization"].endswith(f"Signature={expected}")


def test_a_stored_aws_key_pair_signs_instead_of_the_chain_and_never_shows(monkeypatch, caplog):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACHAINCHAINCHAIN0")  # the chain's: must not be used
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chain-secret-chain-secret")
    aws = accounts('[[accounts]]\nname = "aws-pair"\nprovider = "bedrock"\nregion = "eu-west-1"\n')["aws-pair"]
    bedrock = providers.of(aws)
    pair = Credential(aws_access_key_id="AKIASTOREDSTORED0001", aws_secret_access_key="stored/secret+key0123456789")
    assert asyncio.run(bedrock.credential(aws, pair)) is not None
    request = flow_for("claude-sonnet-4-5").request
    headers = http.Headers(**{"content-type": "application/json"})
    bedrock.authenticate(headers, aws, None, request)
    assert "Credential=AKIASTOREDSTORED0001/" in headers["authorization"] and "x-amz-security-token" not in headers
    assert signed_like_botocore(request, headers, "AKIASTOREDSTORED0001")  # the stored secret signed it
    shown = repr(pair) + repr(bedrock.held["aws-pair"]) + caplog.text
    assert "stored/secret" not in shown and "AKIASTORED" not in shown

    bad = Credential(aws_access_key_id="AKIASTOREDSTORED0001", aws_secret_access_key="two words")
    assert asyncio.run(bedrock.credential(aws, bad)) is None  # not the chain's instead
    assert bedrock.problem(aws) == "malformed stored AWS key pair" and "two words" not in caplog.text


def test_a_big_bedrock_body_is_hashed_off_the_loop_and_signed_as_botocore_would(monkeypatch):
    import threading

    from claudeflare.providers import bedrock as bedrock_module

    aws = accounts('[[accounts]]\nname = "aws-big"\nprovider = "bedrock"\nregion = "eu-west-1"\n')["aws-big"]
    bedrock = providers.of(aws)
    pair = Credential(aws_access_key_id="AKIASTOREDSTORED0002", aws_secret_access_key="stored/secret+key0123456789")
    assert asyncio.run(bedrock.credential(aws, pair)) is not None
    hashed_in = []
    hash_body = bedrock_module.sha256_hex
    monkeypatch.setattr(
        bedrock_module, "sha256_hex", lambda body, **kw: hashed_in.append(threading.current_thread()) or hash_body(body)
    )

    request = flow_for("claude-sonnet-4-5").request
    request.raw_content = b'{"messages": "' + b"x" * 400_000 + b'"}'  # past LOOP_PARSE_LIMIT
    asyncio.run(bedrock.prepare(request))
    assert [t is threading.main_thread() for t in hashed_in] == [False]  # the parser thread did it
    headers = http.Headers(**{"content-type": "application/json"})
    bedrock.authenticate(headers, aws, None, request)
    assert signed_like_botocore(request, headers, "AKIASTOREDSTORED0002")
    request.raw_content = b'{"changed": true}'  # since prepare: its digest no longer holds
    headers = http.Headers(**{"content-type": "application/json"})
    bedrock.authenticate(headers, aws, None, request)
    assert signed_like_botocore(request, headers, "AKIASTOREDSTORED0002")


def test_a_compressed_body_is_rewritten_plain_and_a_failover_gets_the_clients_own_again():
    found = accounts()
    flow, state = flow_for("claude-sonnet-4-5"), FlowState(id="x", started_at="now", model="claude-sonnet-4-5")
    plain = flow.request.raw_content
    flow.request.raw_content = client_body = gzip.compress(plain)
    flow.request.headers["content-encoding"] = "GZIP"
    request = flow.request

    asyncio.run(providers.adapt(request, state, found["glm"]))  # its model mapping rewrites the body
    assert json.loads(request.raw_content)["model"] == "glm-4.6"
    assert "content-encoding" not in request.headers and request.headers["content-length"] == str(
        len(request.raw_content)
    )
    asyncio.run(providers.adapt(request, state, found["sub"]))  # Anthropic: the client's bytes, as sent
    assert request.raw_content == client_body and request.headers["content-encoding"] == "gzip"


def test_a_compressed_body_that_is_a_bomb_or_corrupt_is_left_as_it_is():
    found = accounts()
    for body in (gzip.compress(b'{"model": "' + b"x" * (33 << 20) + b'"}'), b"\x1f\x8b not gzip"):
        flow, state = flow_for("claude-sonnet-4-5"), FlowState(id="x", started_at="now", model="claude-sonnet-4-5")
        flow.request.raw_content = body
        flow.request.headers["content-encoding"] = "gzip"
        asyncio.run(providers.adapt(flow.request, state, found["glm"]))
        assert flow.request.raw_content == body and flow.request.headers["content-encoding"] == "gzip"


def test_the_example_files_provider_accounts_parse_when_uncommented():
    text = open("accounts.example.toml").read()
    block = text[text.index('# [[accounts]]\n# name = "glm"') : text.index("# Optional: alerts")]
    found = parse_accounts(re.sub(r"(?m)^# ?", "", block)).accounts
    assert [(a.name, a.provider, a.priority) for a in found] == [
        ("glm", "anthropic-compatible", 2),
        ("aws", "bedrock", 2),
        ("gcp", "vertex", 2),
    ]
