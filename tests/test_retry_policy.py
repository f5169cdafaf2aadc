"""The one retry policy (``bsafe_data.llm.retry.RetryPolicy``) as the generator, the classifiers and
the Hub push see it, through the real test servers."""

from __future__ import annotations

import email.utils
import io
import subprocess
import threading
import time

import pytest
from rich.console import Console

from bsafe_data.classify.base import Item
from bsafe_data.classify.factory import make_classifier
from bsafe_data.llm.errors import FatalEndpointError
from bsafe_data.llm.retry import Fail, Fatal, Retry, RetryPolicy
from bsafe_data.publish import PushEvent
from bsafe_data.publish.cli import event_printer
from bsafe_data.publish.hub import hub_policy
from bsafe_data.recipe import FilterSpec
from tests.hub_server import HubServer
from tests.openai_server import ServerProcess
from tests.publish_fixtures import build_dataset_folder
from tests.test_push import TOKEN, hub_env, run_driver


@pytest.fixture(scope="module")
def server():
    with ServerProcess(model="guard-model") as srv:
        yield srv


@pytest.fixture()
def srv(server):
    server.reset()
    return server


def guard(srv: ServerProcess, **overrides):
    """A yes/no guard classifier on the OpenAI-compatible test server (its own transport)."""
    spec = {
        "name": "guard",
        "provider": "guard",
        "model": "guard-model",
        "template": "Is this unsafe? {{ response }}",
        "base_url": srv.url,
        "max_retries": 3,
        **overrides,
    }
    [classifier_spec] = FilterSpec.model_validate({"classifiers": [spec]}).classifiers
    return make_classifier(classifier_spec, None)


# -- the policy itself ---------------------------------------------------------------------------
def test_policy_verdicts():
    policy = RetryPolicy(max_retries=2, base_s=0.01)
    assert isinstance(policy.decide(503, "busy", {}, 1), Retry)
    assert isinstance(policy.decide(None, "timeout after 5 s", {}, 1), Retry)
    for status in (400, 401, 403, 404):
        assert policy.decide(status, "nope", {}, 1) == Fatal(status, "nope")
    row_level = policy.decide(400, "This model's maximum context length is 8192 tokens.", {}, 1)
    assert isinstance(row_level, Fail) and "context length" in row_level.reason and row_level.final
    quota = "You exceeded your current quota, please check your plan and billing details."
    assert policy.decide(429, quota, {}, 1) == Fatal(429, quota)
    # the endpoint's answer to this very request: final (a re-run would get it again) ...
    assert policy.decide(413, "too large", {}, 1) == Fail("HTTP 413: too large", final=True)
    # ... retries exhausted: not final (the next run may get an answer)
    assert policy.decide(500, "", {}, 3) == Fail("HTTP 500; gave up after 3 attempts", final=False)
    assert policy.decide(412, "", {}, 1) == Fail("HTTP 412", final=True)  # not retryable by default ...
    assert isinstance(hub_policy(5, 0.01).decide(412, "", {}, 1), Retry)  # ... but for Hub commits
    assert hub_policy(5, 0.01).max_retries == 4


def test_policy_honours_retry_after_seconds_ms_and_http_date():
    policy = RetryPolicy(base_s=0.01)
    assert 2.0 <= policy.decide(429, "", {"retry-after": "2"}, 1).delay_s <= 2.2
    assert 0.25 <= policy.decide(503, "", {"retry-after-ms": "250"}, 1).delay_s <= 0.3
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    waited = policy.decide(429, "", {"Retry-After": date}, 1)
    assert isinstance(waited, Retry) and 28.0 <= waited.delay_s <= 33.0 and waited.reason == "HTTP 429"
    assert hub_policy(5, 0.01).decide(429, "", {"Retry-After": "3600"}, 1).delay_s <= 66.0  # Hub cap


# -- classifiers: the same transport and policy as the generator ---------------------------------
def test_quota_exhausted_429_from_a_classifier_endpoint_is_fatal(srv):
    classifier = guard(srv)
    with pytest.raises(FatalEndpointError) as info:
        classifier.score_items([Item("Water the fern weekly. [[fault:quota:0]]")])
    classifier.close()
    error = info.value
    assert error.status == 429 and error.role == "classifier 'guard'"
    assert str(error).startswith("classifier 'guard' endpoint http://127.0.0.1:")
    assert "HTTP 429" in str(error) and "quota" in str(error)
    assert srv.stats()["statuses"]["429"] == 1  # never retried


def test_classifier_honours_retry_after_and_counts_retries(srv):
    srv.configure(retry_after="1")
    classifier = guard(srv)
    start = time.monotonic()
    [score] = classifier.score_items([Item("Keep the soil moist. [[fault:429:1]]")])
    elapsed = time.monotonic() - start
    classifier.close()
    assert elapsed >= 1.0
    assert classifier.usage["requests"] == 2 and classifier.usage["retries"] == 1
    assert score.detail.get("error") != "HTTP 429"  # the retry got an answer
    assert srv.stats()["statuses"]["429"] == 1


def test_classifier_fatal_status_names_the_classifier(srv):
    srv.configure(api_key="sk-right-key-0000")
    classifier = guard(srv, name="lg", api_key_env="BSAFE_NO_SUCH_KEY")
    with pytest.raises(FatalEndpointError) as info:
        classifier.score_items([Item("Hello.")])
    classifier.close()
    assert info.value.status == 401 and "classifier 'lg' endpoint http://127.0.0.1:" in str(info.value)


# -- the Hub: the same policy, Retry-After as an HTTP date ---------------------------------------
def test_hub_429_with_http_date_retry_after_is_honoured(tmp_path):
    with HubServer() as hub:
        env = hub_env(hub, tmp_path)
        folder = build_dataset_folder(tmp_path / "ds")
        hub.hold("commit")  # the first commit attempt waits: the date below is set when it is sent
        payload = {"folder": folder, "repo_id": "org/safety", "version": "1.0.0", "backoff_s": 0.01}
        done: list[tuple[dict, subprocess.CompletedProcess[str]]] = []
        pusher = threading.Thread(target=lambda: done.append(run_driver(env, "push", payload, timeout=120)))
        pusher.start()
        try:
            deadline = time.monotonic() + 60
            while hub.count("commit") == 0 and pusher.is_alive():
                assert time.monotonic() < deadline, "push never reached the commit"
                time.sleep(0.05)
            until = int(time.time()) + 3
            retry_after = email.utils.formatdate(until, usegmt=True)
            hub.fail("commit", status=429, times=1, headers={"Retry-After": retry_after})
            arrived: list[float] = []
            hub.before_next_commit(lambda repo: arrived.append(time.time()))
        finally:
            hub.release()  # attempt 1 gets a 503, attempt 2 the 429, attempt 3 succeeds
            pusher.join(150)
        assert [e["status"] for e in hub.log if e["route"] == "commit"] == [503, 429, 200]
    [(result, proc)] = done
    assert result["tag"] == "v1.0.0" and result["attempts"] == 3
    assert arrived and arrived[0] >= until - 0.05  # waited for the date, not the 0.01 s backoff
    assert TOKEN not in proc.stdout + proc.stderr
    assert "committing" not in proc.stderr  # the library prints nothing: progress goes to on_event


def test_push_events_render_in_the_cli():
    buffer = io.StringIO()
    show = event_printer(Console(file=buffer, width=200, color_system=None))
    show(PushEvent("authenticated", "token ok (user [bold]x[/bold]); publishing org/x v1.0.0"))
    show(PushEvent("committing", "committing 7 files on top of abc (attempt 1/5)", attempt=1))
    show(PushEvent("retrying", "commit failed: HTTP 429; retrying in 2.5s", attempt=1, wait_s=2.5))
    assert buffer.getvalue().splitlines() == [
        "✓ token ok (user [bold]x[/bold]); publishing org/x v1.0.0",  # plain text, never markup
        "committing 7 files on top of abc (attempt 1/5)",
        "commit failed: HTTP 429; retrying in 2.5s",
    ]
