"""The annotation app in a real browser: Playwright driving Debian's chromium (/usr/bin/chromium).

Install: `bash tests/install_browser.sh` (apt-get install chromium) and `pip install playwright`
(in the `test` extra; its driver ships in the wheel, `playwright install` is never needed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_audit_core import REPO, add_annotator, build_dataset, run_cli
from tests.test_audit_server import Server

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="browser tests need Debian's chromium at /usr/bin/chromium: run `bash tests/install_browser.sh`",
)
ANSWERS = ("yes", "no", "unsure")
SCREENSHOT = REPO / "docs" / "audit_screen.png"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit_browser")


@pytest.fixture(scope="module")
def app(workdir):
    folder = build_dataset(workdir)
    run_cli(workdir, "audit", "sample", str(folder), "--n", "24", "--overlap", "0.5", "--seed", "7")
    tokens = {name: add_annotator(workdir, folder, name) for name in ("alice", "bob")}
    server = Server(workdir, folder, log_name="browser.log")
    yield {"folder": folder, "url": server.url, "tokens": tokens, "server": server, "state": {}}
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
    yield b
    b.close()
    pw.stop()


def _page(browser, errors: list[str]):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    page = ctx.new_page()
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: _console(errors, msg))
    return ctx, page


def _console(errors: list[str], msg) -> None:
    # a 401 from /api/session is how the page learns it must show the sign-in form
    if msg.type == "error" and "status of 401" not in msg.text:
        errors.append(f"console {msg.type}: {msg.text}")


def _row_id(page) -> str:
    return page.inner_text("#meta .badge:first-child")


def _done(page) -> int:
    return page.evaluate("document.getElementById('progress').value")


def _poll(page, js: str, arg=None, timeout: float = 10.0) -> None:
    """Wait until ``js`` (a function) is truthy. Playwright's wait_for_function evals strings, which
    the app's Content-Security-Policy forbids; page.evaluate is not subject to it."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js, arg):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {js}")
        time.sleep(0.03)


def _wait_done(page, n: int) -> None:
    _poll(page, "(n) => document.getElementById('progress').value === n", n)


def _keys(page) -> list[str]:
    return page.eval_on_selector_all("#questions li", "els => els.map(e => e.dataset.key)")


def _chosen(page) -> dict[str, str]:
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#questions li')].map(li => {
            const c = li.querySelector('.opt.chosen');
            return [li.dataset.key, c ? c.textContent.split(' ')[1] : null];
        }))"""
    )


def _store(app):
    from bsafe_data.audit.store import AuditStore

    return AuditStore.for_folder(app["folder"])


def test_keyboard_judging_survives_reload_and_undo(app, browser):
    """alice: token link, content warning, 10 rows judged with the keyboard only, a reload midway."""
    errors: list[str] = []
    ctx, page = _page(browser, errors)
    page.goto(f"{app['url']}/#token={app['tokens']['alice']}")
    page.wait_for_selector("#warning:not([hidden])")
    assert "token" not in page.url  # the token left the address bar
    assert "policy violations" in page.inner_text("#warning")
    page.keyboard.press("Enter")
    page.wait_for_selector("#screen:not([hidden])")
    assert "Content warning" in page.inner_text(".cw-banner")

    judged: dict[str, dict[str, str]] = {}
    for i in range(10):
        row_id = _row_id(page)
        assert row_id not in judged
        keys = _keys(page)
        answers: dict[str, str] = {}
        for n, key in enumerate(keys):
            digit = (i + 2 * n) % 3 + 1
            if i == 2 and n == 0 and len(keys) > 1:
                page.keyboard.press("j")  # leave the first question open for now
                continue
            page.keyboard.press(str(digit))
            answers[key] = ANSWERS[digit - 1]
            if i == 5 and n == 0:
                # reload midway through a row: nothing judged or typed is lost
                page.reload()
                page.wait_for_selector("#screen:not([hidden])")
                assert _row_id(page) == row_id
                assert _done(page) == 5
                assert _chosen(page)[key] == ANSWERS[digit - 1]
            if not SCREENSHOT_TAKEN and i != 2 and n == 1 and page.locator("#stream .seg-steering").count():
                _screenshot(page)
        if i == 2 and len(keys) > 1:
            page.keyboard.press("Enter")  # refused: the first question is open
            page.wait_for_selector("#questions li.missing")
            assert "Answer every question" in page.inner_text("#status")
            page.keyboard.press("1")
            answers[keys[0]] = "yes"
        if i == 3:
            page.keyboard.press("k")  # up one question (from the last one), change the answer
            page.keyboard.press("3")
            answers[keys[max(len(keys) - 2, 0)]] = "unsure"
        assert _chosen(page) == answers
        judged[row_id] = answers
        page.keyboard.press("Enter")
        _wait_done(page, i + 1)

    # undo the 10th judgement: its row comes back with the answers; judge it again
    last = list(judged)[-1]
    page.keyboard.press("u")
    _poll(page, "() => document.getElementById('status').textContent.startsWith('Undone')")
    assert _row_id(page) == last and _chosen(page) == judged[last] and _done(page) == 9
    page.keyboard.press("Enter")
    _wait_done(page, 10)
    assert SCREENSHOT_TAKEN and SCREENSHOT.stat().st_size < 250_000

    live = [j for j in _store(app).judgements() if j["annotator"] == "alice"]
    assert {j["row_id"]: j["answers"] for j in live} == judged
    everything = [j for j in _store(app).judgements(include_retracted=True) if j["annotator"] == "alice"]
    assert [j["retracted_by"] for j in everything].count("undo") == 1
    assert all(len(j["manifest_sha256"]) == 64 for j in live)
    assert not errors, errors
    app["state"]["alice"] = judged
    ctx.close()


SCREENSHOT_TAKEN = False


def _screenshot(page) -> None:
    """docs/audit_screen.png: the annotation screen of an injected row, violation revealed."""
    global SCREENSHOT_TAKEN
    from PIL import Image

    page.keyboard.press("r")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    Image.open(SCREENSHOT).convert("RGB").quantize(colors=96).save(SCREENSHOT, optimize=True)
    page.keyboard.press("r")
    SCREENSHOT_TAKEN = True


def _hand_kappa(pairs: list[tuple[str, str]]) -> float | None:
    n = len(pairs)
    p_o = sum(a == b for a, b in pairs) / n
    labels = {x for pair in pairs for x in pair}
    p_e = sum((sum(a == c for a, _ in pairs) / n) * (sum(b == c for _, b in pairs) / n) for c in labels)
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def test_second_annotator_judges_the_overlap_and_report_kappa(app, browser, workdir):
    alice = app["state"].get("alice")
    if alice is None:
        pytest.fail("needs test_keyboard_judging_survives_reload_and_undo first")
    errors: list[str] = []
    ctx, page = _page(browser, errors)
    page.goto(app["url"])
    page.wait_for_selector("#login:not([hidden])")
    page.keyboard.type(app["tokens"]["bob"])  # the token field has focus: keyboard only
    page.keyboard.press("Enter")
    page.wait_for_selector("#warning:not([hidden])")
    page.keyboard.press("Enter")
    page.wait_for_selector("#screen:not([hidden])")
    bob: dict[str, dict[str, str]] = {}
    for m in range(30):
        row_id = _row_id(page)
        if row_id not in alice:
            break  # past the overlap rows alice judged
        answers = {}
        for n, key in enumerate(_keys(page)):
            theirs = ANSWERS.index(alice[row_id][key])
            mine = theirs if (m + n) % 3 else (theirs + 1) % 3  # agree two times in three
            page.keyboard.press(str(mine + 1))
            answers[key] = ANSWERS[mine]
        bob[row_id] = answers
        page.keyboard.press("Enter")
        _wait_done(page, m + 1)
    overlap = {i["row_id"] for i in _store(app).items() if i["replicas"] == 2}
    assert set(bob) == overlap & set(alice) and len(bob) >= 3
    assert not errors, errors
    ctx.close()

    report = json.loads(run_cli(workdir, "audit", "report", str(app["folder"]), "--json").stdout)
    defined = 0
    for q in report["questions"]:
        pairs = [(alice[r][q["question"]], bob[r][q["question"]]) for r in bob if q["question"] in bob[r]]
        assert q["overlap_items"] == len(pairs)
        if not pairs:
            assert q["kappa"] is None
            continue
        expected = _hand_kappa(pairs)
        if expected is None:
            assert q["kappa"] is None
        else:
            defined += 1
            assert q["kappa"] == pytest.approx(expected, abs=1e-12), q["question"]
    assert defined >= 1
    assert report["annotators"] == 2 and report["judgements"] == 10 + len(bob)


def test_hostile_row_executes_nothing(browser, workdir):
    """Row text with <script> and <img onerror> goes through the real build and renders as text only."""
    corpus = workdir / "hostile.jsonl"
    rows = [
        {
            "id": "x1",
            "messages": [
                {
                    "role": "user",
                    "content": "What does <img src=x onerror=\"window.__pwned='img'\"> do in a page?",
                },
                {
                    "role": "assistant",
                    "content": "It is an image tag with an error handler. "
                    "<script>window.__pwned='script'</script> Browsers run such handlers when the image "
                    "fails to load. Pages must escape text before showing it. Treat every string from users "
                    "as data. That keeps the page safe.",
                },
            ],
        },
        {
            "id": "x2",
            "messages": [
                {"role": "user", "content": "Explain <svg onload=\"window.__pwned='svg'\"></svg> please."},
                {
                    "role": "assistant",
                    "content": "An SVG element can carry event handlers. "
                    "\"><script>window.__pwned='attr'</script> That is why attribute values are quoted "
                    "and escaped. A strict content policy helps too. Inline handlers are then refused by "
                    "the browser.",
                },
            ],
        },
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = build_dataset(workdir, "hostile", "--source", str(corpus))
    run_cli(workdir, "audit", "sample", str(folder), "--n", "100", "--overlap", "0", "--seed", "1")
    token = add_annotator(workdir, folder, "eve")
    server = Server(workdir, folder, log_name="hostile.log")
    errors: list[str] = []
    try:
        ctx, page = _page(browser, errors)
        messages: list[str] = []
        page.on("console", lambda msg: messages.append(msg.text))
        page.goto(f"{server.url}/#token={token}")
        page.wait_for_selector("#warning:not([hidden])")
        page.keyboard.press("Enter")
        page.wait_for_selector("#screen:not([hidden])")
        total = page.evaluate("document.getElementById('progress').max")
        assert total >= 6
        seen_script = seen_img = 0
        for n in range(total):
            page.keyboard.press("r")  # reveal: the violation is rendered unblurred too
            assert page.evaluate("window.__pwned") is None
            assert page.evaluate("document.querySelectorAll('#app img, #app script, #app svg').length") == 0
            stream = page.inner_text("#stream") + page.inner_text("#backtrack")
            context = page.inner_text("#context")
            seen_script += "<script>window.__pwned=" in stream
            seen_img += "<img src=x onerror=" in context or "<svg onload=" in context
            page.keyboard.press("s")  # skip to the next row
            _wait_done(page, n + 1)
        page.wait_for_selector("#done:not([hidden])")
        assert page.evaluate("window.__pwned") is None
        assert seen_script >= 2 and seen_img >= 2
        # the text was never parsed as HTML: no CSP refusal had to happen
        assert not [m for m in messages if "Refused to" in m], messages
        assert not errors, errors
        ctx.close()
    finally:
        server.stop()


def test_browser_requests_without_token_or_csrf(app, browser):
    errors: list[str] = []
    ctx, page = _page(browser, errors)
    assert page.goto(f"{app['url']}/api/next").status == 401
    assert page.goto(f"{app['url']}/api/session").status == 401
    body = {"item_id": 1, "answers": {}, "skipped": True, "submission_id": "abcdef123456"}
    assert page.request.post(f"{app['url']}/api/judgements", data=body).status == 401
    # signed in, a write without the CSRF header is refused
    page.goto(f"{app['url']}/#token={app['tokens']['bob']}")
    page.wait_for_selector("#screen:not([hidden]), #warning:not([hidden]), #done:not([hidden])")
    status = page.evaluate(
        """(body) => fetch('/api/judgements', {method: 'POST', headers: {'Content-Type': 'application/json'},
            body: JSON.stringify(body)}).then(r => r.status)""",
        body,
    )
    assert status == 403
    assert (
        page.evaluate(
            "fetch('/api/undo', {method: 'POST', headers: {'Content-Type': 'application/json'}, "
            "body: '{}'}).then(r => r.status)"
        )
        == 403
    )
    ctx.close()
