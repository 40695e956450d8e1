"""benchmarks.decode_bound: the bytes a decode step's slots read, and a run that reports them."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import decode_bound


def test_lora_bytes_counts_both_factors_of_every_slice():
    # SmolLM2-135M: sum(in + out) over a layer's slices is 10176; 32 slots of rank 16, fp32
    assert decode_bound.lora_bytes(32, 16) == 32 * 30 * 16 * 10176 * 4
    # one slot, one layer of one (in, (out,)) projection: r * (in + out) weights
    assert decode_bound.lora_bytes(1, 2, layers=1, shapes=((3, (5,)),), elem=1) == 16


@pytest.mark.timeout(120)
def test_run_reports_every_form_with_its_ceiling(tmp_path):
    decode_bound.main(["--layers", "1", "--slots", "4", "--rank", "8", "--rounds", "1",
                       "--base-step-ms", "10", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "smollm2-135m" / "results.json").read_text())["rows"]
    assert [r["form"] for r in rows] == ["plugin op", "bare bmm", "shared-A op"]
    full = decode_bound.lora_bytes(4, 8, layers=1) / 1e6
    a_only = 4 * 8 * (576 * 3 + 576 + 576 * 2 + 1536) * 4 / 1e6  # every slice's A
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert 0 < r["projections_ceiling"] < 1 and 0 < r["step_ceiling"] < 1
        # shared-A slots read no A of their own
        want = full - a_only if r["form"] == "shared-A op" else full
        assert r["mb_read"] == pytest.approx(want)
    assert "ceiling" in (tmp_path / "smollm2-135m" / "results.md").read_text()
