"""The `rowsft-nb` command line: argument routing, doctor, score."""
import pytest
import torch

from rowsft_nb import cli
from rowsft_nb.scoring import ImportanceReport

# `rowsft-nb bench` routing: tests/test_bench.py (test_cli_bench_*)


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["doctor", "--bogus"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_doctor_via_cli_exits_zero(capsys):
    assert cli.main(["doctor"]) == 0
    assert "all good" in capsys.readouterr().out


def test_score_writes_a_report_equal_to_direct_row_norms(tmp_path, capsys):
    out = tmp_path / "l2.safetensors"
    assert cli.main(["score", "--task", "sms_spam", "--metric", "l2", "--n-samples", "8",
                     "--max-length", "16", "--no-progress", "--out", str(out)]) == 0
    report = ImportanceReport.load(out)
    from rowsft_nb.assets import load_encoder
    model, _ = load_encoder()
    w = dict(model.named_modules())["bert.encoder.layer.0.attention.self.query"].weight
    torch.testing.assert_close(report.scores["bert.encoder.layer.0.attention.self.query"],
                               w.detach().square().sum(1))   # l2 = sum_j w_ij^2 (authors')
    assert "classifier" not in report.scores
