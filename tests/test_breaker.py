"""The quality breaker: a build whose first generator answers are mostly unusable stops early, with
one message, a sample answer escaped for the terminal, and exit 4; lifted, the build goes on."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_server import ServerProcess  # noqa: E402

from bsafe_data.llm.breaker import EXIT_CODE, AnswerCheck, QualityStop  # noqa: E402
from tests.test_faults import KEY, corpus, funnel, good_rows, llm_build  # noqa: E402


def run_calls(check: AnswerCheck, verdicts: list[str | None]) -> tuple[int, BaseException | None]:
    """Calls answered with ``verdicts`` in turn, all started at once; (calls that got their turn,
    the error that ended them)."""
    answered = 0

    async def one(verdict: str | None) -> None:
        nonlocal answered
        async with check.answer() as judge:
            answered += 1
            await asyncio.sleep(0)
            judge(verdict, "Here is a continuation\x1b[2J without tags.")

    async def main() -> BaseException | None:
        results = await asyncio.gather(*(one(v) for v in verdicts), return_exceptions=True)
        return next((r for r in results if isinstance(r, BaseException)), None)

    error = asyncio.run(main())
    return answered, error


def test_the_first_answers_decide_and_the_others_wait_for_the_verdict():
    bad = run_calls(AnswerCheck(10, 0.5), ["unparseable"] * 100)
    assert bad[0] == 10 and isinstance(bad[1], QualityStop)  # 6 unusable decide, none past the 10
    stop = bad[1]
    assert "10 of the first 10 answers" in stop.message  # the stop waits for the answers out
    assert "unparseable 100%" in stop.message
    assert "generator.check_answers=0" in stop.message and "\x1b" not in stop.message
    assert stop.sample.startswith("unparseable: Here is")  # raw: the terminal escapes it
    good = run_calls(AnswerCheck(10, 0.5), [None, "refused"] * 50)
    assert good == (100, None)  # 5 of 10 unusable is not more than half: everything goes
    assert run_calls(AnswerCheck(0, 0.0), ["refused"] * 20) == (20, None)  # no check


def test_a_call_without_an_answer_gives_its_place_to_another():
    check = AnswerCheck(4, 0.5)

    async def failing() -> None:
        async with check.answer():
            raise RuntimeError("request failed")

    async def main() -> None:
        for _ in range(10):
            with pytest.raises(RuntimeError):
                await failing()
        assert check.admitted == 0 and not check.open

    asyncio.run(main())
    assert run_calls(check, [None] * 3 + ["truncated"] * 5) == (8, None)


@pytest.fixture(scope="module")
def server():
    with ServerProcess(model="gen-model", api_key=KEY) as srv:
        yield srv


def test_an_off_protocol_generator_stops_the_build_and_a_lifted_rerun_goes_on(server, tmp_path):
    rows = good_rows(200)
    for i, row in enumerate(rows):  # 4 rows in 5 are answered without the protocol's tags
        if i % 5:
            row["prompt"] += " [[fault:notags:0]]"
    path = corpus(tmp_path / "c.jsonl", rows)
    out, cache = tmp_path / "out", tmp_path / "cache"
    server.reset()
    stopped = llm_build(server, path, out, cache, "--set", "generator.check_answers=40")
    assert stopped.returncode == EXIT_CODE, stopped.stderr
    sent = server.stats()["chat"]
    assert sent <= 40 * 3  # no request past the 40 answers checked (each up to 3 attempts)
    lines = [line for line in stopped.stderr.splitlines() if line.strip() and "━" not in line]
    message = [line for line in lines if line.startswith("build stopped:")]
    assert len(message) == 1 and "generator_unparseable" not in message[0]
    assert "answers of 'gen-model' at" in message[0] and re.search(r"\(unparseable \d+%\)", message[0])
    assert "--set generator.check_answers=0" in message[0]
    sample = [line for line in lines if line.startswith("sample answer")]
    answer = "Here is a continuation without any of the requested tags."
    assert sample == [f"sample answer (unparseable): {answer}"]
    assert not (out / "manifest.json").exists()
    again = llm_build(server, path, out, cache, "--set", "generator.check_answers=40")
    assert again.returncode == EXIT_CODE, again.stderr
    assert server.stats()["chat"] == sent  # every answer checked was kept: judged from the cache
    lifted = llm_build(server, path, out, cache, "--set", "generator.check_answers=0")
    assert lifted.returncode == 0, lifted.stderr
    counts = funnel(out)
    assert counts["rejected_by_reason"]["generator_unparseable"] == 160 and counts["kept"] == 40


def test_the_sample_is_escaped_for_the_terminal(server, tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(30))
    hostile = "Sure!\x1b]0;pwned\x07\x1b[2J\nI will not use tags. " + "Blah. " * 100
    server.reset(fault="notags", fault_count=0, notags_text=hostile)
    try:
        stopped = llm_build(server, path, tmp_path / "out", tmp_path / "cache")
    finally:
        server.reset()
    assert stopped.returncode == EXIT_CODE, stopped.stderr
    assert server.stats()["chat"] <= 50 * 3  # the default check: the first 50 answers
    assert "\x1b" not in stopped.stderr and "\x07" not in stopped.stderr
    (sample,) = [line for line in stopped.stderr.splitlines() if line.startswith("sample answer")]
    assert sample.startswith("sample answer (unparseable): Sure!\\x1b]0;pwned\\x07\\x1b[2J\\nI will")
    assert sample.endswith("…") and len(sample) < 300


def test_each_worker_of_a_pool_judges_its_own_first_answers(server, tmp_path):
    path = corpus(tmp_path / "c.jsonl", good_rows(120))
    server.reset(fault="notags", fault_count=0)
    try:
        stopped = llm_build(
            server, path, tmp_path / "out", tmp_path / "cache", "--set", "output.chunk_rows=20",
            "--set", "execution.executor=processes", "--set", "execution.workers=2",
        )  # fmt: skip
    finally:
        server.reset()
    assert stopped.returncode == EXIT_CODE, stopped.stderr
    assert server.stats()["chat"] <= 2 * 25 * 3  # 25 answers checked per worker
    assert sum(line.startswith("build stopped:") for line in stopped.stderr.splitlines()) == 1
    assert "check_answers=25" in stopped.stderr
