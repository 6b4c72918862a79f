"""experiments/rank2_figures.py: the alignment with W0's top directions by hand, its chance level, the
validation curves in step order, PiSSA against LoRA on tiny adapters, and one-line errors with exit 2."""

import json
import math

import pytest
import torch

from experiments.rank2_figures import (
    chance_alignment, main, pissa_vs_lora, plot_val_curves, subspace_alignment, top_subspace, validation_curve,
)
from lora import inject_lora, lora_layers, save_adapter
from lora.inspect import delta_svd
from medlora.run_folder import append_metrics
from tests.conftest import make_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
W0 = torch.diag(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))  # top-2 directions: e0 and e1 on both sides


def alignment_of(lora_A: list[list[float]], lora_B: list[list[float]], r: int = 2) -> float:
    """subspace_alignment of dW = B A (scaling 1) with the hand-made W0's top-r directions."""
    return subspace_alignment(*delta_svd(torch.tensor(lora_A), torch.tensor(lora_B), 1.0), *top_subspace(W0, r))


def test_alignment_is_one_inside_w0s_top_directions_and_zero_outside():
    # dW = B A lives in rows {0, 1} x columns {0, 1}: all of it inside span(e0, e1) x span(e0, e1)
    assert alignment_of([[1, 2, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], [[1, 0], [3, 1], [0, 0], [0, 0], [0, 0], [0, 0]]) == pytest.approx(1.0)
    # rows and columns {2..5}: orthogonal to both
    assert alignment_of([[0, 0, 1, 2, 0, 0], [0, 0, 0, 0, 1, 1]], [[0, 0], [0, 0], [1, 0], [0, 2], [0, 0], [1, 1]]) == pytest.approx(0, abs=1e-12)
    # columns inside, rows outside: only one side aligned, and the two-sided share is 0
    assert alignment_of([[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]], [[1, 0], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0]]) == pytest.approx(0, abs=1e-12)
    # dW = 3 e0 e0^T + 4 e3 e3^T: energy 9 inside, 16 outside
    assert alignment_of([[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]], [[3, 0], [0, 0], [0, 0], [0, 4], [0, 0], [0, 0]]) == pytest.approx(9 / 25)


def test_alignment_from_factors_equals_the_dense_formula():
    torch.manual_seed(0)
    lora_A, lora_B, w0 = torch.randn(4, 12), torch.randn(10, 4), torch.randn(10, 12)
    u0, v0 = top_subspace(w0, 3)
    delta = 0.5 * lora_B.double() @ lora_A.double()  # [10, 12]
    dense = (u0.T @ delta @ v0).square().sum() / delta.square().sum()
    assert subspace_alignment(*delta_svd(lora_A, lora_B, 0.5), u0, v0) == pytest.approx(float(dense), rel=1e-10)


def test_chance_level_is_the_mean_alignment_with_random_subspaces():
    assert chance_alignment(16, (576, 576)) == 256 / 331776
    generator = torch.Generator().manual_seed(0)
    factors = delta_svd(torch.randn(6, 32, generator=generator), torch.randn(24, 6, generator=generator), 1.0)
    draws = [subspace_alignment(*factors, torch.linalg.qr(torch.randn(24, 4, generator=generator, dtype=torch.float64))[0],
                                torch.linalg.qr(torch.randn(32, 4, generator=generator, dtype=torch.float64))[0]) for _ in range(400)]
    assert sum(draws) / len(draws) == pytest.approx(chance_alignment(4, (24, 32)), rel=0.15)


def write_run(folder, val_ppls, adapter_model=None):
    """A run folder: metrics.jsonl as train.py writes it (validation at steps 0, 9, 18, 27 between the
    step records) and, when given a model with LoRA layers, adapter/."""
    for step in range(28):
        if step % 9 == 0:
            append_metrics(folder, {"step": step, "val_loss": math.log(val_ppls[step // 9]), "val_ppl": val_ppls[step // 9]})
        if step < 27:
            append_metrics(folder, {"step": step + 1, "epoch": (step + 1) / 54, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0})
    if adapter_model is not None:
        save_adapter(adapter_model, folder / "adapter", base_model="tiny")


def test_validation_curve_reads_the_validation_records_in_step_order(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    write_run(folder, [9.0, 7.0, 6.0, 5.5])
    assert validation_curve(folder) == [(0, 9.0), (9, 7.0), (18, 6.0), (27, 5.5)]
    rows = [{"name": "RANK2-x", "seed": 42, "run_dir": str(folder)}, {"name": "RANK2-x-seed43", "seed": 43, "run_dir": str(folder)}]
    plot_val_curves(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        validation_curve(tmp_path / "absent")


@pytest.fixture
def study(tmp_path):
    """A base folder (the conftest tiny Llama: q_proj 64 x 64, v_proj 32 x 64) and a round-two table
    of three r-16 runs on it: a LoRA with a rank-1 update, a PiSSA whose B grew by 10 % (so
    dW = 0.1 U_16 S_16 V_16^T, inside W0's top 16), and a seed repeat of the LoRA."""
    base = tmp_path / "base"
    make_tiny_model().save_pretrained(base, safe_serialization=True)
    lora_model, pissa_model = make_tiny_model(), make_tiny_model()
    inject_lora(lora_model, rank=16, alpha=32, dropout=0.0)
    inject_lora(pissa_model, rank=16, alpha=32, dropout=0.0, variant="pissa")
    with torch.no_grad():
        for _, layer in lora_layers(lora_model):
            layer.lora_B[:, 0] = torch.randn(layer.lora_B.shape[0])  # B's other columns stay 0: dW of rank 1
        for _, layer in lora_layers(pissa_model):
            layer.lora_B.mul_(1.1)
    rows = []
    for name, variant, seed, model in (("RANK2-r16-lora", "lora", 42, lora_model), ("RANK2-r16-pissa", "pissa", 42, pissa_model),
                                       ("RANK2-r16-lora-seed43", "lora", 43, lora_model)):
        folder = tmp_path / name
        folder.mkdir()
        write_run(folder, [9.0, 7.0, 6.0, 5.0 + seed - 42], model)
        rows.append({"name": name, "r": 16, "variant": variant, "lora_plus_ratio": None, "seed": seed, "val_ppl": 5.0, "run_dir": str(folder)})
    table = tmp_path / "rank2.json"
    table.write_text(json.dumps({"experiments": rows}))
    return table, base, rows


def test_pissa_vs_lora_energy_and_alignment(study):
    _, base, rows = study
    results = pissa_vs_lora(rows, base)
    assert [(result["cell"], result["projection"], result["modules"]) for result in results] == [
        ("r16-lora", "q_proj", 2), ("r16-lora", "v_proj", 2), ("r16-pissa", "q_proj", 2), ("r16-pissa", "v_proj", 2)]
    lora_q, lora_v, pissa_q, pissa_v = results
    assert lora_q["top1"] == pytest.approx(1.0) and lora_v["top4"] == pytest.approx(1.0)  # a rank-1 update
    assert 0 <= lora_q["alignment"] < 1
    # PiSSA's dW = 0.1 U_16 S_16 V_16^T: its energy shares are W0's top-16 ones, and it lies in W0's top 16
    weights = [make_tiny_model().model.layers[i].self_attn.q_proj.weight.detach().double() for i in (0, 1)]
    energies = [torch.linalg.svdvals(weight)[:16].square() for weight in weights]
    assert pissa_q["top1"] == pytest.approx(sum(float(e[0] / e.sum()) for e in energies) / 2, rel=1e-4)
    assert pissa_q["top4"] == pytest.approx(sum(float(e[:4].sum() / e.sum()) for e in energies) / 2, rel=1e-4)
    assert pissa_q["alignment"] == pytest.approx(1.0, abs=1e-4) and pissa_v["alignment"] == pytest.approx(1.0, abs=1e-4)
    assert (pissa_q["chance"], pissa_v["chance"]) == (256 / (64 * 64), 256 / (32 * 64))


def test_main_writes_both_figures_and_prints_the_table(study, tmp_path, capsys):
    table, base, _ = study
    assert main([str(table), "--out-dir", str(tmp_path), "--layer", "1", "--base", str(base)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| Cell | Projection | top 1 | top 4 | in W0's top 16 | chance |"
    assert [line.split(" | ")[:2] for line in out[2:6]] == [
        ["| r16-lora", "q_proj"], ["| r16-lora", "v_proj"], ["| r16-pissa", "q_proj"], ["| r16-pissa", "v_proj"]]
    assert out[4].split(" | ")[4] == "1.0000"  # PiSSA's q_proj update, inside W0's top 16
    for name in ("rank2_val_curves.png", "rank2_pissa_spectrum.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_missing_table_run_folder_or_base_is_one_line_and_exit_2(study, tmp_path, capsys):
    table, base, rows = study
    for argv, message in (([str(tmp_path / "absent.json")], "absent.json: not an experiment table"),
                          ([str(table), "--base", str(tmp_path / "no-base")], "--base " + str(tmp_path / "no-base"))):
        assert main([*argv, "--out-dir", str(tmp_path)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1
    rows[0]["run_dir"] = str(tmp_path / "never-trained")
    table.write_text(json.dumps({"experiments": rows}))
    assert main([str(table), "--out-dir", str(tmp_path), "--base", str(base)]) == 2
    assert "never-trained: no metrics.jsonl" in capsys.readouterr().err
