"""The LLM engine, response cache and OpenAI backend against the fault-injecting test server."""

from __future__ import annotations

import asyncio
import bisect
import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_server import ServerProcess  # noqa: E402

from bsafe_data.generate.base import GenerationRequest  # noqa: E402
from bsafe_data.generate.factory import GeneratorUnavailable, make_generator  # noqa: E402
from bsafe_data.generate.openai_backend import OpenAIGenerator  # noqa: E402
from bsafe_data.inject import (  # noqa: E402
    TEMPLATE_VERSION,
    load_template,
    looks_like_refusal,
    normalise_span,
    parse_output,
)
from bsafe_data.llm.cache import ResponseCache, cache_prune, cache_stats, request_key  # noqa: E402
from bsafe_data.llm.client import check_endpoint, parse_completion  # noqa: E402
from bsafe_data.llm.engine import Call, Engine  # noqa: E402
from bsafe_data.llm.errors import FatalEndpointError, RequestFailed, redact  # noqa: E402
from bsafe_data.llm.ratelimit import RateLimiter  # noqa: E402
from bsafe_data.llm.retry import backoff_s, parse_duration_s, retry_after_s  # noqa: E402
from bsafe_data.llm.transport import PRIORITY, Transport  # noqa: E402
from bsafe_data.recipe import GeneratorSpec  # noqa: E402

MODEL = "test-model"
PART1 = "Preheat the oven to 200 degrees and line a tray with baking paper."


@pytest.fixture(scope="module")
def server():
    with ServerProcess(model=MODEL) as srv:
        yield srv


@pytest.fixture()
def srv(server):
    server.reset()
    return server


def spec_for(srv: ServerProcess, **overrides) -> GeneratorSpec:
    values = dict(
        provider="openai",
        model=MODEL,
        base_url=srv.url,
        api_key_env="BSAFE_TEST_KEY",
        timeout_s=5.0,
        max_retries=3,
        refusal_retries=2,
        max_concurrency=8,
    )
    values.update(overrides)
    return GeneratorSpec(**values)


def req(i: int, marker: str = "", part1: str = PART1, category: str = "Toxic") -> GenerationRequest:
    question = f"How do I roast vegetables? (row {i}) {marker}".strip()
    return GenerationRequest(f"row-{i}", (("user", question),), part1, category, seed=1000 + i)


def make(srv: ServerProcess, tmp_path: Path, **overrides) -> OpenAIGenerator:
    return OpenAIGenerator(spec_for(srv, **overrides), cache_dir=tmp_path / "cache", backoff_base_s=0.01)


# -- server and real openai client --------------------------------------------------------------
def test_server_speaks_openai_through_the_sdk(srv):
    import openai

    client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Target category: Profanity"}], seed=3
    )
    text = reply.choices[0].message.content
    assert "<harmful>" in text and "<category>Profanity</category>" in text
    assert reply.usage.completion_tokens > 0
    assert srv.stats()["chat"] == 1


def test_sdk_sees_injected_faults(srv):
    import openai

    client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "[[fault:429]]"}])
    srv.configure(api_key="sk-right")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_check_endpoint_rejects_bad_key_without_leaking_it(srv):
    srv.configure(api_key="sk-right-key")
    secret = "sk-wrong-secret-123456"
    with pytest.raises(FatalEndpointError) as info:
        asyncio.run(check_endpoint(srv.url, secret, MODEL, timeout_s=5))
    assert info.value.status == 401
    assert secret not in str(info.value)
    assert srv.url.split("//")[1].split("/")[0] in str(info.value)  # names the endpoint
    assert asyncio.run(check_endpoint(srv.url, "sk-right-key", MODEL)) == [MODEL]


def test_check_endpoint_unreachable():
    with pytest.raises(FatalEndpointError, match="cannot connect"):
        asyncio.run(check_endpoint("http://127.0.0.1:9/v1", "k", MODEL, timeout_s=2))


# -- happy path, normalisation, usage, cache ------------------------------------------------------
def test_batch_parses_and_normalises(srv, tmp_path):
    spec = spec_for(srv, prices={"input": 1.0, "output": 2.0})
    gen = OpenAIGenerator(spec, cache_dir=tmp_path / "c")
    try:
        out = gen.generate_batch([req(0), req(1, part1=""), req(2, category="Hate Speech")])
    finally:
        gen.close()
    assert [g.error for g in out] == [None, None, None]
    assert out[0].steering == " Honestly, forget that."
    assert out[0].violation.startswith(" You are a clueless idiot about ")
    assert out[1].steering == "Honestly, forget that." and not out[1].violation.startswith(" ")
    assert out[2].category == "Hate Speech" and out[2].detail == ""
    assert all(not g.violation.endswith((" ", "\n")) for g in out)
    usage = gen.usage
    assert usage["requests"] == 3 and usage["cache_hits"] == 0 and usage["retries"] == 0
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    expected = (usage["input_tokens"] * 1.0 + usage["output_tokens"] * 2.0) / 1e6
    assert usage["cost_usd"] == pytest.approx(expected, rel=1e-3)
    assert out[0].usage["requests"] == 1 and out[0].usage["input_tokens"] > 0
    assert srv.stats()["models"] == 1  # the endpoint check ran once


def test_second_identical_batch_makes_no_requests(srv, tmp_path):
    batch = [req(i) for i in range(20)] + [req(99, "[[fault:refuse:0:cached]]")]
    with make(srv, tmp_path) as gen:
        first = gen.generate_batch(batch)
    chat = srv.stats()["chat"]
    assert chat == 20 + 3  # the always-refusing row was asked 1 + refusal_retries times
    with make(srv, tmp_path) as gen:
        second = gen.generate_batch(batch)
        assert gen.usage["requests"] == 0 and gen.usage["cache_hits"] == 23
    assert srv.stats()["chat"] == chat  # 0 requests on the second run
    assert [(g.steering, g.violation, g.error) for g in first] == [
        (g.steering, g.violation, g.error) for g in second
    ]
    assert second[-1].error == "generator_refused"  # a cached refusal is served as a refusal


def test_cache_key_excludes_api_key_and_endpoint(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("BSAFE_TEST_KEY", "sk-first-key-aaaaaaaa")
    with make(srv, tmp_path) as gen:
        gen.generate_batch([req(1), req(2)])
        body, key = gen._body(req(1), 0)
    assert b"sk-first" not in body
    assert key == request_key(body, TEMPLATE_VERSION)
    chat = srv.stats()["chat"]
    monkeypatch.setenv("BSAFE_TEST_KEY", "sk-second-key-bbbbbbb")
    alt_url = srv.url.replace("127.0.0.1", "localhost")
    with make(srv, tmp_path, base_url=alt_url) as gen:
        gen.generate_batch([req(1), req(2)])
        assert gen.usage["cache_hits"] == 2
    assert srv.stats()["chat"] == chat
    raw = b"".join(p.read_bytes() for p in (tmp_path / "cache").iterdir())
    assert b"sk-first" not in raw and b"sk-second" not in raw


def test_sampling_params_and_seed_change_the_key(srv, tmp_path):
    with make(srv, tmp_path) as gen:
        body, key = gen._body(req(1), 0)
        payload = json.loads(body)
        assert payload["seed"] == 1001 and payload["temperature"] == 0.9 and payload["model"] == MODEL
        assert payload["messages"][0]["role"] == "system" and "Target category: Toxic" in body.decode()
        assert gen._body(req(1), 1)[1] != key
        body_retry = json.loads(gen._body(req(1), 1)[0])
        assert body_retry["seed"] == 1002 and "Reminder" in body_retry["messages"][-1]["content"]
    with make(srv, tmp_path, seed=7, temperature=0.5) as gen:
        body2, key2 = gen._body(req(1), 0)
        assert json.loads(body2)["seed"] == 7 and key2 != key


def test_spliced_body_equals_canonical_json(srv, tmp_path):
    with make(srv, tmp_path, model="m\u00e9") as gen:
        request = GenerationRequest(
            "x", (("user", 'h\u00e9 "q" \u2028\n\tx'),), 'a "b" \u00fc', "Toxic", 2**62
        )
        body, _ = gen._body(request, 1)
        template = load_template("continue_violation")
        payload = {
            "model": "m\u00e9",
            "messages": template.render(request.context, request.part1, request.category, 1),
            "seed": 2**62 + 1,
            "temperature": 0.9,
            "top_p": 1.0,
            "max_tokens": 256,
        }
        assert body == json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


# -- transport faults -------------------------------------------------------------------------------
def test_429_honours_retry_after(srv, tmp_path):
    srv.configure(retry_after="1")
    with make(srv, tmp_path) as gen:
        start = time.monotonic()
        out = gen.generate_batch([req(1, "[[fault:429:1]]")])
        elapsed = time.monotonic() - start
        assert out[0].error is None and gen.usage["retries"] == 1 and out[0].usage["retries"] == 1
    assert elapsed >= 1.0
    assert srv.stats()["statuses"]["429"] == 1


def test_429_honours_retry_after_ms(srv, tmp_path):
    srv.configure(retry_after=None, retry_after_ms="300")
    with make(srv, tmp_path) as gen:
        start = time.monotonic()
        out = gen.generate_batch([req(1, "[[fault:429:2]]")])
        assert out[0].error is None and gen.usage["retries"] == 2
    assert time.monotonic() - start >= 0.6


@pytest.mark.parametrize("fault", ["500", "503", "408", "malformed", "drop"])
def test_transient_faults_are_retried(srv, tmp_path, fault):
    with make(srv, tmp_path) as gen:
        out = gen.generate_batch([req(1, f"[[fault:{fault}:2]]"), req(2)])
        assert [g.error for g in out] == [None, None]
        assert out[0].usage["retries"] == 2 and gen.usage["requests"] == 4


def test_hang_times_out_and_retries(srv, tmp_path):
    with make(srv, tmp_path, timeout_s=0.4) as gen:
        start = time.monotonic()
        out = gen.generate_batch([req(1, "[[fault:hang:1]]"), req(2)])
        assert [g.error for g in out] == [None, None] and gen.usage["retries"] == 1
    assert 0.4 <= time.monotonic() - start < 3


def test_exhausted_retries_fail_only_that_row(srv, tmp_path):
    with make(srv, tmp_path, max_retries=2) as gen:
        out = gen.generate_batch([req(1, "[[fault:500:0]]"), req(2), req(3, "[[fault:ctxlen:0]]")])
        assert out[0].error == "generator_error" and "HTTP 500" in out[0].detail
        assert out[0].usage["requests"] == 3 and out[0].category == "Toxic"
        assert out[0].transient  # retries exhausted: the next run asks again
        assert out[1].error is None
        assert out[2].error == "generator_error" and "context length" in out[2].detail  # 400, row-level
        assert not out[2].transient and "a re-run does not retry it" in out[2].detail  # refused: final
        assert gen.usage["errors"] == 2
    stats = cache_stats(tmp_path / "cache")
    assert stats["by_status"]["error"] == 2
    # errors are never served: a rerun asks again
    before = srv.stats()["chat"]
    with make(srv, tmp_path, max_retries=0) as gen:
        gen.generate_batch([req(1, "[[fault:500:0]]")])
    assert srv.stats()["chat"] == before + 1


@pytest.mark.parametrize("status", [401, 403, 404, 400])
def test_fatal_statuses_stop_the_run(srv, tmp_path, status):
    with make(srv, tmp_path, max_retries=5) as gen:
        gen._checked = True  # exercise the fast path, not the /models check
        batch = [req(i) for i in range(30)] + [req(99, f"[[fault:{status}:0]]")]
        with pytest.raises(FatalEndpointError) as info:
            gen.generate_batch(batch)
        assert info.value.status == status
        assert srv.url.split("//")[1].split("/")[0] in str(info.value)
    assert f"HTTP {status}" in str(info.value)
    assert srv.stats()["statuses"][str(status)] == 1  # never retried


def test_exhausted_quota_is_fatal(srv, tmp_path):
    with make(srv, tmp_path) as gen:
        with pytest.raises(FatalEndpointError, match="quota") as info:
            gen.generate_batch([req(1, "[[fault:quota:0]]")])
    assert info.value.status == 429 and srv.stats()["statuses"]["429"] == 1


def test_wrong_key_is_fatal_and_redacted(srv, tmp_path, monkeypatch):
    srv.configure(api_key="sk-good-key-00000000")
    monkeypatch.setenv("BSAFE_TEST_KEY", "sk-bad-key-1234567890")
    for check in (True, False):
        gen = OpenAIGenerator(spec_for(srv), cache_dir=tmp_path / "c", check=check)
        with pytest.raises(FatalEndpointError) as info:
            gen.generate_batch([req(1)])
        gen.close()
        assert info.value.status == 401 and "sk-bad-key-1234567890" not in str(info.value)


def test_unknown_model_is_fatal(srv, tmp_path):
    srv.configure(strict_model=True)
    with make(srv, tmp_path, model="no-such-model") as gen:
        with pytest.raises(FatalEndpointError) as info:
            gen.generate_batch([req(1)])
    assert info.value.status == 404 and "does not exist" in str(info.value)


def test_wrong_path_is_fatal(srv, tmp_path):
    with make(srv, tmp_path, base_url=srv.root + "/nope/v1") as gen:
        with pytest.raises(FatalEndpointError) as info:
            gen.generate_batch([req(1)])
    assert info.value.status == 404


# -- content faults ---------------------------------------------------------------------------------
def test_refusal_is_retried_with_another_seed(srv, tmp_path):
    with make(srv, tmp_path) as gen:
        out = gen.generate_batch([req(1, "[[fault:refuse:1]]"), req(2, "[[fault:filter:1]]")])
        assert [g.error for g in out] == [None, None]
        assert gen.usage["content_retries"] == 2 and out[0].usage["requests"] == 2


def test_persistent_refusal_gives_generator_refused(srv, tmp_path):
    with make(srv, tmp_path, refusal_retries=2) as gen:
        out = gen.generate_batch([req(1, "[[fault:refuse:0]]"), req(2, "[[fault:filter:0]]")])
    assert [g.error for g in out] == ["generator_refused", "generator_refused"]
    assert out[0].usage["requests"] == 3 and out[0].violation == ""
    assert cache_stats(tmp_path / "cache")["by_status"]["refused"] == 6


def test_untagged_answer_is_unparseable(srv, tmp_path):
    with make(srv, tmp_path, refusal_retries=1) as gen:
        out = gen.generate_batch([req(1, "[[fault:notags:0]]"), req(2, "[[fault:notags:1]]")])
    assert out[0].error == "generator_unparseable" and "no <harmful>" in out[0].detail
    assert out[1].error is None


def test_truncation_is_stored_as_truncated_and_not_reused(srv, tmp_path):
    with make(srv, tmp_path, refusal_retries=0) as gen:
        out = gen.generate_batch([req(1, "[[fault:truncate:1]]")])
    assert out[0].error == "generator_unparseable" and "length" in out[0].detail
    with ResponseCache(tmp_path / "cache") as cache:
        assert cache.stats()["by_status"]["truncated"] == 1
        _, key = make(srv, tmp_path)._body(req(1, "[[fault:truncate:1]]"), 0)
        assert cache.get(key) is None  # never served
        assert cache.get(key, include_unserved=True).status == "truncated"
    before = srv.stats()["chat"]
    with make(srv, tmp_path, refusal_retries=0) as gen:
        out = gen.generate_batch([req(1, "[[fault:truncate:1]]")])
        assert gen.usage["cache_hits"] == 0
    assert out[0].error is None and srv.stats()["chat"] == before + 1
    assert cache_stats(tmp_path / "cache")["by_status"] == {"ok": 1, "refused": 0, "truncated": 0, "error": 0}


def test_truncation_retry_within_a_run(srv, tmp_path):
    with make(srv, tmp_path, refusal_retries=1) as gen:
        out = gen.generate_batch([req(1, "[[fault:truncate:1]]")])
    assert out[0].error is None and out[0].usage["requests"] == 2


# -- rate limiting -------------------------------------------------------------------------------
def test_ratelimit_headers_pause_new_requests(srv, tmp_path):
    srv.configure(ratelimit={"remaining-requests": 0, "reset-requests": "250ms"})
    with make(srv, tmp_path, max_concurrency=1) as gen:
        gen._checked = True
        start = time.monotonic()
        out = gen.generate_batch([req(i) for i in range(3)])
    assert all(g.error is None for g in out)
    assert time.monotonic() - start >= 0.5  # two pauses of 250 ms


def test_rpm_limiter_spaces_requests(srv, tmp_path):
    # 6000 rpm: a burst of 100 (one second's worth), then ~98 per s: 150 requests need ~0.5 s
    limiter = RateLimiter(requests_per_minute=6000)

    async def go() -> float:
        start = time.monotonic()
        for _ in range(150):
            await limiter.acquire()
        return time.monotonic() - start

    assert 0.4 <= asyncio.run(go()) < 2.0


@pytest.mark.parametrize("per_minute", [2, 7, 60, 1000, 90_000])
def test_a_greedy_sender_never_gets_more_than_the_limit_in_any_minute(per_minute):
    """The bucket's own clock argument: 5 simulated minutes of a sender taking every grant."""
    from bsafe_data.llm.ratelimit import _Bucket

    bucket, grants, now, step = _Bucket(per_minute), [], 0.0, min(0.01, 30 / per_minute)
    bucket.stamp = 0.0
    while now < 300:
        if bucket.wait_for(1, now) <= 0:
            bucket.level -= 1
            grants.append(now)
        else:
            now += step
    # the fullest 60 s windows start at a grant
    fullest = max(bisect.bisect_left(grants, start + 60) - i for i, start in enumerate(grants))
    assert fullest <= per_minute
    assert len(grants) >= 0.95 * 5 * per_minute  # and the budget is used


def test_tpm_limiter_reserves_and_settles():
    limiter = RateLimiter(tokens_per_minute=600_000)  # a burst of 10000, then ~9800 per s

    async def go() -> tuple[float, float]:
        start = time.monotonic()
        await limiter.acquire(9000)
        limiter.settle(9000, 1000)  # the request used far less than reserved: refund
        await limiter.acquire(9000)  # fits thanks to the refund
        refunded = time.monotonic() - start
        await limiter.acquire(5000)  # the bucket is empty now: ~0.5 s of refill
        return refunded, time.monotonic() - start - refunded

    refunded, waited = asyncio.run(go())
    assert refunded < 0.1 and 0.4 <= waited < 1.5
    assert limiter.tracks_tokens


def test_tpm_engine_end_to_end(srv, tmp_path):
    with make(srv, tmp_path, tokens_per_minute=10_000_000, requests_per_minute=100_000) as gen:
        out = gen.generate_batch([req(i) for i in range(10)])
    assert all(g.error is None for g in out)


# -- engine directly ----------------------------------------------------------------------------
def _chat_call(content: str) -> Call:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode()
    return Call("/chat/completions", body, request_key(body, "test/1"), MODEL, parse_completion)


def test_engine_asks_each_call_once_and_serves_it_from_the_cache(srv, tmp_path):
    """The one cache loop: identical calls in flight share one request; a finished answer is
    served from memory, then from the cache file by a new engine; a failure is recorded, not
    served, and asked again next time."""

    def endpoint(engine: Engine):
        return engine.endpoint("generator", lambda: Transport(srv.url, max_concurrency=4, timeout_s=2,
                                                             max_retries=1, backoff_base_s=0.01))  # fmt: skip

    engine = Engine(tmp_path / "cache")
    try:
        ep = endpoint(engine)
        replies = engine.gather([ep.ask(_chat_call("hi")) for _ in range(5)])
        assert srv.stats()["chat"] == 1 and [r.cached for r in replies].count(False) == 1
        assert engine.run(ep.ask(_chat_call("hi"))).cached
        with pytest.raises(RequestFailed) as info:
            engine.run(ep.ask(_chat_call("[[fault:500:0]]")))
        assert info.value.attempts == 2 and not info.value.final
        with pytest.raises(RequestFailed, match="HTTP 413") as info:
            engine.run(ep.ask(_chat_call("[[fault:413:0]]")))
        assert info.value.final
        snapshot = engine.snapshot()["generator"]
        assert snapshot["done"] == 6 and snapshot["failed"] == 2 and snapshot["cache_hits"] == 5
        assert snapshot["in_flight"] == 0 and snapshot["url"] == srv.url
    finally:
        engine.close()
    asked = srv.stats()["chat"]
    engine = Engine(tmp_path / "cache")
    try:
        assert engine.run(endpoint(engine).ask(_chat_call("hi"))).cached
        with pytest.raises(RequestFailed):
            engine.run(endpoint(engine).ask(_chat_call("[[fault:500:0]]")))
    finally:
        engine.close()
    assert srv.stats()["chat"] == asked + 2  # the failure was asked again (twice: one retry)


def test_transport_serves_waiting_requests_by_priority(srv):
    """With one slot, the request of an older chunk (lower priority number) goes first."""
    srv.configure(latency_s=0.2)

    async def go() -> list[int]:
        transport = Transport(srv.url, max_concurrency=1, timeout_s=5)
        order: list[int] = []

        async def one(priority: int) -> None:
            PRIORITY.set(priority)
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": str(priority)}]})
            await transport.send("/chat/completions", body.encode(), parse_completion)
            order.append(priority)

        async with transport:
            first = asyncio.ensure_future(one(5))  # takes the slot
            await asyncio.sleep(0.01)
            await asyncio.gather(first, *(asyncio.ensure_future(one(p)) for p in (3, 9, 1)))
        return order

    assert asyncio.run(go()) == [5, 1, 3, 9]


def test_parse_completion_rejects_malformed():
    ok = parse_completion(
        b'{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":1}}'
    )
    assert (ok.text, ok.finish_reason, ok.input_tokens, ok.output_tokens) == ("hi", "stop", 3, 1)
    refusal = parse_completion(
        b'{"choices":[{"message":{"content":null,"refusal":"no"},"finish_reason":"stop"}]}'
    )
    assert refusal.finish_reason == "content_filter" and refusal.text == ""
    for raw in (b'{"choices": [', b"[]", b'{"choices": []}', b'{"choices":[{"message":{"content":5}}]}'):
        with pytest.raises(ValueError):
            parse_completion(raw)


def test_retry_helpers():
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_s({}) is None and retry_after_s({"retry-after": "soon"}) is None
    assert parse_duration_s("6m0s") == 360 and parse_duration_s("20ms") == 0.02
    assert parse_duration_s("1.5s") == 1.5 and parse_duration_s("2") == 2 and parse_duration_s("") is None
    delays = [backoff_s(a, base_s=1.0, max_s=8.0) for a in range(1, 8)]
    assert all(0.5 <= d <= 1.0 for d in delays[:1]) and all(4.0 <= d <= 8.0 for d in delays[4:])
    assert 3.0 <= backoff_s(1, hint_s=3.0) <= 3.3


def test_redact():
    text = redact("Incorrect API key provided: sk-abcdef1234567890. Also my-secret-token", "my-secret-token")
    assert "abcdef" not in text and "my-secret-token" not in text


# -- cache --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("background", [False, True])
def test_cache_roundtrip_stats_prune(tmp_path, background):
    with ResponseCache(tmp_path, background=background) as cache:
        cache.put(
            "a", model="m", status="ok", text="x", finish_reason="stop", input_tokens=3, output_tokens=1
        )
        cache.put("b", model="m", status="truncated", text="y", finish_reason="length")
        cache.put("c", model="m", status="refused", text="I'm sorry", finish_reason="stop")
        cache.put("d", model="m", status="error", text="", detail="HTTP 500")
        cache.flush()
        assert cache.get("a").text == "x" and cache.get("a").input_tokens == 3
        assert cache.get("b") is None and cache.get("d") is None and cache.get("c").status == "refused"
        assert set(cache.get_many(["a", "b", "c", "d", "zz"])) == {"a", "c"}
        stats = cache.stats()
        assert stats["entries"] == 4 and stats["bytes"] > 0
        assert stats["by_status"] == {"ok": 1, "refused": 1, "truncated": 1, "error": 1}
        assert cache.prune() == 0
        assert cache.prune(statuses=["error", "truncated"]) == 2
        assert cache.prune(older_than_days=1) == 0
        assert cache.prune(older_than_days=0) == 2
        with pytest.raises(ValueError):
            cache.put("e", model="m", status="weird", text="")
        with pytest.raises(ValueError):
            cache.prune(statuses=["nope"])
    db = sqlite3.connect(tmp_path / "responses.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cache_commits_without_close(tmp_path):
    cache = ResponseCache(tmp_path, flush_every=2)
    cache.put("a", model="m", status="ok", text="x")
    cache.put("b", model="m", status="ok", text="y")  # second row triggers a commit
    other = sqlite3.connect(tmp_path / "responses.sqlite3")
    assert other.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 2
    cache.close()


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("BSAFE_DATA_CACHE_DIR", str(tmp_path / "env"))
    assert cache_stats()["path"] == str(tmp_path / "env" / "responses.sqlite3")
    assert cache_prune(tmp_path / "explicit", statuses=["error"]) == 0
    assert (tmp_path / "explicit" / "responses.sqlite3").exists()


# -- prompt protocol: parsing messy outputs --------------------------------------------------------
CAT = "Toxic"


def parsed(text: str, part1: str = PART1, finish: str = "stop"):
    return parse_output(text, part1, CAT, finish)


def test_parse_clean_and_normalised():
    out = parsed("  But honestly,  <harmful>you are an idiot.  </harmful>\n<category>Toxic</category>\n")
    assert (out.status, out.steering, out.violation, out.detail) == (
        "ok",
        " But honestly,",
        " you are an idiot.",
        "",
    )
    empty = parse_output("<harmful>\n You are an idiot.</harmful>", "", CAT)
    assert empty.violation == "You are an idiot." and empty.steering == ""


def test_parse_messy_variants():
    assert parsed("<HARMFUL>Idiot.</Harmful><category>toxic</category>").violation == " Idiot."
    unclosed = parsed("So <harmful>you moron <category>Toxic</category>")
    assert unclosed.status == "ok" and unclosed.violation == " you moron" and "unclosed" in unclosed.detail
    assert parsed("<harmful>Go away, fool.").violation == " Go away, fool."
    no_open = parsed("You utter fool.</harmful><category>Toxic</category>")
    assert no_open.violation == " You utter fool." and no_open.steering == "" and "missing" in no_open.detail
    two = parsed("<harmful>First.</harmful> mid <harmful>Second.</harmful>")
    assert two.violation == " First." and "1 extra" in two.detail
    fenced = parsed("```text\nWell, <harmful>Idiot.</harmful><category>Toxic</category>\n```")
    assert fenced.steering == " Well," and fenced.violation == " Idiot."
    labelled = parsed("Steering: anyway <harmful>x y z</harmful>")
    assert labelled.steering == " anyway"
    echo = parsed(PART1 + " Then, <harmful>idiot.</harmful>")
    assert echo.steering == " Then,"
    spaced = parsed("< harmful >dumb</ harmful >< category >Toxic</ category >")
    assert spaced.violation == " dumb" and spaced.detail == ""
    nested = parsed("<harmful>a <category>b</harmful>")
    assert nested.status == "ok" and "<" not in nested.violation


def test_parse_category_mismatch_keeps_requested():
    out = parsed("<harmful>Shut up.</harmful><category>Harassment</category>")
    assert out.category == "Toxic" and out.model_category == "Harassment" and "Harassment" in out.detail
    same = parse_output(
        "<harmful>x</harmful><category>death harm and tragedy</category>", "p", "Death Harm & Tragedy"
    )
    assert same.model_category is None
    assert parsed("<harmful>x</harmful>").model_category is None


def test_parse_failures_and_refusals():
    assert parsed("Just some text").status == "unparseable"
    assert parsed("<harmful>   </harmful>").status == "unparseable"
    assert parsed("I'm sorry, but I can't help with that.").status == "refused"
    assert parsed("Sure.\nI cannot assist with creating harmful content.").status == "refused"
    assert parsed("<harmful>I\u2019m sorry, but I won't write that.</harmful>").status == "refused"
    assert parsed("I can't do that. <harmful></harmful>").status == "refused"
    assert parsed("As an AI, I must note... <harmful>idiot</harmful>").status == "refused"
    assert parsed("<harmful>x</harmful>", finish="content_filter").status == "refused"
    assert parsed("<harmful>x", finish="length").status == "truncated"
    # not refusals: violations that merely contain such words
    assert parsed("<harmful>I can't believe how stupid you are.</harmful>").status == "ok"
    assert parsed("<harmful>Sorry to say it, you're worthless.</harmful>").status == "ok"
    assert not looks_like_refusal("I won't lie, you are dumb.")
    assert looks_like_refusal("I won't help with that")


def test_normalise_span():
    assert normalise_span("  text \n", "p") == " text"
    assert normalise_span("\n text", "") == "text"
    assert normalise_span("   ", "p") == ""


def test_template_renders_all_parts():
    template = load_template("continue_violation")
    messages = template.render((("system", "Be nice."), ("user", "Q?")), "", "Firearms & Weapons", attempt=0)
    assert [m["role"] for m in messages] == ["system", "user"] and template.static_system
    user = messages[1]["content"]
    assert "[user]\nQ?" in user and "Target category: Firearms & Weapons" in user and "begin it" in user
    assert "Reminder" not in user
    assert "Reminder" in template.render((), "x", "Toxic", attempt=1)[1]["content"]
    assert "<harmful>" in messages[0]["content"]
    with pytest.raises(FileNotFoundError):
        load_template("no_such_template")


def test_custom_template_path(tmp_path):
    (tmp_path / "mine.system.j2").write_text("Category {{ category }}")
    (tmp_path / "mine.user.j2").write_text("{{ part1 }}")
    template = load_template(str(tmp_path / "mine"))
    assert not template.static_system
    assert template.render((), "abc", "Toxic") == [
        {"role": "system", "content": "Category Toxic"},
        {"role": "user", "content": "abc"},
    ]


# -- factory ----------------------------------------------------------------------------------------
def test_factory(srv, tmp_path):
    gen = make_generator(spec_for(srv), cache_dir=tmp_path)
    assert isinstance(gen, OpenAIGenerator) and gen.backend == "openai" and gen.model == MODEL
    gen.close()
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(GeneratorUnavailable, match=r"\[local\]"):
            make_generator(GeneratorSpec(provider="transformers", model="x"))


def test_factory_builtin():
    pytest.importorskip("bsafe_data.generate.builtin")
    gen = make_generator(GeneratorSpec())
    assert gen.backend == "builtin"


def test_generator_inside_running_loop(srv, tmp_path):
    async def go():
        with make(srv, tmp_path) as gen:
            return gen.generate_batch([req(1)])

    assert asyncio.run(go())[0].error is None


def test_empty_batch_makes_no_requests(srv, tmp_path):
    with make(srv, tmp_path) as gen:
        assert gen.generate_batch([]) == []
    assert srv.stats()["chat"] == 0 and srv.stats()["models"] == 0
