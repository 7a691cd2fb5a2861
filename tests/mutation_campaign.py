"""Mutation campaign: does the test suite fail when the package's code is changed a little?

"A test that cannot fail is a defect." This script changes one token of a source file at a time (a mutant),
runs the given tests against it and records whether they failed (the mutant is *killed*) or passed (it
*survived*: no test notices that change). A survivor is either a missing test or an equivalent change (one
that cannot alter behaviour); each needs a look.

The mutants of a file are numbered in source order, so a campaign is replayable:

    python tests/mutation_campaign.py --list streaming_llm/positions.py              # the mutants, numbered
    python tests/mutation_campaign.py --show streaming_llm/positions.py:17           # one, as a diff
    python tests/mutation_campaign.py --files streaming_llm/positions.py \\
        --tests tests/test_exactness.py tests/test_rope.py --log LOG                  # run them all
    python tests/mutation_campaign.py --files F --functions f,g --sample 50 --seed 0 ...   # a seeded sample
    python tests/mutation_campaign.py --summarize LOG --out results/mutation/NAME.json

Mutation operators (one token each; a mutant that does not compile is not counted):
comparison (< <=, > >=, == !=), arithmetic (+ -, * /, += -=), integer literal (0 -> 1, 1 -> 0, n -> n + 1),
True <-> False, and <-> or, min <-> max, `not` dropped.

It edits the file in place and puts it back after each mutant (also on Ctrl-C), so run it in a clean checkout
or worktree of its own: it refuses a file with uncommitted changes. While it runs, any other test run in that
checkout tests the current mutant, so try new tests in another copy. SIGTERM and SIGHUP put the file back as Ctrl-C does,
and so does SIGINT in a background job (whose shell made it ignore SIGINT). Pytest options for every run (`-k`,
`--deselect`) go in PYTEST_ADDOPTS: `--tests` takes paths and node ids. Standalone, not a test: one process and the
tests' own single thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPERATORS = {"<": ("<=",), "<=": ("<",), ">": (">=",), ">=": (">",), "==": ("!=",), "!=": ("==",),
             "+": ("-",), "-": ("+",), "*": ("/",), "+=": ("-=",), "-=": ("+=",)}
NAMES = {"True": ("False",), "False": ("True",), "and": ("or",), "or": ("and",), "min": ("max",),
         "max": ("min",), "not": ("",)}


def _int_mutants(text: str) -> tuple[str, ...]:
    try:
        value = int(text, 0)
    except ValueError:  # a float or complex literal: left alone (tolerances, scales)
        return ()
    return {0: ("1",), 1: ("0", "2")}.get(value, (str(value + 1),))


def _function_lines(source: str, names: set[str]) -> list[tuple[str, int, int]]:
    spans = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in names:
            spans.append((node.name, node.lineno, node.end_lineno))
    return spans


def mutants(path: str, functions: set[str] | None = None) -> list[dict]:
    """Every one-token mutant of `path` that compiles, in source order, numbered from 0 over the whole file (so a
    mutant keeps its number whatever `functions` picks)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines(keepends=True)
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        (row, col), (_, end_col) = token.start, token.end
        if token.type == tokenize.OP:
            replacements = OPERATORS.get(token.string, ())
        elif token.type == tokenize.NUMBER:
            replacements = _int_mutants(token.string)
        elif token.type == tokenize.NAME:
            replacements = NAMES.get(token.string, ())
        else:
            replacements = ()
        for new in replacements:
            line = lines[row - 1]
            end = end_col + 1 if new == "" and line[end_col:end_col + 1] == " " else end_col  # "not x" -> "x"
            mutated_line = line[:col] + new + line[end:]
            mutated = "".join(lines[:row - 1]) + mutated_line + "".join(lines[row:])
            try:
                compile(mutated, path, "exec")
            except SyntaxError:
                continue
            found.append(dict(file=path, line=row, col=col, original=token.string, mutant=new,
                              source_line=line.rstrip("\n"), mutated_line=mutated_line.rstrip("\n"),
                              _source=mutated))
    for number, m in enumerate(found):
        m["id"] = f"{path}:{number}"
    if functions:
        spans = _function_lines(source, functions)
        missing = functions - {name for name, _, _ in spans}
        if missing:
            sys.exit(f"mutation_campaign: no function or class {', '.join(sorted(missing))} in {path}")
        found = [m for m in found if any(a <= m["line"] <= b for _, a, b in spans)]
    return found


def diff(m: dict) -> str:
    return "".join(difflib.unified_diff([m["source_line"] + "\n"], [m["mutated_line"] + "\n"],
                                        f"{m['file']}:{m['line']}", "mutant"))


def compiled_file(pycache: str, path: str) -> str:
    """Where Python run with PYTHONPYCACHEPREFIX=pycache keeps the compiled `path` (a mirror of its folder)."""
    source = os.path.join(ROOT, path)
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(pycache, os.path.dirname(source).lstrip(os.sep), f"{stem}.{sys.implementation.cache_tag}.pyc")


def run_tests(tests: list[str], timeout: float, pycache: str) -> tuple[str, float]:
    """Run the tests once, with compiled files kept in `pycache`, the campaign's own folder: torch and the rest are
    compiled once for all runs, and the caller deletes the mutated file's before each run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPYCACHEPREFIX=pycache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # (set where the shell sets it: every run compiled torch anew)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0", *tests]
    started = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - started
    outcome = {0: "survived", 1: "killed"}.get(done.returncode, f"error_rc{done.returncode}")
    return outcome, time.time() - started


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _refuse_dirty(path: str) -> None:
    status = subprocess.run(["git", "status", "--porcelain", "--", path], cwd=ROOT, capture_output=True, text=True)
    if status.stdout.strip():
        sys.exit(f"mutation_campaign: {path} has uncommitted changes; run in a clean checkout of its own")


def campaign(args) -> None:
    chosen = []
    for path in args.files:
        _refuse_dirty(path)
        chosen += mutants(path, set(args.functions.split(",")) if args.functions else None)
    if args.only:
        wanted = set(args.only)
        chosen = [m for m in chosen if m["id"] in wanted]
    if args.sample and args.sample < len(chosen):
        chosen = sorted(random.Random(args.seed).sample(chosen, args.sample), key=lambda m: (m["file"], m["line"]))
    _stop_on_signals()
    pycache = tempfile.TemporaryDirectory(prefix="mutant-pyc-")
    baseline, seconds = run_tests(args.tests, 3600, pycache.name)
    if baseline != "survived":
        sys.exit(f"mutation_campaign: the tests do not pass on the unchanged code ({baseline}); nothing to measure")
    timeout = max(60.0, 3 * seconds)
    print(f"{len(chosen)} mutants; the unchanged code passes in {seconds:.0f} s; timeout {timeout:.0f} s", flush=True)
    commit = _commit()
    deadline = time.time() + args.minutes * 60 if args.minutes else float("inf")
    with open(args.log, "a") as log:
        for m in chosen:
            if time.time() > deadline:
                print("time is up", flush=True)
                break
            target = os.path.join(ROOT, m["file"])
            with open(target, encoding="utf-8") as f:
                original = f.read()
            # The mutant is compiled from its source: a .pyc of the file it replaces, of the same size and written in
            # the same second, would pass Python's mtime check and run in its place.
            with contextlib.suppress(FileNotFoundError):
                os.remove(compiled_file(pycache.name, m["file"]))
            try:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(m["_source"])
                outcome, took = run_tests(args.tests, timeout, pycache.name)
            finally:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(original)
            record = {k: v for k, v in m.items() if not k.startswith("_")}
            record.update(outcome=outcome, seconds=round(took, 1), tests=args.tests, git_commit=commit)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if outcome == "survived":
                print(f"SURVIVED {m['id']} line {m['line']}: {m['source_line'].strip()}  ->  "
                      f"{m['mutated_line'].strip()}", flush=True)


def _stop_on_signals() -> None:
    """Stop as on Ctrl-C (the mutated file is put back, the pytest run is killed) on SIGTERM, SIGHUP and SIGINT, also
    where a background job was started with SIGINT ignored."""

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)


def summarize(log_path: str) -> dict:
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    latest = {r["id"]: r for r in records}  # a mutant run again (after a new test) counts by its last run
    outcomes = Counter(r["outcome"] for r in latest.values())
    per_file = {}
    for r in latest.values():
        per_file.setdefault(r["file"], Counter())[r["outcome"]] += 1
    survivors = [{k: r[k] for k in ("id", "line", "source_line", "mutated_line")}
                 for r in sorted(latest.values(), key=lambda r: (r["file"], r["line"])) if r["outcome"] == "survived"]
    return dict(mutants=len(latest), outcomes=dict(outcomes), per_file={k: dict(v) for k, v in per_file.items()},
                commits=sorted({r.get("git_commit") or "unknown" for r in latest.values()}),
                tests=sorted({t for r in latest.values() for t in r["tests"]}), survivors=survivors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--files", nargs="+", help="source files, relative to the repository")
    parser.add_argument("--functions", help="comma-separated function or class names: mutate only inside them")
    parser.add_argument("--tests", nargs="+", help="pytest arguments: the tests each mutant runs")
    parser.add_argument("--sample", type=int, help="run a seeded random sample of this many mutants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run just these mutants (FILE:NUMBER), in source order")
    parser.add_argument("--minutes", type=float, default=0, help="stop after this long, counted from the end of the unmutated run (0: no limit)")
    parser.add_argument("--log", default="mutation_log.jsonl")
    parser.add_argument("--list", nargs="+", metavar="FILE", help="print the mutants of these files")
    parser.add_argument("--show", metavar="ID", help="print one mutant as a diff")
    parser.add_argument("--summarize", metavar="LOG", help="write the summary of a campaign log (to --out or stdout)")
    parser.add_argument("--out", help="the summary's JSON file")
    args = parser.parse_args()
    if args.summarize:
        if args.out:
            from streaming_llm.eval.results import write_json_atomically

            write_json_atomically(args.out, summarize(args.summarize))
        else:
            print(json.dumps(summarize(args.summarize), indent=2))
    elif args.list:
        for path in args.list:
            for m in mutants(path, set(args.functions.split(",")) if args.functions else None):
                print(f"{m['id']}  line {m['line']}: {m['original']!r} -> {m['mutant']!r}   {m['source_line'].strip()}")
    elif args.show:
        path, _, number = args.show.rpartition(":")
        print(diff(mutants(path)[int(number)]), end="")
    elif args.files and args.tests:
        campaign(args)
    else:
        parser.error("give --files and --tests, or --list, --show or --summarize")


if __name__ == "__main__":
    main()
