"""Recipes are data: templates render in Jinja's sandbox, format fields take only their named fields.

The CLI cases run the real ``bsafe-data``: ``validate`` and ``build`` refuse a hostile template or
format field with exit 2 and one problem, no traceback and no marker file; a template whose escape
only runs on some rows (the static check cannot see it) is stopped by the sandbox at build time;
row text that looks like a template stays text in the card.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from bsafe_data.formats import FormatError, control_format, output_dir, parse_format
from bsafe_data.sandbox import TemplateProblem, check_template, environment
from tests.conftest import REPO
from tests.guard_server import GuardServer

CLI = str(Path(sys.executable).with_name("bsafe-data"))
FLAGSHIP = str(REPO / "recipes" / "bsafe_plus.yaml")
GOOD = "Water the fern weekly. Keep the soil moist. Avoid direct sun in summer. Mist the leaves when dry."


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def escape(marker: Path) -> list[str]:
    """Templates that would create ``marker`` through Python internals: named in the template
    (refused before rendering) and computed (refused by the sandbox on the sample render)."""
    touch = f"touch {marker}"
    return [
        f"{{{{ lipsum.__globals__['os'].system('{touch}') }}}}",
        f"{{{{ (cycler|attr('__init__')).__globals__.os.popen('{touch}').read() }}}}",
        f"{{{{ lipsum['__glo' ~ 'bals__'].os.system('{touch}') }}}}",
    ]


def guard(template: str, base_url: str = "http://127.0.0.1:9/v1") -> str:
    spec = {"name": "g", "provider": "guard", "model": "plain", "base_url": base_url, "template": template}
    return "filters=" + json.dumps({"classifiers": [{"name": "builtin", "provider": "builtin"}, spec]})


def one_problem(proc: subprocess.CompletedProcess, field: str) -> str:
    """``validate``/``build`` refused with exit 2 and exactly one problem, at ``field``."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "1 problem(s)" in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("  ")]
    assert field in line, line
    return line


def test_validate_refuses_hostile_templates_and_no_marker_is_made(tmp_path):
    marker = tmp_path / "MARK"
    for template in escape(marker):
        line = one_problem(cli("validate", FLAGSHIP, "--set", guard(template)), "template")
        assert "sandbox" in line, line
    folder = tmp_path / "tpl"
    folder.mkdir()
    (folder / "evil.user.j2").write_text("{{ part1 }}")
    generator = "generator={provider: openai, model: m, base_url: 'http://127.0.0.1:9', template: tpl/evil}"
    (folder / "evil.system.j2").write_text(escape(marker)[-1])
    one_problem(cli("validate", FLAGSHIP, "--set", generator, cwd=tmp_path), "generator.template")
    (folder / "evil.system.j2").write_text(escape(marker)[0])
    build = cli("build", FLAGSHIP, "--set", generator, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "sandbox" in one_problem(build, "generator.template")
    assert not marker.exists() and not (tmp_path / "out").exists()
    (folder / "evil.system.j2").write_text("Continue in {{ category }}.")  # a plain one passes
    assert cli("validate", FLAGSHIP, "--set", generator, cwd=tmp_path).returncode == 0


def test_format_fields_take_only_their_named_fields(tmp_path):
    """One message and exit 2 from ``build`` and ``validate``; nothing is created (no ``out/str``)."""
    for override in ("output.dir=out/{name.__class__.__name__}", "output.dir=out/{name.nope}"):
        line = one_problem(cli("build", FLAGSHIP, "--set", override, cwd=tmp_path), "output.dir")
        assert "attribute and index access is not allowed" in line
    assert not any(tmp_path.iterdir())
    control = "control.format=[C {category[0]}][B {x!r}]"
    line = one_problem(cli("validate", FLAGSHIP, "--set", control), "control.format")
    assert "attribute and index access is not allowed" in line


def test_an_escape_on_some_rows_only_is_stopped_by_the_sandbox_at_build_time(tmp_path):
    """``validate`` renders on sample values and cannot take every branch; the build's sandbox
    refuses the escape on the rows that take it (``row_error``), the others are built, and row
    text that looks like a template stays text in the card."""
    marker = tmp_path / "MARK"
    trap = f"{{{{ lipsum['__glo' ~ 'bals__']['os'].system('touch {marker}') }}}}"
    template = f"{{% if 'fern' in response %}}{trap}{{% endif %}}Unsafe? {{{{ response }}}}"
    rows = [{"id": f"r{i}", "prompt": "How do I care for it?", "response": GOOD} for i in range(3)]
    cactus = GOOD.replace("fern", "cactus")
    rows += [{"id": f"s{i}", "prompt": "Cactus {{ 7 * 7 }}?", "response": cactus} for i in range(3)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with GuardServer() as server:
        settings = ("--set", guard(template, server.url), "--set", "tokenizers.extra=[]")
        assert cli("validate", FLAGSHIP, *settings).returncode == 0
        out = tmp_path / "out"
        proc = cli(
            "build", FLAGSHIP, "--out", str(out), "--source", str(corpus), "--cache-dir", str(tmp_path / "c"),
            *settings, env={"OPENAI_API_KEY": "sk-test"},
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    from datasets import load_dataset

    rejected = load_dataset(str(out), "rejected")["train"]
    fern = [r for r in rejected if r["source"]["id"].startswith("r")]
    assert fern and all(r["reasons"] == ["row_error"] and "unsafe" in r["detail"] for r in fern)
    kept = {r["source"]["id"] for split in load_dataset(str(out)).values() for r in split}
    assert kept and all(i.startswith("s") for i in kept)
    card = (out / "README.md").read_text()
    assert "Cactus {{ 7 * 7 }}?" in card and "Cactus 49?" not in card


def test_format_strings_parse_render_and_compile():
    fmt = control_format("[CATEGORY {category}][BACKTRACK_BY_{x}] {{literal}}")
    assert fmt.fields == {"category", "x"}
    assert fmt.render(category="Toxic", x=7) == "[CATEGORY Toxic][BACKTRACK_BY_7] {literal}"
    pattern = fmt.regex({"category": r"(?P<c>\w+)", "x": r"(?P<x>\d+)"})
    import re

    match = re.fullmatch(pattern, "[CATEGORY Toxic][BACKTRACK_BY_12] {literal}")
    assert match and match["c"] == "Toxic" and match["x"] == "12"
    assert output_dir("out/{name}-{{v}}", "r") == "out/r-{v}"
    for bad in ("{name.__class__}", "{name[0]}", "{name!r}", "{name:9}", "{}", "{0}", "{other}", "{", "}"):
        with pytest.raises(FormatError):
            parse_format(bad, ("name",))
    with pytest.raises(FormatError, match="must contain {x}"):
        control_format("[CATEGORY {category}]")
    with pytest.raises(FormatError, match="no value"):
        parse_format("{name}", ("name",)).render()


def test_the_sandbox_refuses_internals_mutation_and_huge_values():
    env = environment()
    for source in (
        "{{ lipsum.__globals__ }}",
        "{{ cycler.__init__ }}",
        "{{ [].append(1) }}",
        "{{ {}.update(a=1) }}",
        "{{ 'x' * 10 ** 9 }}",
        "{{ 2 ** 100000 }}",
        "{{ '{0.__class__}'.format(1) }}",
    ):
        with pytest.raises(jinja2.sandbox.SecurityError):
            env.from_string(source).render()
    assert env.from_string("{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ x|upper }}").render(x="y") == "ababab 1024 Y"
    with pytest.raises(TemplateProblem, match="unknown|undefined"):
        check_template(env, "{{ nope }}", {}, "t")
    with pytest.raises(TemplateProblem, match="syntax error"):
        check_template(env, "{% if %}", {}, "t")
    with pytest.raises(TemplateProblem, match="TypeError"):
        check_template(env, "{{ part1 + 1 }}", {"part1": "text"}, "t")
    looping = environment(loader=jinja2.DictLoader({"self.j2": "{% include 'self.j2' %}"}))
    with pytest.raises(TemplateProblem, match="includes itself"):
        check_template(looping, "{% include 'self.j2' %}", {}, "t")
