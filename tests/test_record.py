"""The results of record: the docs' results tables are what results/ gives (record.py, report.py --docs)."""
import os
import shutil
import subprocess
import sys

import pytest

import record
import report
from utils import UserError

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_results_table_of_the_docs_is_what_results_gives():
    """Fails when a number of a generated block of README.md or docs/results.md differs from results/:
    run python3 report.py --docs and commit the docs with the results that moved them."""
    assert record.update_docs(check=True) == []


def test_every_block_is_in_the_docs_once():
    names = []
    for rel in record.DOCS:
        with open(os.path.join(HERE, rel), encoding="utf-8") as f:
            names += [m.group("name") for m in record.BLOCK.finditer(f.read())]
    assert sorted(names) == sorted(record.BLOCKS)


def test_a_number_typed_into_a_block_fails_the_check(tmp_path):
    for rel in record.DOCS:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(HERE, rel), tmp_path / rel)
    page = tmp_path / "docs" / "results.md"
    text = page.read_text(encoding="utf-8")
    start = text.index("<!-- record:regime1_fine_last -->")
    cell = text.index("| oversampling | ", start)
    edited = text[:cell] + text[cell:].replace("0.", "0.9", 1)         # one number, inside one block
    page.write_text(edited, encoding="utf-8")
    assert record.update_docs(check=True, root=str(tmp_path)) == [("docs/results.md", ["regime1_fine_last"])]
    assert page.read_text(encoding="utf-8") == edited                   # --check changes nothing
    record.update_docs(root=str(tmp_path))
    assert page.read_text(encoding="utf-8") == text
    assert (tmp_path / record.FIGURE).stat().st_size > 10_000          # the headline figure, drawn


def test_a_block_of_no_known_name_is_an_error():
    with pytest.raises(UserError, match="record:nosuch .*known: headline"):
        record.render("<!-- record:nosuch -->\nx\n<!-- /record:nosuch -->\n", "README.md")


def test_the_tables_are_report_pys(tmp_path):
    """The demo's block is report.py's table1.md of the same results, and report.py reads results/ as a
    save root (validation.py's file over the whole root)."""
    out = tmp_path / "fine"
    report.main(["--save_root", os.path.join(record.RESULTS, "demo", "fine"), "--paper", "fine", "--out", str(out)])
    assert (out / "table1.md").read_text(encoding="utf-8") == record.BLOCKS["demo_fine"]()
    assert (out / "comparison.md").is_file()


def test_report_docs_check_from_the_command_line():
    r = subprocess.run([sys.executable, os.path.join(HERE, "report.py"), "--docs", "--check"], capture_output=True,
                       text=True, cwd=HERE)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, os.path.join(HERE, "report.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 2 and "--check goes with --docs" in r.stderr and "Traceback" not in r.stderr


def test_every_result_names_its_commit_command_and_machine():
    for result in ("demo", "study_regime1", "study_regime2"):
        p = record.provenance(result)
        assert len(p["commit"]) >= 7 and "python3" in p["command"] and p["machine"]["cpu_flags"]
        assert p["torch"] and p["wall_time_s"] > 0
