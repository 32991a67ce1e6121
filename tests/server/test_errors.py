"""Every error the API can give, by hand, in OpenAI's shape; and the security rules."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.live import LONG_PROMPT, live_server, make_app, wait_for

CHAT = [{"role": "user", "content": "hi"}]


def post(live, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(live.url + path, content=content, headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, *, code=None, param=None, needle=None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    if needle is not None:
        assert needle.lower() in error["message"].lower(), error
    return error


@pytest.mark.parametrize("body", ["{bad json", "", "[1, 2", "\xff\xfe", "null"])
def test_malformed_json_is_400(live, body):
    assert_error(post(live, "/v1/completions", body.encode("latin-1")), 400)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": "tiny", "prompt": "a\ud800b"}, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "\udfff"}]}, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": ["x\ud800"]}, "stop"),
    ("/v1/completions", {"model": "tiny\ud800", "prompt": "hi"}, None),
])
def test_lone_surrogates_are_400(live, path, body, param):
    raw = json.dumps(body)  # json escapes the surrogate as \\ud800: valid JSON, invalid text
    response = post(live, path, raw)
    assert response.status_code in (400, 404), response.text
    assert_error(response, response.status_code, param=param)


def test_empty_messages_prompt_and_wrong_roles_are_400(live):
    assert_error(post(live, "/v1/chat/completions", {"model": "tiny", "messages": []}), 400, param="messages")
    assert_error(post(live, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "  "}]}),
                 400, needle="empty")
    assert_error(post(live, "/v1/chat/completions",
                      {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}), 400, needle="last message")
    assert_error(post(live, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}),
                 400, param="messages.0.role")
    assert_error(post(live, "/v1/completions", {"model": "tiny", "prompt": ""}), 400, needle="empty")
    assert_error(post(live, "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}), 400, param="prompt")
    assert_error(post(live, "/v1/completions", {"model": "tiny"}), 400, param="prompt", needle="missing")


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", 3), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5), ("seed", -1), ("seed", 2**64),
    ("n", 2), ("stop", [""]), ("stop", ["s"] * 17), ("stop", 5), ("top_k", -1), ("min_p", 1.0),
    ("repetition_penalty", 0), ("stream", "maybe"), ("unknown_field", 1), ("logprobs", 2),
    ("echo", True), ("presence_penalty", 0.5), ("model", ""),
    ("top_k", False), ("max_tokens", True), ("temperature", True), ("seed", "7"), ("stream", 1),
])
def test_invalid_parameters_are_400_naming_the_field(live, field, value):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, field: value}
    error = assert_error(post(live, "/v1/completions", body), 400)
    assert error["param"] == field or (error["param"] or "").startswith(field), error
    assert error["type"] == "invalid_request_error"


def test_context_length_exceeded_is_400_never_truncated(live):
    huge = post(live, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10**12})
    assert_error(huge, 400, code="context_length_exceeded", needle="512")
    long_prompt = "word " * 600  # > 512 tokens
    assert_error(post(live, "/v1/completions", {"model": "tiny", "prompt": long_prompt, "max_tokens": 1}),
                 400, code="context_length_exceeded", param="prompt")
    assert_error(post(live, "/v1/chat/completions",
                      {"model": "tiny", "messages": [{"role": "user", "content": long_prompt}]}),
                 400, code="context_length_exceeded", param="messages")
    just_over = post(live, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 511})
    assert_error(just_over, 400, code="context_length_exceeded")


def test_unknown_models_and_adapters_are_404(live):
    assert_error(post(live, "/v1/completions", {"model": "nope", "prompt": "hi"}), 404,
                 code="model_not_found", param="model")
    assert_error(post(live, "/v1/chat/completions", {"model": "tiny:nope", "messages": CHAT}), 404,
                 param="model")
    assert_error(post(live, "/v1/chat/completions", {"model": "tiny:qa@deadbeef", "messages": CHAT}), 404)
    assert_error(httpx.get(live.v1 + "/models/nope"), 404, code="model_not_found")


@pytest.mark.parametrize("model", ["../tiny", "/etc", "~/models/x", "./tiny", "tiny:/tmp/adapter",
                                   "..", "tiny:", ":qa", "a b", "tiny:qa@"])
def test_paths_and_malformed_names_never_load(live, model):
    response = post(live, "/v1/completions", {"model": model, "prompt": "hi"})
    assert response.status_code in (400, 404)
    assert_error(response, response.status_code, param="model")


def test_unknown_routes_and_methods_keep_the_error_shape(live):
    assert_error(httpx.get(live.url + "/v1/nothing"), 404)
    assert_error(httpx.delete(live.v1 + "/models"), 405)
    assert_error(httpx.get(live.v1 + "/completions"), 405)


def test_oversized_body_is_413(engine):
    with live_server(make_app(engine, max_body_bytes=10_000)) as live:
        big = {"model": "tiny", "prompt": "x" * 20_000}
        assert_error(post(live, "/v1/completions", big), 413, code="request_too_large")

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(30):
                yield b"x" * 1000
            yield b'"}'

        response = httpx.post(live.v1 + "/completions", content=chunks(),
                              headers={"content-type": "application/json"})
        assert_error(response, 413)
        ok = post(live, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_api_key_is_required_and_checked(engine):
    with live_server(make_app(engine, api_key="s3cret")) as live:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        assert_error(post(live, "/v1/completions", body), 401, code="invalid_api_key")
        assert_error(post(live, "/v1/completions", body, headers={"authorization": "Bearer wrong"}), 401)
        assert_error(post(live, "/v1/completions", body, headers={"authorization": "Basic s3cret"}), 401)
        assert_error(httpx.get(live.v1 + "/models"), 401)
        good = {"authorization": "Bearer s3cret"}
        assert post(live, "/v1/completions", body, headers=good).status_code == 200
        assert httpx.get(live.v1 + "/models", headers=good).status_code == 200
        assert httpx.get(live.url + "/health").status_code == 200  # liveness stays open


def test_full_queue_is_503_with_retry_after(engine):
    import openai

    with live_server(make_app(engine, max_batch=1, max_queue=0)) as live:
        with openai.OpenAI(base_url=live.v1, api_key="x", max_retries=0) as client:
            stream = client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=400,
                                               temperature=1.0, seed=1, stream=True)
            next(iter(stream))  # it holds the only row
            busy = post(live, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
            assert_error(busy, 503, code="overloaded")
            assert int(busy.headers["retry-after"]) >= 1
            stream.close()
            wait_for(lambda: live.batcher.in_flight == 0, what="the row to be released")
            assert post(live, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_host_header_is_checked_against_dns_rebinding(live):
    for host in ("evil.example", "attacker.com:8080", "127.0.0.1.nip.io"):
        assert_error(httpx.get(live.v1 + "/models", headers={"host": host}), 400, code="invalid_host")
    for host in ("localhost", "127.0.0.1:1234", "[::1]:8080", "LOCALHOST"):
        assert httpx.get(live.v1 + "/models", headers={"host": host}).status_code == 200


def test_no_cors_wildcard(live):
    origin = {"origin": "https://evil.example"}
    response = httpx.get(live.v1 + "/models", headers=origin)
    assert "access-control-allow-origin" not in response.headers
    preflight = httpx.options(live.v1 + "/chat/completions",
                              headers={**origin, "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code >= 400


def test_bind_rules():
    from hyprstream_tui.errors import InvalidInput
    from hyprstream_tui.server.security import allowed_hosts_for, check_bind

    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("::1", None)
    for host in ("0.0.0.0", "192.168.1.5", "example.com", "::"):
        with pytest.raises(InvalidInput, match="API key"):
            check_bind(host, None)
        check_bind(host, "key")
    assert "*" in allowed_hosts_for("0.0.0.0")
    assert "*" not in allowed_hosts_for("127.0.0.1")


def test_no_endpoint_loads_trains_exports_or_takes_code(live, engine):
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions
    from hyprstream_tui.errors import InvalidInput
    from hyprstream_tui.server.app import create_app

    routes = sorted((sorted(getattr(r, "methods", []) or []), r.path) for r in live.app.routes)
    paths = {path for _, path in routes}
    assert paths == {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/health",
                     "/v1/models", "/v1/models/{model_id:path}", "/v1/completions",
                     "/v1/chat/completions"}
    for field in ("trust_remote_code", "allow_pickle"):
        body = {"model": "tiny", "prompt": "hi", field: True}
        assert_error(post(live, "/v1/completions", body), 400, param=field)
    with pytest.raises(InvalidInput, match="pickle"):
        create_app(Engine(store=engine.store, options=LoadOptions(allow_pickle=True)))


def test_validation_problems_are_never_422_nor_tracebacks(live):
    for body in ({"model": 5, "prompt": "hi"}, {"model": "tiny", "messages": [{"role": "user"}]},
                 {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                 {"model": "tiny", "messages": "hi"}, [1, 2, 3], {"model": {"$ne": 1}, "prompt": "x"}):
        for path in ("/v1/completions", "/v1/chat/completions"):
            response = post(live, path, body)
            assert response.status_code == 400
            assert_error(response, 400)
    form = httpx.post(live.v1 + "/completions", data={"model": "tiny", "prompt": "hi"})
    assert_error(form, 400)
