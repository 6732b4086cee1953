"""The quickstart writes its report, figures and metrics, and prints the comparison table."""

from __future__ import annotations

import json

from arrcoc_sam.cli import main as cli_main


def test_tiny_quickstart_writes_report_figures_and_prints_the_table(tmp_path, capsys):
    assert cli_main(["quickstart", "--tiny", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| held-out (unseen combinations) | untrained | AdamW | SAM |" in printed and str(tmp_path / "report.md") in printed
    report = (tmp_path / "report.md").read_text()
    assert "training_curves.png" in report and "heldout_examples.png" in report
    for figure in ("training_curves.png", "heldout_examples.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "metrics.json").read_text())["heldout"]
    for run in ("untrained", "adamw", "sam"):
        assert {"heldout_mse", "heldout_spearman", "heldout_top_k_recall", "heldout_ndcg"} <= set(metrics[run])
        assert 0 <= metrics[run]["heldout_top_k_recall"] <= 1
    assert metrics["adamw"] != metrics["sam"], "SAM and AdamW runs must differ"
