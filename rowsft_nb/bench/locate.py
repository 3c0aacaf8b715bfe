"""Where ``rowsft-nb bench`` finds the benchmark runner: ``benchmarks/bench_all.py`` of a
source checkout of rowsft-nb (the current directory or one above it, else the checkout an
editable install points to). An installed wheel has no runner; :data:`RUNNER_MISSING` says
how to get it.

Usage::

    path = find_runner()              # Path or None
    runner = load_runner(path)        # the module; runner.main(argv) runs the benchmarks
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["RUNNER", "RUNNER_MISSING", "find_runner", "load_runner"]

RUNNER = Path("benchmarks") / "bench_all.py"
RUNNER_MISSING = (
    "the benchmark runner is not part of the installed package: it lives in the rowsft-nb "
    "source repository (benchmarks/bench_all.py). Get the source (git clone of the "
    "rowsft-nb repository, or unpack the sdist), install it with "
    "pip install -e '.[bench]' and run `rowsft-nb bench` from inside that folder "
    "(or: python benchmarks/bench_all.py --help).")


def _is_checkout(root: Path) -> bool:
    """A rowsft-nb source tree: the runner, the package sources and a pyproject naming it."""
    project = root / "pyproject.toml"
    if not ((root / RUNNER).is_file() and (root / "rowsft_nb").is_dir() and project.is_file()):
        return False
    try:
        return 'name = "rowsft-nb"' in project.read_text(errors="replace")
    except OSError:
        return False


def find_runner(start: str | os.PathLike | None = None) -> Path | None:
    """``benchmarks/bench_all.py`` of the rowsft-nb checkout containing ``start`` (default:
    the current directory), else of the checkout this package was installed from in
    editable mode; None when there is none (an installed wheel).

    >>> find_runner()          # PosixPath('/src/rowsft-nb/benchmarks/bench_all.py') or None
    """
    here = Path(start if start is not None else os.getcwd()).resolve()
    for root in (here, *here.parents):
        if _is_checkout(root):
            return root / RUNNER
    package_root = Path(__file__).resolve().parents[2]
    if _is_checkout(package_root):
        return package_root / RUNNER
    return None


def load_runner(path: str | os.PathLike) -> ModuleType:
    """Import the runner script at ``path`` as a module (its folder goes on ``sys.path``
    so it can import its sibling scripts). ``>>> load_runner(find_runner()).main(["-h"])``"""
    path = Path(path).resolve()
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("rowsft_bench_runner", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the benchmark runner {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module
