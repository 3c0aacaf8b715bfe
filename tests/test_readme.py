"""The README's API example runs as written (in a temp folder) and improves accuracy."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_example() -> str:
    text = README.read_text()
    section = text[text.index("## The API in ten lines"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_short():
    assert len(_api_example().strip().splitlines()) <= 12


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_api_example(), "README.md", "exec"), scope)
    result = scope["result"]
    assert result.steps == 25
    assert result.metrics_after["accuracy"] > result.metrics_before["accuracy"]
    assert (tmp_path / "outputs/readme-adapter/adapter_model.safetensors").exists()
    assert (tmp_path / "outputs/readme-adapter/adapter_config.json").exists()
