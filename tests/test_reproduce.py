"""reproduce.py's plan and tables: which models a preset trains, and that every FID lands in its own cell."""
import argparse
import json

import reproduce


def test_full_preset_trains_each_depth_then_the_sigma_sweep():
    assert reproduce.default_sigmas(1) == [] and reproduce.default_sigmas(3) == [0.0, 0.5]  # σ_3, σ_2
    assert reproduce.models(reproduce.PRESETS["full"]) == [
        (1, []), (2, [0.0]), (3, [0.0, 0.5]),       # the paper's σ (unconditional: 0 on 1×1, 0.5 on 2×2)
        (2, [0.5]), (2, [1.0]),                     # depth 2: σ_2 swept, the default 0 already trained
        (3, [0.0, 0.0]), (3, [0.0, 1.0])]           # depth 3: σ_3 kept at 0, σ_2 swept
    assert reproduce.models(reproduce.PRESETS["quick"]) == [(1, []), (3, [0.0, 0.5])]


def test_results_tables_put_each_fid_in_its_cell(tmp_path):
    cfg = reproduce.PRESETS["full"]
    fids = {(d, tuple(s), 0.0): 10.0 * d + 100 * (s[-1] if s else 0) for d, s in reproduce.models(cfg)}
    fids[2, (0.0,), reproduce.CFG], fids[3, (0.0, 0.5), reproduce.CFG] = 7.0, 8.0
    args = argparse.Namespace(preset="full", device="cpu", cond_path="tokens")
    oracle = {((0.0, 0.5), 1): (5.0, 0.1), ((0.0, 0.5), 2): (4.0, 0.05), ((0.0, 0.0), 2): (3.0, 0.02)}
    reproduce.write_results(tmp_path, args, cfg, 10, 2, [("random", 0.1, 0.2)], {"z1x1c64": 1.0}, fids,
                            oracle, ["a"], {"train": 60.0}, 120.0, baseline=40.0, unconditional=0.2)
    lines = (tmp_path / "results.md").read_text().splitlines()
    depth_rows = [ln for ln in lines if ln.startswith("| 1 |") or ln.startswith("| 2 |") or ln.startswith("| 3 |")]
    assert depth_rows[0].endswith("| 10.00 | — |")                      # depth 1: no guidance column
    assert depth_rows[1].endswith("| 20.00 | 7.00 |") and depth_rows[2].endswith("| 80.00 | 8.00 |")
    assert depth_rows[3] == "| 2 | — | 20.00* | 70.00 | 120.00 |"      # σ_2 sweep, * = the paper's σ
    assert depth_rows[4] == "| 3 | 0 | 30.00 | 80.00* | 130.00 |"
    assert "| 0, 0.5 | z_3 | 5.00 | 0.1000 |" in lines and "| 0, 0.5 | z_3, z_2 | 4.00 | 0.0500 |" in lines
    assert "| 0, 0 | z_3, z_2 | 3.00 | 0.0200 |" in lines
    assert [ln for ln in lines if ln.startswith("| 1* (XS+) |")][0].endswith("| 40.00 | — |")
    assert "FID ratios, no guidance: depth3/depth1 8.000, depth3/1* 2.000" in lines
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {(r["depth"], tuple(r["sigmas"]), r["cfg"]): r["fid"] for r in saved["fid"]} == fids
    assert saved["ratios"] == {"depth3/depth1": 8.0, "depth3/1*": 2.0} and saved["unconditional_mse"] == 0.2
