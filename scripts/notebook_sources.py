"""Keep the notebooks in step with their sources: jupytext py:percent files in notebooks/src/.

Usage:  python scripts/notebook_sources.py --check        # exit 1 if a notebook differs from its source
        python scripts/notebook_sources.py --sync [02 ...] # write source changes into the .ipynb files
        python scripts/notebook_sources.py --new notebooks/07_x.ipynb  # write a source for a notebook

Sources and notebooks:
    notebooks/src/NAME.py           -> notebooks/NAME.ipynb
    notebooks/src/workshop/NAME.py  -> notebooks/workshop/solutions/NAME.ipynb (markers removed)
                                       notebooks/workshop/exercises/NAME.ipynb (blanks)

In a workshop source, the code participants write sits between ``### BEGIN SOLUTION: <hint>``
and ``### END SOLUTION``; the exercise notebook gets ``# TODO (1a): <hint>`` and a
``raise NotImplementedError`` instead (the number comes from ``exN_`` in the file name, the
letter counts the cells with blanks). Only cell types and sources are compared: outputs,
metadata and cell ids belong to the .ipynb. ``--sync`` keeps every cell whose source did not
change as it is (outputs, metadata, id), keeps the id and metadata of a cell edited in place
(dropping its now stale outputs), and gives new cells ids derived from their source.
Re-execute a synced notebook afterwards (``scripts/run_notebooks.py``). See notebooks/README.md.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import re
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
SRC_DIR = NB_DIR / "src"
FMT = "py:percent"
Cell = tuple[str, str]  # (cell_type, source)

BEGIN = re.compile(r"^[ \t]*### BEGIN SOLUTION\b", re.M)
END = re.compile(r"^[ \t]*### END SOLUTION\b", re.M)
SOLUTION_RE = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION(?::[ \t]*(?P<hint>[^\n]*))?\n"
                         r"(?P<body>.*?)^[ \t]*### END SOLUTION[ \t]*(?:\n|\Z)", re.M | re.S)
NEW_METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                "language_info": {"name": "python"}}


def read_source(path: Path) -> list[Cell]:
    """Cells of a py:percent source. Usage: ``read_source(SRC_DIR / "01_quickstart.py")``."""
    nb = jupytext.read(path, fmt=FMT)
    return [(c.cell_type, c.source) for c in nb.cells]


def _check_markers(cells: list[Cell], where: str) -> None:
    for i, (kind, src) in enumerate(cells):
        n_begin, n_end, n_blocks = len(BEGIN.findall(src)), len(END.findall(src)), len(SOLUTION_RE.findall(src))
        if (n_begin or n_end) and (kind != "code" or not n_begin == n_end == n_blocks):
            raise ValueError(f"{where}, cell {i}: unbalanced or misplaced '### BEGIN SOLUTION' / "
                             f"'### END SOLUTION' markers ({n_begin} begin, {n_end} end, in a {kind} "
                             "cell); each block needs both lines, in a code cell, BEGIN before END")


def solution_cells(cells: list[Cell]) -> list[Cell]:
    """The solutions notebook: marker lines removed, the code between them kept.
    Usage: ``solution_cells(read_source(SRC_DIR / "workshop" / "ex2_budgets.py"))``."""
    return [(k, SOLUTION_RE.sub(lambda m: m.group("body"), s) if k == "code" else s) for k, s in cells]


def exercise_cells(cells: list[Cell], number: str) -> list[Cell]:
    """The exercise notebook: each solution block becomes ``# TODO (<number><letter>): <hint>``
    plus ``raise NotImplementedError``; the letter counts the code cells with blanks.
    Usage: ``exercise_cells(read_source(SRC_DIR / "workshop" / "ex2_budgets.py"), "2")``."""
    out, n_blank = [], 0
    for kind, src in cells:
        if kind == "code" and SOLUTION_RE.search(src):
            label = f"{number}{'abcdefghijklmnopqrstuvwxyz'[n_blank]}"
            n_blank += 1

            def blank(m: re.Match, label: str = label) -> str:
                ind, hint = m.group("indent"), (m.group("hint") or "your code here").strip()
                return f"{ind}# TODO ({label}): {hint}\n{ind}raise NotImplementedError(\"exercise {label}\")\n"
            src = SOLUTION_RE.sub(blank, src)
        out.append((kind, src))
    return out


def targets(src_dir: Path = SRC_DIR, nb_dir: Path = NB_DIR) -> list[tuple[Path, list[Cell], Path]]:
    """Every (notebook path, expected cells, source path) the sources define; raises ValueError
    for misplaced solution markers. Usage: ``for path, cells, src in targets(): ...``."""
    jobs = []
    for src in sorted(src_dir.rglob("*.py")):
        cells = read_source(src)
        rel = src.relative_to(src_dir)
        _check_markers(cells, str(src))
        if rel.parts[0] == "workshop" and len(rel.parts) == 2:
            m = re.match(r"ex(\d+)", src.stem)
            if not m:
                raise ValueError(f"{src}: workshop sources are named exN_<topic>.py (N numbers the blanks)")
            jobs.append((nb_dir / "workshop" / "solutions" / f"{src.stem}.ipynb", solution_cells(cells), src))
            jobs.append((nb_dir / "workshop" / "exercises" / f"{src.stem}.ipynb", exercise_cells(cells, m.group(1)), src))
        else:
            if any(BEGIN.search(s) for _, s in cells):
                raise ValueError(f"{src}: '### BEGIN SOLUTION' markers only work in notebooks/src/workshop/")
            jobs.append((nb_dir / rel.with_suffix(".ipynb"), cells, src))
    return jobs


def notebook_paths(nb_dir: Path = NB_DIR) -> list[Path]:
    """Committed notebooks: every .ipynb under ``nb_dir`` except checkpoints and outputs/.
    Usage: ``notebook_paths()``."""
    skip = {".ipynb_checkpoints", "outputs"}
    return sorted(p for p in nb_dir.rglob("*.ipynb") if not skip & set(p.relative_to(nb_dir).parts))


def differences(path: Path, cells: list[Cell]) -> str | None:
    """Why the notebook at ``path`` does not match ``cells`` (first difference), or None.
    Usage: ``differences(NB_DIR / "01_quickstart.ipynb", read_source(SRC_DIR / "01_quickstart.py"))``."""
    if not path.exists():
        return "missing"
    have = [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells]
    for i, (a, b) in enumerate(zip(have, cells)):
        if a != b:
            what = "type" if a[0] != b[0] else "source"
            first = next((j for j, (x, y) in enumerate(zip(a[1].splitlines(), b[1].splitlines())) if x != y),
                         min(len(a[1].splitlines()), len(b[1].splitlines())))
            return f"cell {i} ({a[0]}) {what} differs, first at line {first + 1}"
    if len(have) != len(cells):
        return f"{len(have)} cells, the source has {len(cells)}"
    return None


def check(src_dir: Path = SRC_DIR, nb_dir: Path = NB_DIR) -> list[str]:
    """One line per notebook that differs from its source, or that has no source.
    Usage: ``assert check() == []``."""
    def show(p: Path) -> str:
        return str(p.relative_to(nb_dir.parent)) if p.is_relative_to(nb_dir.parent) else str(p)

    jobs = targets(src_dir, nb_dir)
    problems = [f"{show(p)}: {why} (from {show(s)})" for p, cells, s in jobs if (why := differences(p, cells))]
    covered = {p for p, _, _ in jobs}
    problems += [f"{show(p)}: no source in {show(src_dir)}/ (create one with --new {show(p)})"
                 for p in notebook_paths(nb_dir) if p not in covered]
    return problems


def _new_id(stem: str, kind: str, source: str, taken: set[str]) -> str:
    n = 0
    while True:
        cid = hashlib.sha1(f"{stem}\0{kind}\0{source}\0{n}".encode()).hexdigest()[:8]
        if cid not in taken:
            return cid
        n += 1


def sync_notebook(path: Path, cells: list[Cell]) -> tuple[bool, int]:
    """Make the notebook's cells equal ``cells``; return (file changed, code cells now without
    outputs because they are new or edited).
    Usage: ``sync_notebook(NB_DIR / "02_importance.ipynb", read_source(SRC_DIR / "02_importance.py"))``."""
    if path.exists():
        nb = nbformat.read(path, as_version=4)
    else:
        nb = nbformat.v4.new_notebook(metadata=dict(NEW_METADATA))
    old = list(nb.cells)
    if [(c.cell_type, c.source) for c in old] == cells:
        return False, 0
    taken = {c.get("id") for c in old}
    new, n_stale = [], 0
    matcher = difflib.SequenceMatcher(a=[(c.cell_type, c.source) for c in old], b=cells, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            new += old[i1:i2]
            continue
        spare = list(old[i1:i2])  # replaced cells, in order: an edited cell keeps its id
        for kind, src in cells[j1:j2]:
            prev = next((c for c in spare if c.cell_type == kind), None)
            if prev is not None:  # edited in place: same id and metadata
                spare = spare[spare.index(prev) + 1:]
                cell = prev
                cell.source = src
                if kind == "code":
                    cell.outputs, cell.execution_count = [], None
            else:
                cid = _new_id(path.stem, kind, src, taken)
                taken.add(cid)
                make = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell,
                        "raw": nbformat.v4.new_raw_cell}[kind]
                cell = make(src, id=cid)
            n_stale += kind == "code"
            new.append(cell)
    nb.cells = new
    nbformat.validate(nb)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return True, n_stale


def new_source(notebook: Path, src_dir: Path = SRC_DIR, nb_dir: Path = NB_DIR) -> Path:
    """Write the py:percent source of an existing notebook that has none; return its path.
    Usage: ``new_source(NB_DIR / "07_new.ipynb")``."""
    rel = notebook.resolve().relative_to(nb_dir.resolve())
    if rel.parts[0] == "workshop":
        raise ValueError("workshop notebooks come from notebooks/src/workshop/exN_<topic>.py with "
                         "### BEGIN SOLUTION markers: write that file by hand from the solution")
    src = src_dir / rel.with_suffix(".py")
    if src.exists():
        raise FileExistsError(f"{src} exists already; edit it instead")
    nb = nbformat.read(notebook, as_version=4)
    nb.metadata = {"jupytext": {"notebook_metadata_filter": "-all", "cell_metadata_filter": "-all"}}
    for c in nb.cells:
        c.metadata = {}
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(jupytext.writes(nb, fmt=FMT), encoding="utf-8")
    if read_source(src) != [(c.cell_type, c.source) for c in nb.cells]:
        src.unlink()
        raise ValueError(f"{notebook}: py:percent cannot hold its cells exactly (a code cell ending in a "
                         "blank line?); fix the notebook cell and try again")
    return src


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if a notebook differs from its source")
    mode.add_argument("--sync", action="store_true", help="write source changes into the notebooks")
    mode.add_argument("--new", metavar="NOTEBOOK", type=Path, help="write a source for an existing notebook")
    ap.add_argument("only", nargs="*", help="with --sync: only notebooks whose path contains one of these")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileExistsError) as e:  # bad markers, a source that exists already, ...
        print(f"notebook_sources: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.new:
        print(new_source(args.new).relative_to(ROOT))
        return 0
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("Edit the sources in notebooks/src/, then run `python scripts/notebook_sources.py --sync` "
                  "and re-execute the changed notebooks (see notebooks/README.md).", file=sys.stderr)
        return 1 if problems else 0
    for path, cells, _ in targets():
        rel = path.relative_to(ROOT)
        if args.only and not any(a in str(rel) for a in args.only):
            continue
        changed, n_stale = sync_notebook(path, cells)
        if changed and n_stale and "exercises" not in rel.parts:
            print(f"{rel}: updated; {n_stale} code cell(s) new or edited, without outputs: re-execute it "
                  f"(ROWSFT_FAST=0 .venv/bin/python scripts/run_notebooks.py {rel})")
        elif changed:
            print(f"{rel}: updated (markdown or exercise cells only: nothing to re-execute)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
