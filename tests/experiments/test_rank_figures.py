"""experiments/rank_figures.py: the energy shares by hand, the two figures and the energy table, bad tables."""

import json

import pytest

from experiments.rank_figures import energy_shares, main
from tests.conftest import save_tiny_adapter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_energy_shares_on_hand_values():
    # s = [2, 1]: energies 4 and 1 of 5; the top 4 and top 16 hold everything there is
    assert energy_shares([2.0, 1.0]) == pytest.approx({1: 0.8, 4: 1.0, 16: 1.0})


def test_figures_and_energy_table_from_a_study_table(tmp_path, capsys):
    rows = []
    for r, variant, seed in ((4, "lora", 42), (16, "lora", 42), (16, "lora", 43), (16, "dora", 42)):
        run_dir = tmp_path / f"r{r}-{variant}-{seed}"
        save_tiny_adapter("tiny", run_dir / "adapter")
        rows.append({"name": run_dir.name, "r": r, "variant": variant, "seed": seed, "val_ppl": 10.0 - r / 8, "run_dir": str(run_dir)})
    table = tmp_path / "rank.json"
    table.write_text(json.dumps({"experiments": rows}))
    assert main([str(table), "--out-dir", str(tmp_path), "--layer", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| Experiment | top 1 | top 4 | top 16 |"
    assert [line.split(" | ")[0] for line in out[2:6]] == ["| r4-lora-42", "| r16-lora-42", "| r16-lora-43", "| r16-dora-42"]
    assert out[2].endswith("| 1.000 | 1.000 |")  # a rank-4 update keeps all its energy in 4 directions
    for name in ("rank_val_ppl.png", "rank_spectrum.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_bad_table_and_missing_layer_are_one_line_and_exit_2(tmp_path, capsys):
    table = tmp_path / "rank.json"
    table.write_text(json.dumps({"experiments": [{"name": "x"}]}))
    assert main([str(table)]) == 2
    assert "every row needs name, r, run_dir, seed, val_ppl, variant" in capsys.readouterr().err
    save_tiny_adapter("tiny", tmp_path / "run" / "adapter")
    row = {"name": "run", "r": 4, "variant": "lora", "seed": 42, "val_ppl": 9.0, "run_dir": str(tmp_path / "run")}
    table.write_text(json.dumps({"experiments": [row]}))
    assert main([str(table), "--out-dir", str(tmp_path), "--layer", "7"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "no adapted module model.layers.7.self_attn.q_proj" in error and "\n" not in error
