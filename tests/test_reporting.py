"""`python -m fused_resnet report`: markdown table, PNG plot, the README's generated section, and the fused
backends side by side (what decides auto's choice per shape)."""

import json

from fused_resnet.cli import backend_comparison, main


def _row(case, provider, ms, eager_ms):
    return {"case": case, "mode": "eval", "dtype": "bfloat16", "format": "nhwc", "provider": provider,
            "median_ms": ms, "p20_ms": ms * 0.99, "p80_ms": ms * 1.01, "speedup_vs_eager": eager_ms / ms,
            "floor_ms": ms / 2, "floor_fraction": 0.5, "device": "test device", "torch": "t", "triton": "tr",
            "cuda": "c", "date": "2026-11-25"}


ROWS = [_row("a", "eager", 2.0, 2.0), _row("a", "fused-triton", 1.0, 2.0), _row("a", "fused-cuda", 1.08, 2.0),
        _row("b", "eager", 4.0, 4.0), _row("b", "fused-triton", 1.0, 4.0), _row("b", "fused-cuda", 1.25, 4.0),
        _row("c", "eager", 1.0, 1.0), _row("c", "fused-cpp", 0.9, 1.0)]


def test_backend_comparison_names_the_fastest_and_the_ratio():
    table = backend_comparison(ROWS).splitlines()
    assert len(table) == 4  # header, rule, cases a and b (c has one fused provider)
    assert "| a |" in table[2] and "fused-triton" in table[2] and "1.08 (within 10%)" in table[2]
    assert "| b |" in table[3] and "1.25 (outside 10%)" in table[3]
    assert backend_comparison([r for r in ROWS if r["case"] == "c"]) == ""


def test_report_writes_table_plot_and_readme_section(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold text\n<!-- results:end -->\nrest\n")
    assert main(["report", str(results), "--readme", str(readme)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "Measured on test device" in md and "| b | eval | bfloat16 | nhwc | fused-cuda |" in md
    assert "Fused backends side by side" in md
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old text" not in text
    assert "do not edit by hand" in text and "results.png" in text and "1.25 (outside 10%)" in text
