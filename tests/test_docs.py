"""The documentation cannot drift from the code: the site builds with `mkdocs build --strict`, its method table
and the README's equal what `edgetok methods --json` says, its CLI reference lists every Click command and option,
and every `edgetok ...` command line shown in a bash block is one the tests run (or is marked as needing a GPU or
a Jetson)."""

from __future__ import annotations

import ast
import html
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from cli_assertions import run_cli
from edgetok.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NEEDS_HARDWARE = ("# needs a GPU", "# needs a Jetson")


def _hooks():
    spec = importlib.util.spec_from_file_location("edgetok_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as CI builds it: strict, so a broken link, anchor, nav entry or hook fails the build."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture
def methods_json(capsys) -> list[dict]:
    code, out, err = run_cli(capsys, "methods", "--json")
    assert code == 0, err
    return json.loads(out)["methods"]


def _text(fragment: str) -> str:
    """Visible text of an HTML fragment, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _letters(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "", text)


# --- the method table -------------------------------------------------------------------------------------------

def _parse_table(markdown: str) -> dict[str, dict]:
    """The README/site method table read back into {method: {summary, paper, reference, options: {flag: {...}}}},
    independently of how docs/hooks.py wrote it."""
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    found = {}
    for row in rows:
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]
        name, summary, options, paper, reference = cells
        parsed = {}
        for cell in options.split("<br>") if options != "–" else []:
            flag, rest = re.fullmatch(r"`(--[\w-]+)` (.*)", cell).groups()
            kind, *parts = rest.split("; ")
            entry = {"type": kind, "default": None, "choices": None, "range": None}
            for part in parts:
                key, _, value = part.partition(" ")
                if key == "default":
                    entry["default"] = value
                elif part.startswith("one of "):
                    entry["choices"] = part[len("one of "):].split("/")
                elif key == "in":
                    entry["range"] = value
            parsed[flag] = entry
        found[name.strip("`")] = {"summary": summary, "paper": paper, "reference": reference, "options": parsed}
    return found


def _default_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(_default_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)


def _expected(methods: list[dict]) -> dict[str, dict]:
    def squash(text):
        return " ".join(str(text or "–").split())

    return {m["name"]: {"summary": squash(m["summary"]), "paper": squash(m["paper"]),
                        "reference": squash(m["reference"]),
                        "options": {o["flag"]: {"type": o["type"], "default": _default_text(o["default"]),
                                                "choices": None if not o["choices"] else [str(c) for c in o["choices"]],
                                                "range": o["range"]["text"] if o["range"] else None}
                                    for o in m["options"]}}
            for m in methods}


def test_readme_method_table_equals_edgetok_methods_json(methods_json):
    readme = (ROOT / "README.md").read_text()
    hooks = _hooks()
    block = hooks.readme_table(readme)
    assert block is not None, "README.md lost its generated method table (its methods-table markers)"
    assert _parse_table(block) == _expected(methods_json), \
        "README.md's method table is stale: rewrite it with `.venv/bin/python docs/hooks.py --readme`"
    assert block == hooks.readme_block(methods_json)
    assert set(_parse_table(block)) >= {"none", "tome", "evit", "ats", "dtome", "pitome", "gtp", "zerotprune"}


def test_site_method_table_equals_edgetok_methods_json(site, methods_json):
    page = (site / "methods" / "index.html").read_text()
    table = re.search(r"<table>.*?</table>", page, re.S).group(0)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    assert [_text(re.findall(r"<td>(.*?)</td>", r, re.S)[0]) for r in rows] == [m["name"] for m in methods_json]
    for row, method in zip(rows, methods_json):
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        assert _text(cells[1]) == " ".join(method["summary"].split())
        options = _text(cells[2])
        for option in method["options"]:
            assert option["flag"] in options, (method["name"], option["flag"])
            if option["range"]:
                assert option["range"]["text"] in options, (method["name"], option["flag"])
    family = _letters(" ".join(_text((site / "methods" / name / "index.html").read_text())
                               for name in ("merging", "pruning", "propagation")))
    for method in methods_json:
        for option in method["options"]:  # each method's options table on its family's page
            assert _letters(f"{option['flag']}{option['type']}") in family, (method["name"], option["flag"])
            assert _letters(option["help"]) in family, (method["name"], option["flag"])
    departures = _letters(_text(page))
    for method in methods_json:
        for departure in method["departures"]:
            assert _letters(departure) in departures, (method["name"], departure)


# --- the CLI reference ------------------------------------------------------------------------------------------

def _walk(command: click.Command, path: tuple[str, ...] = ("edgetok",)):
    yield path, command
    if isinstance(command, click.Group):
        for name in command.list_commands(click.Context(command)):
            yield from _walk(command.get_command(click.Context(command), name), path + (name,))


def test_cli_reference_lists_every_command_and_option(site):
    page = (site / "reference" / "cli" / "index.html").read_text()
    body = page[page.index('id="edgetok"') - 4:]
    body = body[:body.index("</article>")] if "</article>" in body else body
    heads = list(re.finditer(r"<h([2-6]) id=\"[^\"]*\">(.*?)(?:<a class=\"headerlink\".*?)?</h\1>", body, re.S))
    sections = [(int(h.group(1)), _text(h.group(2)), body[h.end():heads[i + 1].start() if i + 1 < len(heads) else None])
                for i, h in enumerate(heads)]
    expected = list(_walk(cli))
    assert [(len(path) + 1, path[-1]) for path, _ in expected] == [(level, name) for level, name, _ in sections], \
        "the CLI reference's commands differ from the Click tree"
    for (path, command), (_, _, section) in zip(expected, sections):
        text = _text(section)
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts + param.secondary_opts:
                    assert opt in text, (" ".join(path), opt)
                if param.help:
                    assert _letters(param.help) in _letters(text), (" ".join(path), param.opts[0], param.help)
        if command.help:
            assert _letters(command.help.split("\n\n")[0]) in _letters(text), " ".join(path)


# --- every command shown is one a test runs ---------------------------------------------------------------------

def _bash_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every `edgetok ...` line in the file's ```bash blocks, its continuation lines
    (a trailing backslash, or the indented lines of a synopsis) joined to it."""
    commands, inside, current = [], False, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            current = None
            continue
        if not inside:
            continue
        stripped = line.strip()
        for prefix in (".venv/bin/edgetok ", "$ edgetok "):
            if stripped.startswith(prefix):
                stripped = "edgetok " + stripped[len(prefix):]
        if stripped.startswith("edgetok "):
            commands.append([number, stripped])
            current = commands[-1]
        elif current is not None and line[:1] == " " and stripped and not stripped.startswith("#"):
            current[1] += " " + stripped
        else:
            current = None
    return [(n, c) for n, c in commands]


def _split(command: str) -> tuple[tuple[str, ...], set[str], bool]:
    """The command's subcommand path, the long options it uses, and whether it is marked as needing hardware."""
    marked = any(mark in command for mark in NEEDS_HARDWARE)
    code = command.split(" #", 1)[0]
    group, path = cli, []
    words = shlex.split(code.replace("[", " ").replace("]", " ").replace("|", " "), posix=True)[1:]
    for word in words:
        if isinstance(group, click.Group) and word in group.list_commands(click.Context(group)):
            path.append(word)
            group = group.get_command(click.Context(group), word)
        else:
            break
    options = {w.split("=", 1)[0] for w in words if re.fullmatch(r"--[a-z][\w-]*(=.*)?", w)}
    return tuple(path), options, marked


def _synopsis(command: str) -> bool:
    """A synopsis (`[--opt N]`, `a|b`: what a command accepts, not a command line to run)."""
    code = command.split(" #", 1)[0]
    return "[" in code or re.search(r"\w\|\w", code) is not None


def _command(path: tuple[str, ...]) -> click.Command:
    command = cli
    for word in path:
        command = command.get_command(click.Context(command), word)
    return command


def _test_literals() -> dict[str, set[str]]:
    """Per test file, the string literals it holds (what its run_cli / subprocess calls are made of); from this
    file only the `test_doc_example_*` tests, which run documented commands no other test runs as shown."""
    found = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        if path.name == "test_docs.py":
            tree = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef)
                                    and n.name.startswith("test_doc_example_")], type_ignores=[])
        literals = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
                literals.update(node.value.split())
        found[path.name] = literals
    return found


def _uncovered(files: list[Path], tests: dict[str, set[str]] | None = None) -> list[str]:
    """The rule. Every `edgetok` line names a command and options that exist (a synopsis is checked only for
    that). A command line to run is run by a test when one test file names its (last) subcommand and every long
    option it uses as string literals (its run_cli / subprocess arguments); otherwise its line says
    `# needs a GPU` or `# needs a Jetson`."""
    tests = _test_literals() if tests is None else tests
    missing = []
    for path in files:
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        for number, command in _bash_commands(path):
            subcommands, options, marked = _split(command)
            known = {opt for p in _command(subcommands).params for opt in p.opts + p.secondary_opts} | {"--help"}
            if not subcommands:
                missing.append(f"{where}:{number}: {command}  (no such command)")
                continue
            if options - known:
                missing.append(f"{where}:{number}: {command}  (no such option: {sorted(options - known)})")
                continue
            if marked or _synopsis(command):
                continue
            wanted = {subcommands[-1]} | {o for o in options if o != "--help"}
            if not any(wanted <= literals for literals in tests.values()):
                missing.append(f"{where}:{number}: {command}  (no test names "
                               f"{sorted(min((wanted - lit for lit in tests.values()), key=len))})")
    return missing


def test_every_documented_command_is_run_by_a_test():
    files = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    missing = _uncovered(files)
    assert not missing, "commands shown in the docs that no test runs (test them, or mark `# needs a GPU` / " \
                        "`# needs a Jetson`):\n" + "\n".join(missing)


def test_the_coverage_rule_catches_an_untested_option(tmp_path):
    """The rule fails a command line whose option no test names and an option the command does not have, and
    passes a tested line, a line marked as needing a GPU, and a synopsis."""
    page = tmp_path / "page.md"
    page.write_text("```bash\n"
                    "edgetok profile m.onnx --batch 8 --duration 1\n"
                    "edgetok profile m.engine --duration 1   # needs a GPU\n"
                    "edgetok export vit MODEL [--method none|tome] [--r N]\n"
                    "edgetok export vit MODEL [--no-such-option N]\n"
                    "edgetok profile m.onnx --batch 8\n"
                    "```\n")
    missing = _uncovered([page], tests={"test_x.py": {"profile", "--batch", "vit", "--method"}})
    assert [m.split(" ", 1)[0] for m in missing] == ["page.md:2:", "page.md:5:"], missing
    assert "no test names ['--duration']" in missing[0] and "no such option: ['--no-such-option']" in missing[1]
    commands = [c for _, c in _bash_commands(page)]
    assert _split(commands[1]) == (("profile",), {"--duration"}, True)
    assert _split(commands[2]) == (("export", "vit"), {"--method", "--r"}, False) and _synopsis(commands[2])


@pytest.mark.slow
def test_doc_example_seeded_sampling_repeats(capsys, tmp_path):
    """docs/speculative-decoding.md's `generate ... --mode target --temperature 0.8 --seed 1 --json`: sampling
    with a seed gives the same tokens every run (on a tiny random Llama pair with the shipped tokenizer)."""
    from transformers import LlamaConfig

    from edgetok.llm.pair import export_pair

    shipped = ROOT / "edgetok" / "assets" / "spec_pair" / "target"
    LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(tmp_path / "t")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "t" / name).write_bytes((shipped / name).read_bytes())
    export_pair(str(tmp_path / "t"), "layer-skip:1", str(tmp_path / "pair"))
    runs = []
    for _ in range(2):
        code, out, err = run_cli(capsys, "generate", str(tmp_path / "pair"), "--prompt-ids", "1,2,3", "--mode", "target",
                                 "--temperature", "0.8", "--seed", "1", "--json", "--max-new-tokens", "24")
        assert code == 0, err
        runs.append(json.loads(out)["tokens"])
    assert runs[0] == runs[1] and len(runs[0]) == 24, runs
    code, out, err = run_cli(capsys, "generate", str(tmp_path / "pair"), "--prompt-ids", "1,2,3", "--mode", "target",
                             "--temperature", "0.8", "--seed", "2", "--json", "--max-new-tokens", "24")
    assert code == 0, err
    assert json.loads(out)["tokens"] != runs[0], "a different seed drew the same 24 tokens: the seed is not used"


# --- what the pages point at exists -----------------------------------------------------------------------------

def test_files_and_links_named_in_the_docs_exist():
    """Every repository path the docs or the README name in backquotes (`edgetok/runtime/runners.py`,
    `bench/methods.py`) exists, and every relative link in the README leads to a file: a moved module or page
    cannot leave the manual pointing at nothing."""
    missing = []
    for page in sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]:
        text = page.read_text()
        for path in re.findall(r"`((?:edgetok|tests|bench|tools|plugins|recipes|docs)/[\w./-]+)`", text):
            if not (ROOT / path.rstrip("/")).exists():
                missing.append(f"{page.relative_to(ROOT)}: `{path}`")
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        if not (ROOT / target).is_file():
            missing.append(f"README.md: link ({target})")
    assert not missing, "named but not there:\n" + "\n".join(missing)
