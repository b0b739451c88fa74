"""Write docs/cli.md, the CLI reference, from lmforge's own argparse parser (`lmforge.cli.build_parser`).

    .venv/bin/python tools/cli_reference.py           # regenerate docs/cli.md
    .venv/bin/python tools/cli_reference.py --check   # exit 1 if docs/cli.md is stale

Every verb and sub-verb gets a section: its help, a synopsis (positionals and required flags), and a table of
every flag with its help and default; `pretrain` and `quickstart` also list their `--set` settings (the parser's
epilog). tests/test_docs.py fails when docs/cli.md differs from a fresh generation.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"
REGENERATE = ".venv/bin/python tools/cli_reference.py"
WIDTH = 100  # a fixed width: the output must not depend on the terminal


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog=parser.prog, width=WIDTH)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-verb, in the order the parser declares them."""
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            rows += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return rows


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    if action.choices is not None and action.metavar is None:
        meta = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        meta = action.metavar or action.dest.upper()
    if action.nargs in ("+", "*"):
        meta += " ..."
    return f"`{names} {meta}`"


def _default(action: argparse.Action) -> str:
    d = action.default
    if d is None or d is argparse.SUPPRESS or d == [] or action.nargs == 0 or action.required:
        return ""
    return f"`{d}`"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = _formatter(parser)._expand_help(action) if action.help else ""
    notes = []
    if action.required:
        notes.append("required")
    if action.option_strings and isinstance(action, argparse._AppendAction) and "repeat" not in text:
        notes.append("repeatable")
    if notes:
        text = f"({', '.join(notes)}) {text}".strip()
    return _cell(text)


def _synopsis(parser: argparse.ArgumentParser) -> str:
    words = [parser.prog]
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not a.option_strings:
            words.append(a.metavar or a.dest if a.nargs != "?" else f"[{a.metavar or a.dest}]")
        elif a.required:
            words.append(_flag(a).strip("`"))
    subs = _subcommands(parser)
    if subs:
        words.append("{" + ",".join(name for name, _, _ in subs) + "} ...")
    elif any(a.option_strings and not a.required and not isinstance(a, argparse._HelpAction) for a in parser._actions):
        words.append("[options]")
    return " ".join(words)


def _table(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> list[str]:
    kind = "flag" if all(a.option_strings for a in actions) else "argument"
    lines = [f"| {kind} | help | default |", "|---|---|---|"]
    for a in actions:
        lines.append(f"| {_flag(a)} | {_help(parser, a)} | {_default(a)} |")
    return lines


def _section(parser: argparse.ArgumentParser, help_text: str, depth: int) -> list[str]:
    lines = [f"{'#' * min(depth, 4)} {parser.prog}", ""]
    about = parser.description or help_text
    if about:
        lines += [_cell(about), ""]
    lines += ["```text", _synopsis(parser), "```", ""]
    for group in parser._action_groups:
        actions = [
            a for a in group._group_actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        ]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments", "positional arguments"):
            lines += [f"*{_cell(group.title)}*", ""]
        lines += _table(parser, actions) + [""]
    if parser.epilog:
        lines += ["```text", parser.epilog.rstrip(), "```", ""]
    subs = _subcommands(parser)
    if subs and depth > 1:
        lines += [f"| {parser.prog.split(' ', 1)[-1]} ... | does |", "|---|---|"]
        lines += [f"| [`{name}`](#{_slug(sub.prog)}) | {_cell(h)} |" for name, h, sub in subs] + [""]
    for _, h, sub in subs:
        lines += _section(sub, h, depth + 1)
    return lines


def _slug(title: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", title).strip().lower())


def render() -> str:
    from lmforge.cli import build_parser

    parser = build_parser()
    verbs = _subcommands(parser)
    lines = [
        "# CLI reference",
        "",
        f"<!-- Generated from lmforge's argparse parser by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every verb is a thin wrapper over one library function: it parses its flags, calls the function and "
        "prints the result. A mistake in the input prints one line, `lmforge: error: ...`, and exits with "
        "status 2. `lmforge VERB --help` prints the same flags and help as this page. `python -m lmforge` is the same "
        "program as `lmforge`.",
        "",
        "| verb | does |",
        "|---|---|",
    ]
    lines += [f"| [`{name}`](#{_slug(sub.prog)}) | {_cell(h)} |" for name, h, sub in verbs] + [""]
    top = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    if top:
        lines += ["Options of `lmforge` itself:", ""] + _table(parser, top) + [""]
    for _, h, sub in verbs:
        lines += _section(sub, h, 2)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is stale, write nothing")
    a = args.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
