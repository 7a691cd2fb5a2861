"""The committed results are what the code reads and writes: every eval result under results/ passes the reader's
checks and is named as its content says, the results of one folder may be compared, and the committed summary table
is what experiments/summarize_results.py makes of the committed results today."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from streaming_llm.eval.results import check_comparable_results, read_result, result_stem

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def eval_results() -> dict[Path, list[Path]]:
    """The eval result JSONs under results/ (a method and an evaluator: not a bench, soak or summary file), by folder."""
    found: dict[Path, list[Path]] = {}
    for path in sorted(RESULTS.rglob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and "method" in record and "evaluator" in record:
            found.setdefault(path.parent, []).append(path)
    return found


def assert_close(made, committed, where: str) -> None:
    """Equal JSON values, numbers to 1e-9 relative (the platform's last digits of a float sum may differ)."""
    if isinstance(committed, dict):
        assert isinstance(made, dict) and made.keys() == committed.keys(), where
        for key in committed:
            assert_close(made[key], committed[key], f"{where}: {key}")
    elif isinstance(committed, list):
        assert isinstance(made, list) and len(made) == len(committed), where
        for index, (a, b) in enumerate(zip(made, committed)):
            assert_close(a, b, f"{where}[{index}]")
    elif isinstance(committed, float):
        assert made == pytest.approx(committed, rel=1e-9), where
    else:
        assert made == committed, where


def test_every_committed_result_reads_and_is_named_as_its_content_says():
    folders = eval_results()
    assert {folder.relative_to(RESULTS).as_posix() for folder in folders} == {"comprehensive", "bos"}
    for paths in folders.values():
        results = []
        for path in paths:
            record, nlls = read_result(path)  # the field checks, and the NLLs one per prediction
            assert nlls is not None and nlls.shape == (record["num_predictions"],), path.name
            stem = result_stem(record["model"], record["data"], record["num_tokens"], record["n_sink"],
                               record["window_size"], record["method"], record["evaluator"], record["dtype"])
            assert path.name == f"{stem}.json"
            results.append((path, record))
        check_comparable_results(results)


def test_the_committed_summary_is_what_the_script_makes_of_the_committed_results(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import summarize_results

    folder = tmp_path / "comprehensive"
    shutil.copytree(RESULTS / "comprehensive", folder, ignore=shutil.ignore_patterns("summary", "chunked", "*.png"))
    assert summarize_results.main(["--num-tokens", "20480", "--output-dir", str(folder)]) == 0
    capsys.readouterr()
    for name in ("table__T20480__s4_w1020.md", "table__T20480__s4_w1020.json"):
        made, committed = (base / "summary" / name for base in (folder, RESULTS / "comprehensive"))
        if name.endswith(".json"):
            assert_close(json.loads(made.read_text()), json.loads(committed.read_text()), name)
        else:
            assert made.read_text(encoding="utf-8") == committed.read_text(encoding="utf-8"), name
