"""The docs show only flags that exist: every `--flag` written after `pigeon <command>` in a fenced
code block of README.md or docs/*.md (or in an inline code span that starts with `pigeon <command>`,
as in README's command table) must appear in that command's `--help`.

The CLI runs in-process (typer's CliRunner), once per command; no command body runs.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pigeon.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
# `pigeon build-cells`, `.venv/bin/pigeon train`, `python -m pigeon.cli pretrain` (torchrun)
CALL = re.compile(r"(?:^|(?<=[\s/`$(]))pigeon(?:\.cli)?\s+([a-z][a-z0-9-]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
# where a shell command ends: a comment, a pipe, a chain
END = re.compile(r"\s#|\s\|\s|&&|;")
INLINE = re.compile(r"`(pigeon\s[^`]*)`")


@lru_cache(maxsize=None)
def help_text(command: str) -> str:
    """`pigeon COMMAND --help`, wide enough that rich never shortens an option name."""
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}, terminal_width=250)
    assert res.exit_code == 0, f"pigeon {command} --help failed: {res.output}"
    return res.output


@lru_cache(maxsize=None)
def options(command: str) -> frozenset[str]:
    """The option names `pigeon COMMAND` accepts (`--out`, `--no-validate`, `-q`, ...)."""
    cmd = typer.main.get_command(app).commands[command]
    return frozenset(o for p in cmd.params for o in (*p.opts, *p.secondary_opts))


def commands() -> set[str]:
    """The registered command names (`build-cells`, `train`, ...)."""
    return {c.name or c.callback.__name__ for c in app.registered_commands}


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) inside fenced code blocks, plus inline spans `pigeon ...` outside
    them; in a block, a trailing backslash, or a following line that starts with an option (`--x`,
    `[--x`), continues the line."""
    out: list[tuple[int, str]] = []
    inside = False
    for no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(raw):
            inside = not inside
            continue
        if not inside:
            out += [(no, m.group(1)) for m in INLINE.finditer(raw)]
            continue
        stripped = raw.strip()
        joins = out and (out[-1][1].endswith("\\") or (stripped.startswith(("--", "[--")) and CALL.search(out[-1][1])))
        if joins:
            prev_no, prev = out[-1]
            out[-1] = (prev_no, prev.rstrip("\\").rstrip() + " " + stripped)
        else:
            out.append((no, raw))
    return out


def doc_calls() -> list[tuple[str, int, str, list[str]]]:
    """(file, line, command, flags) for every `pigeon <word>` in the docs' code blocks."""
    calls = []
    for path in DOCS:
        for no, line in code_lines(path):
            for m in CALL.finditer(line):
                rest = line[m.end():]
                cut = END.search(rest)
                rest = rest[:cut.start()] if cut else rest
                calls.append((path.relative_to(ROOT).as_posix(), no, m.group(1), FLAG.findall(rest)))
    return calls


def test_docs_show_only_existing_commands_and_flags() -> None:
    known = commands()
    calls = doc_calls()
    problems = []
    for where, no, cmd, flags in calls:
        if cmd not in known:
            # prose inside a code block ("pigeon answers ...") is no command unless flags follow
            if flags:
                problems.append(f"{where}:{no}: `pigeon {cmd}` is not a command (commands: {', '.join(sorted(known))})")
            continue
        text = help_text(cmd)
        # an option of the command, listed in its help (not just named in another option's help text)
        problems += [f"{where}:{no}: `pigeon {cmd} {f}`: {cmd} has no option {f}" for f in flags
                     if f not in options(cmd) or not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not problems, "docs name options that do not exist:\n" + "\n".join(problems)


def test_the_check_sees_the_docs() -> None:
    """Guard against a parser that finds nothing (and so passes vacuously)."""
    calls = [c for c in doc_calls() if c[2] in commands()]
    seen = {c[2] for c in calls}
    assert {"build-cells", "train", "build-index", "locate", "evaluate", "serve", "pretrain"} <= seen, seen
    assert sum(len(c[3]) for c in calls) >= 40
    # a continuation line and a torchrun call are read as part of their command
    assert ("docs/pretrain.md", "pretrain") in {(c[0], c[2]) for c in calls if "--unfreeze-last" in c[3]}
    assert any(c[0] == "docs/pretrain.md" and "--batch-size" in c[3] and "--backbone" in c[3] for c in calls)
    # README's command table (inline code spans) is read too
    assert {c[2] for c in calls if c[0] == "README.md"} >= {"build-cells", "pretrain", "train", "serve"}


@pytest.mark.parametrize("flag,command", [("--out", "pretrain"), ("--bundle", "train"), ("--refine", "serve")])
def test_help_lists_known_flags(flag: str, command: str) -> None:
    """The help text is read whole (a flag rich would shorten in a narrow terminal still matches)."""
    assert flag in help_text(command) and flag in options(command)


def test_options_are_the_commands_own() -> None:
    """A flag of another command (or one only named in help prose) is no option of this one."""
    assert "--bundle" not in options("pretrain") and "--epochs" not in options("build-index")
    assert {"--validate", "--no-validate"} <= options("build-index") and "-q" in options("build-cells")
