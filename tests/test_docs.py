"""The command reference keeps up with the CLI: docs/cli.md has a section for every command and names
every option, the README's command table links every command, the synopses' defaults are the CLI's,
every setting's environment variable is documented (and named in the --help of its option), every
relative link and anchor in the README and docs/ resolves, the README's sample output is what `search`
prints, and each --json answer has the fields docs/cli.md names. Only that last test loads a model (the
demo ones); the others compare click's own description of the commands with the text.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from blip2_search import settings
from blip2_search.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
SERVER_MD = (ROOT / "docs" / "server.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMON = CLI_MD.split("\n## ", 1)[0]  # the options every command shares (--library, --device, --dtype, --json)
SHARED_OPTIONS = {"--library", "--device", "--dtype", "--json"}


def _sections() -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^## (\S+)\n(.*?)(?=^## |\Z)", CLI_MD, re.S | re.M)}


def _options(command: click.Command):
    for param in command.params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                if name not in ("-h", "--help"):
                    yield param, name


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_a_section_and_a_readme_row(name):
    assert name in _sections(), f"docs/cli.md has no '## {name}' section"
    assert f"(docs/cli.md#{name})" in README, f"the README's command table does not link {name}"


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_is_documented(name):
    section = _sections()[name] + (SERVER_MD if name == "serve" else "")
    missing = [opt for _, opt in _options(main.commands[name])
               if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", section)
               and not (opt in SHARED_OPTIONS and f"`{opt}" in COMMON)]
    assert not missing, f"docs/cli.md's {name} section does not name {missing}"
    assert "--version" in CLI_MD


def test_synopsis_defaults_are_the_clis():
    """`[--port 8765]`, `[-k 10]`: a literal value in a synopsis is that option's default."""
    checked = 0
    for doc, sections in ((CLI_MD, _sections()), (SERVER_MD, {"serve": SERVER_MD})):
        for name, text in sections.items():
            options = {opt: param for param, opt in _options(main.commands[name])}
            for opt, value in re.findall(r"\[(--?[\w-]+) ([^\]\s|]+)\]", text):
                if value.isupper() or value == "..." or opt not in options:
                    continue  # a placeholder (DIR, N, ...), or another command's option quoted in prose
                default = options[opt].default
                assert str(default) == value, f"{name}: the docs show [{opt} {value}], the default is {default!r}"
                checked += 1
    assert checked >= 10


def test_every_setting_is_documented_and_in_its_options_help():
    helps = {opt: param.help or "" for param, opt in _options(main.commands["index"])}
    option_of = {"library": "--library", "model": "--model", "captioner": "--captioner", "batch_size": "--batch-size",
                 "workers": "--workers", "vector_index": "--vector-index"}
    for setting in settings.SETTINGS.values():
        assert setting.env in CLI_MD, f"docs/cli.md does not name {setting.env}"
        if setting.name in option_of:
            assert f"${setting.env}" in helps[option_of[setting.name]], f"index {option_of[setting.name]} --help does not name {setting.env}"
    token = {opt: param for param, opt in _options(main.commands["serve"])}["--token"]
    assert "BLIP2_SEARCH_TOKEN" in CLI_MD and "BLIP2_SEARCH_TOKEN" in (token.help or "")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m:
            slug = _slug(m.group(1))
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_and_anchors_resolve(doc):
    source = ROOT / doc
    for link in re.findall(r"\]\(([^)\s]+)\)", source.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = link.partition("#")
        target = (source.parent / path).resolve() if path else source
        assert target.exists(), f"{doc}: link {link} names a missing file"
        if anchor:
            assert anchor in _anchors(target), f"{doc}: link {link} names no heading of {target.name}"


def test_every_http_route_is_in_server_md(tmp_path):
    """Each method and path the server answers (HEAD aside: every GET answers it) is named in docs/server.md."""
    pytest.importorskip("fastapi")
    from fastapi.routing import APIRoute

    from blip2_search.library import Library
    from blip2_search.server.app import create_app

    with Library.open(tmp_path / "lib", model="demo", create=True) as lib:
        app = create_app(lib)
    text = " ".join(SERVER_MD.split())
    routes = {(method, route.path.replace("{image_id}", "{id}")) for route in app.routes if isinstance(route, APIRoute)
              for method in route.methods if method != "HEAD"}
    assert len(routes) >= 9
    named = lambda m, p: re.search(rf"{m} {re.escape(p)}(?![\w/{{])", text)  # noqa: E731  (not /api/searchx)
    missing = [f"{m} {p}" for m, p in sorted(routes) if not named(m, p) and not (m == "GET" and f"`{p}`" in text)]
    assert not missing, f"docs/server.md does not name {missing}"


def test_the_readmes_sample_search_output_is_what_search_prints(capsys):
    """The README's first screen shows `search`'s output: each line is the one the CLI prints for those values."""
    from datetime import datetime

    from blip2_search.cli import _print_result
    from blip2_search.search.results import Hit, SearchResult

    block = README.split("The search prints", 1)[1].split("```\n", 2)[1]
    line = re.compile(r' *(-?\d+\.\d+)  itc=(-?\d+\.\d+)(?:  itm= *(-?\d+\.\d+))?(?:  (\d{4}-\d\d-\d\d))?  (\S+)(?:  "(.*)")?')
    shown = [text for text in block.splitlines() if text.strip() != "..."]
    hits = []
    for i, text in enumerate(shown):
        m = line.fullmatch(text)
        assert m, f"README: {text!r} is not a line search prints"
        score, itc, itm, day, path, caption = m.groups()
        hits.append(Hit(i, path, float(score), float(itc), itm and float(itm), caption, day and datetime.fromisoformat(day)))
    assert len(hits) >= 2
    _print_result(SearchResult("q", tuple(hits)), as_json=False)
    assert capsys.readouterr().out.splitlines() == shown


def _documented_fields(section: str) -> tuple[set[str], str]:
    """The field names in a section's JSON shapes (code spans such as `{"images", "indexed"}`), and those spans."""
    spans = " ".join(re.findall(r"`([\[{][^`]*)`", section))
    return set(re.findall(r'"(\w+)"', spans)), spans


def _emitted_fields(value, shapes: str) -> set[str]:
    """Every key of a JSON answer; a key's value is looked into where the docs show its inside (`"results": [{"id"`)."""
    if isinstance(value, list):
        return set().union(*(_emitted_fields(v, shapes) for v in value))
    if not isinstance(value, dict):
        return set()
    found = set(value)
    for key, inner in value.items():
        if re.search(rf'"{key}": [\[{{]\[?{{?"', shapes):
            found |= _emitted_fields(inner, shapes)
    return found


def test_every_json_field_is_documented_and_every_documented_one_is_printed(tmp_path, monkeypatch):
    """Each --json answer, run on the demo models, has the fields its docs/cli.md section names: no more, no fewer
    (`notes` is there only when there are some)."""
    import json
    import shutil

    from click.testing import CliRunner

    from blip2_search.demo import write_folder

    monkeypatch.chdir(tmp_path)
    photos = [path for path, _ in write_folder(tmp_path / "photos", 3, seed=1)]
    shutil.copy(photos[0], tmp_path / "photos" / f"copy{photos[0].suffix}")  # a near-duplicate group
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not an image")  # a failure
    (tmp_path / "queries.txt").write_text('a red circle on the left\n"a" -\n', encoding="utf-8")
    (tmp_path / "annotations.json").write_text(json.dumps([{"image": p.name, "caption": "a red circle on the left"} for p in photos]))
    lib = ["--library", "lib"]
    runs = {
        "index": ["index", "photos", *lib, "--model", "demo"],
        "status": ["status", *lib],
        "search": ["search", "a red circle on the left", *lib, "-k", "2"],
        "prune": ["prune", *lib],
        "failures": ["failures", *lib],
        "duplicates": ["duplicates", *lib],
        "rerank": ["rerank", "a red circle", str(photos[0]), "photos/broken.jpg", "--model", "demo"],
        "caption": ["caption", str(photos[0]), "photos/broken.jpg", "--captioner", "demo"],
        "eval": ["eval", "annotations.json", "--images", "photos", "--model", "demo", "--rerank-k", "2"],
    }
    assert set(runs) == {name for name, command in main.commands.items() if any(p.name == "as_json" for p in command.params)}
    sections = _sections()
    for name, args in runs.items():
        answers = [json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)]
        if name == "search":  # --queries: a line's answer, and a bad line's error
            answers += [json.loads(line) for line in CliRunner().invoke(main, ["search", "--queries", "queries.txt", *lib]).stdout.splitlines()]
        documented, shapes = _documented_fields(sections[name])
        emitted = set().union(*(_emitted_fields(answer, shapes) for answer in answers))
        assert emitted <= documented, f"{name} --json prints {sorted(emitted - documented)}, which docs/cli.md's {name} section does not name"
        assert documented - {"notes"} <= emitted, f"docs/cli.md's {name} section names {sorted(documented - emitted - {'notes'})}, which {name} --json does not print"
