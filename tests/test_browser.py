"""The explorers in a real browser: JupyterLab + headless Debian chromium via Playwright.

The test writes a notebook into a temp folder (nothing is committed under tests/, which
nbval also collects), starts JupyterLab on a free localhost port with its own config/data/
runtime dirs and a token, runs all cells, moves the budget slider with the keyboard and
checks the trainable-parameter readout changed, launches training on a tiny LLaMA, sees the
loss curve receive points, stops it, and saves screenshots under test-artifacts/.
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


@pytest.fixture
def jupyter_lab(tmp_path):
    """(base_url, token) of a JupyterLab serving tmp_path, isolated from the user's config."""
    work = tmp_path / "work"
    work.mkdir()
    _write_notebook(work / "explorers.ipynb")
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
        yield base, token
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "jupyter.log", ARTIFACTS / "browser-jupyter.log")


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))


TRAINING_POINTS_JS = """() => {
  for (const el of document.querySelectorAll('.js-plotly-plot')) {
    const t = el.layout && el.layout.title;
    const text = t && (typeof t === 'string' ? t : t.text);
    if (text === 'training' && el.data && el.data[0] && el.data[0].x)
      return el.data[0].x.length;
  }
  return -1;
}"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install "
                    "chromium, or `make browser`): the real-browser test cannot run here")
def test_explorers_in_jupyterlab(jupyter_lab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    base, token = jupyter_lab
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/explorers.ipynb?token={token}&reset")
            # Run All before the kernel is connected does nothing: wait for "| Idle".
            page.wait_for_function("document.body.innerText.includes('| Idle')", timeout=60_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            trainable = page.locator(".rowsft-trainable").first
            trainable.wait_for(state="visible", timeout=60_000)
            page.wait_for_function(
                "document.querySelector('.rowsft-trainable') && "
                "document.querySelector('.rowsft-trainable').innerText.includes('trainable')")
            before = trainable.inner_text()
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg')"
                                   ".length >= 4")
            trainable.scroll_into_view_if_needed()
            _shot(page, "1-budget")

            # Budget slider (first slider of the budget explorer): keyboard on its handle.
            handle = page.locator(".widget-slider .noUi-handle").first
            handle.focus()
            for _ in range(5):
                handle.press("ArrowRight")
            page.wait_for_function(
                "([sel, old]) => document.querySelector(sel).innerText !== old",
                arg=[".rowsft-trainable", before], timeout=15_000)
            after = trainable.inner_text()
            assert after != before
            n_before = int(before.split(":")[1].split("(")[0].replace(",", ""))
            n_after = int(after.split(":")[1].split("(")[0].replace(",", ""))
            assert n_after > n_before, (before, after)   # moved right = bigger budget
            _shot(page, "2-budget-moved")
            page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
            _shot(page, "2b-budget-charts")

            page.locator(".js-plotly-plot").nth(2).scroll_into_view_if_needed()
            _shot(page, "3-importance")

            launch = page.locator("button.rowsft-launch")
            launch.scroll_into_view_if_needed()
            page.wait_for_function("!document.querySelector('button.rowsft-launch').disabled")
            launch.click()
            page.wait_for_function(f"({TRAINING_POINTS_JS})() >= 3", timeout=60_000)
            points = page.evaluate(TRAINING_POINTS_JS)
            assert points >= 3
            page.locator(".rowsft-status").first.scroll_into_view_if_needed()
            _shot(page, "4-training")

            page.locator("button.rowsft-stop").click()
            page.wait_for_function(
                "document.querySelector('.rowsft-status').innerText.startsWith('stopped')",
                timeout=60_000)
            status = page.locator(".rowsft-status").inner_text()
            assert status.startswith("stopped")
            steps = int(status.split("step ")[1].split("/")[0])
            assert 0 < steps < 100_000
            page.wait_for_function(
                "document.querySelector('.rowsft-summary').innerText.includes('steps in')")
            assert "stopped by the observer" in page.locator(".rowsft-summary").inner_text()
            _shot(page, "5-stopped")
        finally:
            browser.close()
