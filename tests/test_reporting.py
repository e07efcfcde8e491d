"""`python -m fused_resnet report`: markdown table, PNG plot, the README's generated section, and the fused
backends side by side (what decides auto's choice per shape)."""

import json

from fused_resnet.cli import backend_comparison, main, speedup_matrix


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
    faster = [_row("d", "fused-triton", 2.0, 2.0), _row("d", "fused-cuda", 1.0, 2.0)]
    assert "| d |" in backend_comparison(faster).splitlines()[2] and "0.50 (faster)" in backend_comparison(faster)


def test_speedup_matrix_marks_a_wrong_result():
    rows = [dict(r) for r in ROWS if r["case"] == "c"]
    rows[1]["check"] = "output: error 1e-1 > bound 1e-5"
    lines = speedup_matrix(rows).splitlines()
    assert lines[0] == "| case | mode | dtype | format | eager ms | fused-cpp |"
    assert lines[2] == "| c | eval | bfloat16 | nhwc | 1.000 | 1.11x (wrong) |"


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
    assert "do not edit by hand" in text and "results.png" in text and "(results.md)" in text
    # The README gets the compact view: a line per case, eager's time and each provider's speedup.
    assert "| a | eval | bfloat16 | nhwc | 2.000 | 2.00x | 1.85x |  |" in text
    assert "| c | eval | bfloat16 | nhwc | 1.000 |  |  | 1.11x |" in text


def test_auto_choices_take_a_fused_backend_only_when_it_beats_eager():
    from fused_resnet.cli import auto_choices
    rows = [dict(r, mode=m, device="NVIDIA H100", case=c) for r in ROWS for m in ("eval", "train-fwdbwd")
            for c in ("id-64to64-56x56-b32",) if r["case"] == "a"]
    rows += [dict(_row("1x1s2-64to128-56x56-b32", p, ms, 1.0), device="NVIDIA H100")
             for p, ms in (("eager", 1.0), ("fused-triton", 0.99), ("compile", 0.5))]
    rows += [_row("resnet18-224-b32", "eager", 1.0, 1.0), _row("resnet18-224-b32", "fused-triton", 0.5, 1.0)]
    choices = auto_choices(rows, margin=0.03)
    key = ("cuda", "eval", "bfloat16", "nhwc", 64, 64, 1, 56, 56, 32)
    assert choices[key] == "triton" and choices[key[:1] + ("train",) + key[2:]] == "triton"
    # 1% faster than eager is inside the margin; compile is not a backend; ResNet-18 rows are not shapes
    assert choices[("cuda", "eval", "bfloat16", "nhwc", 64, 128, 2, 56, 56, 32)] == "seed"
    assert len(choices) == 3


def test_auto_table_module_round_trip_keeps_other_devices(tmp_path):
    import importlib.util

    from fused_resnet.cli import write_auto_table
    path = str(tmp_path / "auto_table.py")
    cpu = {("cpu", "eval", "float32", "nchw", 8, 8, 1, 8, 8, 2): "cpp"}
    cuda = {("cuda", "train", "bfloat16", "nhwc", 64, 64, 1, 56, 56, 32): "triton"}
    write_auto_table(path, cpu, "cpu.json")
    write_auto_table(path, cuda, "gpu.json")
    write_auto_table(path, {("cpu", "eval", "float32", "nchw", 8, 8, 1, 8, 8, 2): "seed"}, "cpu2.json")
    spec = importlib.util.spec_from_file_location("t", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.BY_SHAPE == {**cuda, ("cpu", "eval", "float32", "nchw", 8, 8, 1, 8, 8, 2): "seed"}
    assert module.SOURCES == {"cpu": "cpu2.json", "cuda": "gpu.json"}


def test_auto_follows_the_measured_choice_per_shape():
    import torch

    import fused_resnet
    from fused_resnet import backends
    with backends.measured_table({
        ("cpu", "eval", "float32", "nchw", 4, 4, 1, 6, 6): [(2, "seed"), (64, "torch")],
        ("cpu", "eval", "float32", "nchw", 4, 4, 1, 9, 9): [(2, "no-such-backend")],
    }):
        blk = fused_resnet.Residual(4, 4).eval()
        assert backends.resolve_backend("auto", torch.randn(2, 4, 6, 6), False, blk) is None  # seed route
        assert backends.resolve_backend("auto", torch.randn(32, 4, 6, 6), False, blk).name == "torch"  # nearer 64
        fallback = backends.AUTO_ORDER[("cpu", "eval")][0]
        assert backends.resolve_backend("auto", torch.randn(2, 4, 9, 9), False, blk).name == fallback
        assert backends.resolve_backend("auto", torch.randn(2, 4, 7, 7), False, blk).name == fallback  # unmeasured
        assert backends.resolve_backend("torch", torch.randn(2, 4, 6, 6), False, blk).name == "torch"  # named wins
        x = torch.randn(2, 4, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(blk(x), fused_resnet.reference.Residual.forward(blk, x))


def test_auto_under_compile_with_dynamic_batch_sizes():
    """Under torch.compile the per-shape table is not consulted (sizes may be symbolic): a second batch
    size (dynamo then marks it dynamic) still traces in one graph and matches eager."""
    import torch

    import fused_resnet
    torch.manual_seed(0)
    blk = fused_resnet.Residual(4, 4).eval()
    compiled = torch.compile(blk, fullgraph=True)
    with torch.no_grad():
        for n in (2, 3, 5):
            x = torch.randn(n, 4, 6, 6)
            torch.testing.assert_close(compiled(x), fused_resnet.reference.Residual.forward(blk, x),
                                       rtol=1e-4, atol=1e-4)
