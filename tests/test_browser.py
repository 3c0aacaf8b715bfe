"""The explorers in a real browser: JupyterLab + headless Debian chromium via Playwright.

One JupyterLab (temp folder, own config/data/runtime dirs, a token, fast mode) serves two
notebooks: a small one written here (nothing is committed under tests/, which nbval also
collects) and a copy of the tutorial notebooks/01_quickstart.ipynb without its outputs.
- explorers: move the budget slider with the keyboard and check the trainable-parameter
  readout grew; save, reload the page and check every explorer still shows its charts (or,
  where a chart could not reconnect, the visible "re-run this cell" hint, never empty axes).
- 01_quickstart: run all cells, press Launch in the tutorial's launcher cell, see the loss
  curve receive points while Launch is disabled, press Stop, read "stopped by you at step N".
Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
QUICKSTART = ROOT / "notebooks" / "01_quickstart.ipynb"
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
                 if os.access(p, os.X_OK)), None)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
CELLS = [
    """\
import torch
from datasets import Dataset
from rowsft_nb import testing
from rowsft_nb.targets import find_targets, linear_shape
from rowsft_nb.widgets import BudgetExplorer, ImportanceExplorer, TrainingLauncher

torch.manual_seed(0)
model = testing.tiny_llama()
names = find_targets(model, "all-linear")
shapes = {n: linear_shape(model.get_submodule(n)) for n in names}
report = testing.synthetic_report(shapes, seed=0,
                                  model_parameters=sum(p.numel() for p in model.parameters()))
ids = torch.randint(0, testing.VOCAB, (64, 16), generator=torch.Generator().manual_seed(0))
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
print("ready")""",
    "budget = BudgetExplorer(report, percent=10, seq_len=16)\nbudget",
    "ImportanceExplorer(report, plan=budget.plan)",
    """\
launcher = TrainingLauncher(model, budget.plan, dataset, steps=100000, batch_size=4,
                            lr=1e-3, device="cpu", logging_steps=1)
launcher""",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
              "source": src} for src in CELLS]
    nb = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name":
                                                      "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1))


def _copy_without_outputs(src: Path, dst: Path) -> None:
    nb = json.loads(src.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"].pop("widgets", None)
    dst.write_text(json.dumps(nb, indent=1))


@pytest.fixture(scope="module")
def jupyter_lab(tmp_path_factory):
    """(base_url, token, work dir) of a JupyterLab serving a temp folder, isolated from the
    user's config; kernels run the notebooks in fast mode."""
    tmp_path = tmp_path_factory.mktemp("lab")
    work = tmp_path / "work"
    work.mkdir()
    _write_notebook(work / "explorers.ipynb")
    _copy_without_outputs(QUICKSTART, work / QUICKSTART.name)
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        (tmp_path / sub).mkdir()
        env[var] = str(tmp_path / sub)
    # No news/update toasts over the widgets.
    notify = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    notify.mkdir(parents=True)
    (notify / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["ROWSFT_FAST"] = "1"                  # the tutorial's CI mode: small data, few steps
    env["ROWSFT_STATIC_FIGURES"] = "0"        # no PNG snapshots (a Chromium in the kernel)
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [str(Path(sys.executable).with_name("jupyter-lab")), "--no-browser",
           "--ip", "127.0.0.1", "--port", str(port), f"--ServerApp.token={token}",
           f"--ServerApp.root_dir={work}", "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyter.log", "wb")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError("jupyter lab exited:\n" +
                                   (tmp_path / "jupyter.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("jupyter lab did not answer /api/status within 60 s")
                time.sleep(0.5)
        yield base, token, work
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "jupyter.log", ARTIFACTS / "browser-jupyter.log")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium, or "
                    "`make browser`): the real-browser test cannot run here")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))


def _open_and_run_all(browser, base: str, token: str, notebook: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.console_errors = []                     # shown when a check fails
    page.on("console", lambda m: page.console_errors.append(m.text[:300])
            if m.type == "error" or "anywidget" in m.text else None)
    page.goto(f"{base}/lab/tree/{notebook}?token={token}&reset")
    # Run All before the kernel is connected does nothing: wait for "| Idle".
    page.wait_for_function("document.body.innerText.includes('| Idle')", timeout=120_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    return page


TRAINING_POINTS_JS = """() => {
  for (const el of document.querySelectorAll('.js-plotly-plot')) {
    const t = el.layout && el.layout.title;
    const text = t && (typeof t === 'string' ? t : t.text);
    if (text === 'training' && el.data && el.data[0] && el.data[0].x)
      return el.data[0].x.length;
  }
  return -1;
}"""

# Per explorer on the page: how many figure boxes, how many hold a drawn plotly chart with
# data, whether the "re-run this cell" hint is visible.
EXPLORERS_JS = """() => Array.from(document.querySelectorAll('.rowsft-explorer')).map(ex => {
  const figs = Array.from(ex.querySelectorAll('.rowsft-figure'));
  const drawn = figs.filter(f => {
    const el = f.querySelector('.js-plotly-plot');
    return el && el.querySelector('.main-svg') && el.data;
  }).length;
  const hint = ex.querySelector('.rowsft-reload-hint');
  const cs = hint && getComputedStyle(hint);
  const kind = ['rowsft-importance', 'rowsft-budget', 'rowsft-launcher']
    .find(c => ex.classList.contains(c)) || '?';
  return {kind, figs: figs.length, drawn,
          hint: !!(cs && cs.display !== 'none' && cs.visibility === 'visible')};
})"""

# What the training chart shows in the page: trace names, eval labels, the right axis range.
TRAINING_CHART_JS = """() => {
  for (const el of document.querySelectorAll('.rowsft-launcher .js-plotly-plot')) {
    const ax = el._fullLayout && el._fullLayout.yaxis2;
    const ticks = Array.from(el.querySelectorAll('.y2tick text')).map(t => t.textContent);
    const legend = Array.from(el.querySelectorAll('.legend .legendtext'))
      .map(t => t.textContent);
    return {names: el.data.map(t => t.name), points: el.data.map(t => (t.x || []).length),
            range: ax ? ax.range : null, ticks, legend};
  }
  return null;
}"""

HEATMAP_CELLS_JS = """() => {
  const el = document.querySelector('.rowsft-importance .js-plotly-plot');
  if (!el || !el.data || !el.data[0] || !el.data[0].z) return 0;
  return el.data[0].z.flat().filter(v => v !== null).length;
}"""


def _saved_widget_outputs(base: str, token: str, notebook: str) -> int:
    """Widget outputs in the saved notebook file (0 while it is being written)."""
    try:
        req = urllib.request.urlopen(f"{base}/api/contents/{notebook}?token={token}", timeout=10)
        nb = json.loads(req.read())["content"]
    except (OSError, ValueError):               # HTTP 400 "Unreadable Notebook" mid-write
        return 0
    return sum("application/vnd.jupyter.widget-view+json" in out.get("data", {})
               for cell in nb["cells"] for out in cell.get("outputs", []))


def test_explorers_survive_a_page_reload(jupyter_lab, browser):
    base, token, _ = jupyter_lab
    page = _open_and_run_all(browser, base, token, "explorers.ipynb")
    try:
        trainable = page.locator(".rowsft-trainable").first
        trainable.wait_for(state="visible", timeout=120_000)
        page.wait_for_function(
            "document.querySelector('.rowsft-trainable') && "
            "document.querySelector('.rowsft-trainable').innerText.includes('trainable')")
        before = trainable.inner_text()
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg')"
                               ".length >= 4", timeout=120_000)
        trainable.scroll_into_view_if_needed()
        _shot(page, "1-budget")

        # Budget slider (first slider of the budget explorer, log scale): keyboard on its handle.
        handle = page.locator(".rowsft-budget .widget-slider .noUi-handle").first
        handle.focus()
        for _ in range(5):
            handle.press("ArrowRight")
        page.wait_for_function(
            "([sel, old]) => document.querySelector(sel).innerText !== old",
            arg=[".rowsft-trainable", before], timeout=30_000)
        after = trainable.inner_text()
        n_before = int(before.split(":")[1].split("(")[0].replace(",", ""))
        n_after = int(after.split(":")[1].split("(")[0].replace(",", ""))
        assert n_after > n_before, (before, after)   # moved right = bigger budget
        _shot(page, "2-budget-moved")
        page.locator(".rowsft-importance").first.scroll_into_view_if_needed()
        page.wait_for_function(f"({HEATMAP_CELLS_JS})() > 0", timeout=60_000)
        _shot(page, "3-importance")

        # Save (a refresh re-reads the notebook file), then reload the page: the kernel keeps
        # running and JupyterLab restores the widgets from it.
        page.keyboard.press("Control+s")
        deadline = time.time() + 30
        while _saved_widget_outputs(base, token, "explorers.ipynb") < 3:
            assert time.time() < deadline, "the notebook was not saved with its widget outputs"
            time.sleep(0.5)
        page.console_errors.clear()
        page.reload()
        try:
            page.wait_for_function("document.body.innerText.includes('| Idle')",
                                   timeout=120_000)
            page.wait_for_function("document.querySelectorAll('.rowsft-explorer').length >= 3",
                                   timeout=120_000)
            for i in range(3):
                page.locator(".rowsft-explorer").nth(i).scroll_into_view_if_needed()
            # every explorer either draws all its charts again or shows the re-run hint
            page.wait_for_function(
                f"({EXPLORERS_JS})().every(e => e.drawn === e.figs || e.hint)", timeout=120_000)
        except Exception as err:
            _shot(page, "4-reload-failed")
            raise AssertionError(f"after the reload: {page.evaluate(EXPLORERS_JS)}; console: "
                                 f"{page.console_errors[-15:]}") from err
        states = page.evaluate(EXPLORERS_JS)
        assert sorted(e["kind"] for e in states) == ["rowsft-budget", "rowsft-importance",
                                                      "rowsft-launcher"], states
        print("after reload:", states)
        importance = next(e for e in states if e["kind"] == "rowsft-importance")
        if importance["drawn"] == importance["figs"]:
            assert page.evaluate(HEATMAP_CELLS_JS) > 0      # the heatmap has its data back
        page.locator(".rowsft-importance").first.scroll_into_view_if_needed()
        _shot(page, "4-reloaded")
    finally:
        page.close()


def test_launch_and_stop_in_quickstart_notebook(jupyter_lab, browser):
    """The tutorial's own launcher cell (fast mode): Launch, points arrive, Stop."""
    base, token, _ = jupyter_lab
    page = _open_and_run_all(browser, base, token, QUICKSTART.name)
    try:
        launch = page.locator("button.rowsft-launch")
        launch.wait_for(state="attached", timeout=600_000)     # the last code cell ran
        launch.scroll_into_view_if_needed()
        page.wait_for_function("!document.querySelector('button.rowsft-launch').disabled",
                               timeout=60_000)
        launch.click()
        page.wait_for_function("document.querySelector('button.rowsft-launch').disabled")
        page.wait_for_function(f"({TRAINING_POINTS_JS})() >= 3", timeout=180_000)
        assert page.evaluate(TRAINING_POINTS_JS) >= 3
        assert launch.is_disabled()                  # no second run while one is going
        page.locator(".rowsft-status").first.scroll_into_view_if_needed()
        _shot(page, "5-quickstart-training")

        page.locator("button.rowsft-stop").click()
        page.wait_for_function(
            "document.querySelector('.rowsft-status').innerText.startsWith('stopped')",
            timeout=120_000)
        status = page.locator(".rowsft-status").inner_text()
        steps = int(status.split("step ")[1].split("/")[0])
        assert 0 < steps < 30, status                # stopped before the planned 30 steps
        page.wait_for_function(
            "document.querySelector('.rowsft-summary').innerText.includes('steps in')")
        summary = page.locator(".rowsft-summary").inner_text()
        assert f"stopped by you at step {steps}" in summary, summary
        assert not launch.is_disabled()              # may launch again
        page.wait_for_function(f"({TRAINING_CHART_JS})().points[3] === 1")
        chart = page.evaluate(TRAINING_CHART_JS)
        # drawn legend: loss, the eval line, one "before" and one "after" mark
        assert chart["legend"] == ["train loss", "eval accuracy", "before training",
                                   "after training"], chart
        assert chart["points"][2:] == [1, 1], chart
        assert chart["range"] == [0, 1], chart       # accuracy axis fixed, not autoranged
        assert chart["ticks"] and set(chart["ticks"]) <= {"0", "0.2", "0.4", "0.6", "0.8", "1"}, \
            chart                                    # the eval axis's own ticks
        page.locator(".rowsft-launcher .js-plotly-plot").first.scroll_into_view_if_needed()
        _shot(page, "6-quickstart-stopped")
    finally:
        page.close()
