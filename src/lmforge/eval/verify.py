"""Verifiers: a reward in [0, 1] for a completion, checked against its problem (reinforcement learning from
verifiable rewards: `lmforge finetune grpo`).

A verifier is called as `verifier(completion, problem)`, where problem is the data row as a dict (`prompt`,
`answer`, and any other keys the file gives, e.g. `tests`). `get_verifier(spec)` builds one from its name:

    exact           the completion, stripped, is the answer (case and inner whitespace ignored)
    number          the last number in the completion equals the answer (1,000 and 1000 alike; 4.0 == 4)
    regex:PATTERN   PATTERN is found in the completion; if it has a group, its first group must equal the answer
    json            the completion (or its ```json block) parses as JSON; with an answer that parses as JSON
                    too, the two must be equal
    code            the completion's Python (its ```python block, or all of it) runs with the problem's `tests`
                    (assert statements) after it, in a separate Python process with a time limit: 1 when it
                    exits cleanly. Never run in this process
    FILE.py:NAME    a function of yours, NAME in FILE.py (or module.path:NAME), called as NAME(completion,
                    problem); it returns a number (a bool counts as 0 / 1)

or a Python callable of the same shape.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError

Verifier = Callable[[str, dict[str, Any]], float]
NAMES = ("exact", "number", "regex:PATTERN", "json", "code", "FILE.py:FUNCTION")
CODE_TIMEOUT = 5.0  # seconds a completion's program may run

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _norm(text: str) -> str:
    return " ".join(str(text).split()).lower()


def exact(completion: str, problem: dict[str, Any]) -> float:
    return float(_norm(completion) == _norm(problem.get("answer", "")))


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None."""
    found = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
    return float(found[-1]) if found else None


def number(completion: str, problem: dict[str, Any]) -> float:
    got, want = last_number(completion), last_number(str(problem.get("answer", "")))
    return float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))


def regex(pattern: str) -> Verifier:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"verifier regex:{pattern} does not compile: {e}") from None

    def check(completion: str, problem: dict[str, Any]) -> float:
        m = rx.search(completion)
        if m is None:
            return 0.0
        if rx.groups and "answer" in problem:
            return float(_norm(m.group(1) or "") == _norm(problem["answer"]))
        return 1.0

    return check


def _block(text: str, langs: tuple[str, ...]) -> str:
    """The first fenced block (```lang ... ```) of one of `langs`, or of any language, or the text itself."""
    for pat in [rf"```(?:{'|'.join(langs)})\s*\n(.*?)```", r"```[^\n]*\n(.*?)```"]:
        m = re.search(pat, text, re.S | re.I)
        if m:
            return m.group(1)
    return text


def json_valid(completion: str, problem: dict[str, Any]) -> float:
    try:
        got = json.loads(_block(completion, ("json",)).strip())
    except (ValueError, RecursionError):
        return 0.0
    want = problem.get("answer")
    if isinstance(want, str):
        try:
            want = json.loads(want)
        except ValueError:
            return 1.0  # an answer that is not JSON asks only for validity
    return float(want is None or got == want)


CODE_MEMORY = 1 << 30  # bytes of address space a completion's program may take


def _limits(timeout: float) -> None:  # (in the child, before it runs: POSIX only)
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CODE_MEMORY, CODE_MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 1))


def code(completion: str, problem: dict[str, Any], timeout: float = CODE_TIMEOUT) -> float:
    """Run the completion's program and the problem's tests in a fresh `python -I` (no user site, no
    environment-variable hooks) in an empty temporary folder, in a session of its own with at most 1 GB of
    memory and `timeout` seconds of CPU (on POSIX); 1.0 when it exits with status 0 in time. At the time limit
    the whole session is killed, so a process the program started does not outlive it."""
    tests = problem.get("tests", "")
    if isinstance(tests, list):
        tests = "\n".join(map(str, tests))
    program = _block(completion, ("python", "py")) + "\n\n" + str(tests) + "\n"
    posix = os.name == "posix"
    with tempfile.TemporaryDirectory(prefix="lmforge-verify-") as d:
        (Path(d) / "main.py").write_text(program, encoding="utf-8")
        proc = subprocess.Popen(
            [sys.executable, "-I", "main.py"],
            cwd=d,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            start_new_session=posix,
            preexec_fn=(lambda: _limits(timeout)) if posix else None,
        )
        try:
            return float(proc.wait(timeout=timeout) == 0)
        except subprocess.TimeoutExpired:
            if posix:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
            return 0.0


BUILT_IN: dict[str, Verifier] = {"exact": exact, "number": number, "json": json_valid, "code": code}


def get_verifier(spec: str | Verifier) -> Verifier:
    """The verifier `spec` names (see the module notes), or `spec` itself when it is callable. Every reward it
    gives goes through a check that it is a finite number."""
    if callable(spec):
        return _checked(spec, getattr(spec, "__name__", "the reward function"))
    spec = str(spec)
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    if spec.startswith("regex:"):
        return regex(spec[len("regex:") :])
    if ":" in spec:
        where, name = spec.rsplit(":", 1)
        return _checked(_load(where, name, spec), spec)
    raise ConfigError(f"unknown verifier {spec!r}; known: {', '.join(NAMES)}")


def _load(where: str, name: str, spec: str) -> Callable:
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"verifier {spec}: {where} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_lmforge_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error in it is theirs to see, in one line
            raise ConfigError(f"verifier {spec}: importing {where} failed ({type(e).__name__}: {e})") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"verifier {spec}: cannot import {where} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"verifier {spec}: {where} has no function {name!r}")
    return fn


def _checked(fn: Callable, label: str) -> Verifier:
    def call(completion: str, problem: dict[str, Any]) -> float:
        r = fn(completion, problem)
        if isinstance(r, bool):
            return float(r)
        if not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ConfigError(f"{label} returned {r!r}; a reward must be a finite number")
        return float(r)

    return call
