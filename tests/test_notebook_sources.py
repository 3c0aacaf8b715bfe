"""Committed notebooks equal their py:percent sources (notebooks/src/), drift is caught, and
--sync keeps what it should (scripts/notebook_sources.py)."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "notebook_sources.py"
_spec = importlib.util.spec_from_file_location("notebook_sources", SCRIPT)
ns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ns)


def test_committed_notebooks_match_their_sources():
    # what `make test` relies on: run as a user would, on the real tree
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    covered = {p for p, _, _ in ns.targets()}
    assert covered == set(ns.notebook_paths())  # every notebook has a source, every source a notebook
    assert len(covered) >= 12  # not vacuous: the 6 tutorials + 3 solutions + 3 exercises


def test_no_control_characters_in_sources():
    # issue 13.8: "\approx" in a non-raw string became BEL + "pprox"
    for src in ns.SRC_DIR.rglob("*.py"):
        bad = [c for c in src.read_text(encoding="utf-8") if ord(c) < 32 and c not in "\n\t"]
        assert not bad, f"{src}: {bad}"
    nb = nbformat.read(ns.NB_DIR / "02_importance.ipynb", as_version=4)
    assert any(r"\ln 2 \approx 0.69" in c.source for c in nb.cells)


def test_exercise_and_solution_derivation():
    cells = [("markdown", "# Ex\n### not a marker here"),
             ("code", "x = 1\n### BEGIN SOLUTION: set y to twice x\ny = 2 * x\n### END SOLUTION\nprint(y)"),
             ("code", "print(x)"),
             ("code", "def f():\n    ### BEGIN SOLUTION\n    return 3\n    ### END SOLUTION")]
    assert ns.solution_cells(cells) == [cells[0], ("code", "x = 1\ny = 2 * x\nprint(y)"), cells[2],
                                        ("code", "def f():\n    return 3\n")]
    assert ns.exercise_cells(cells, "4") == [
        cells[0],
        ("code", 'x = 1\n# TODO (4a): set y to twice x\nraise NotImplementedError("exercise 4a")\nprint(y)'),
        cells[2],
        ("code", 'def f():\n    # TODO (4b): your code here\n    raise NotImplementedError("exercise 4b")\n')]
    with pytest.raises(ValueError, match="unbalanced or misplaced"):
        ns._check_markers([("code", "### BEGIN SOLUTION: x\ny = 1\n")], "ex9.py")


def test_committed_exercises_keep_their_hints():
    # independent of the derivation code: the blanks the participants see, read from the .ipynb
    todos = []
    for path in sorted((ns.NB_DIR / "workshop" / "exercises").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            todos += re.findall(r"# TODO \((\d[a-z])\): (.+)\n[ \t]*raise NotImplementedError\(\"exercise \1\"\)",
                                cell.source)
    labels = [label for label, _ in todos]
    assert labels == ["1a", "1b", "1c", "2a", "2b", "2c", "2d", "3a", "3b"]
    assert ("2a", "sum RANK * (d_in + d_out) over shapes.values()") in todos


def _copy_tree(tmp_path: Path, names: list[str]) -> tuple[Path, Path]:
    """notebooks/src/<name>.py and the notebooks it defines, copied under tmp_path."""
    nb_dir, src_dir = tmp_path / "notebooks", tmp_path / "notebooks" / "src"
    for name in names:
        src = ns.SRC_DIR / f"{name}.py"
        (src_dir / src.relative_to(ns.SRC_DIR)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, src_dir / src.relative_to(ns.SRC_DIR))
    for path, _, src in ns.targets():
        if src.relative_to(ns.SRC_DIR).with_suffix("").as_posix() in names:
            dest = nb_dir / path.relative_to(ns.NB_DIR)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
    return src_dir, nb_dir


def test_drift_is_detected(tmp_path):
    src_dir, nb_dir = _copy_tree(tmp_path, ["06_deploy", "workshop/ex2_budgets"])
    assert ns.check(src_dir, nb_dir) == []
    src = src_dir / "06_deploy.py"
    src.write_text(src.read_text().replace("def size(folder", "def size_of(folder", 1))
    ex = nb_dir / "workshop" / "exercises" / "ex2_budgets.ipynb"
    nb = nbformat.read(ex, as_version=4)
    nb.cells[4].source += "\n# a hand edit"
    nbformat.write(nb, ex)
    shutil.copy(nb_dir / "06_deploy.ipynb", nb_dir / "07_orphan.ipynb")
    problems = ns.check(src_dir, nb_dir)
    assert len(problems) == 3, problems
    assert re.match(r"notebooks/06_deploy\.ipynb: cell \d+ \(code\) source differs", problems[0])
    assert problems[1].startswith("notebooks/workshop/exercises/ex2_budgets.ipynb: cell 4 (code) source differs")
    assert problems[2].startswith("notebooks/07_orphan.ipynb: no source")


def test_sync_keeps_unchanged_cells_and_is_idempotent(tmp_path):
    src_dir, nb_dir = _copy_tree(tmp_path, ["06_deploy"])
    path = nb_dir / "06_deploy.ipynb"
    before = nbformat.read(path, as_version=4)
    raw_before = path.read_bytes()
    assert ns.sync_notebook(path, ns.targets(src_dir, nb_dir)[0][1]) == (False, 0)
    assert path.read_bytes() == raw_before  # a no-op leaves the file byte-identical

    cells = ns.read_source(src_dir / "06_deploy.py")
    edited = next(i for i, (k, _) in enumerate(cells) if k == "code" and i > 0 and before.cells[i].outputs)
    cells[edited] = ("code", cells[edited][1] + "\nprint('edited')")
    cells.insert(2, ("markdown", "A new note."))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) if k == "code" else
                                         nbformat.v4.new_markdown_cell(s) for k, s in cells])
    nb.metadata = {"jupytext": {"notebook_metadata_filter": "-all", "cell_metadata_filter": "-all"}}
    (src_dir / "06_deploy.py").write_text(ns.jupytext.writes(nb, fmt=ns.FMT))

    assert ns.check(src_dir, nb_dir) != []
    assert ns.sync_notebook(path, ns.read_source(src_dir / "06_deploy.py")) == (True, 1)
    after = nbformat.read(path, as_version=4)
    assert ns.check(src_dir, nb_dir) == []
    assert len(after.cells) == len(before.cells) + 1
    assert after.metadata == before.metadata
    new_cell = after.cells[2]
    assert new_cell.cell_type == "markdown" and re.fullmatch(r"[0-9a-f]{8}", new_cell.id)
    assert new_cell.id not in {c.id for c in before.cells}
    for i, old in enumerate(before.cells):
        now = after.cells[i if i < 2 else i + 1]
        if i == edited:  # same id, stale outputs dropped
            assert now.id == old.id and now.outputs == [] and now.execution_count is None
        else:  # outputs, metadata, id, execution count: all as committed
            assert json.dumps(now, sort_keys=True) == json.dumps(old, sort_keys=True)
    raw_after = path.read_bytes()
    assert ns.sync_notebook(path, ns.read_source(src_dir / "06_deploy.py")) == (False, 0)
    assert path.read_bytes() == raw_after

    # deterministic ids: the same edit on a fresh copy gives the same new id
    path.write_bytes(raw_before)
    ns.sync_notebook(path, ns.read_source(src_dir / "06_deploy.py"))
    assert nbformat.read(path, as_version=4).cells[2].id == new_cell.id
