"""lora/inspect.py: the cheap SVD against numpy's full one, the derived columns, the CLI and its refusals."""

import json

import numpy as np
import pytest
import torch

from lora import inject_lora, lora_layers, save_adapter
from lora.inspect import delta_svd, inspect_adapter, main
from tests.conftest import make_tiny_model, save_tiny_adapter


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    make_tiny_model().save_pretrained(folder, safe_serialization=True)
    return folder


def saved(folder, variant, rank=4):
    model = make_tiny_model()
    inject_lora(model, rank=rank, alpha=8, dropout=0.0, variant=variant)
    torch.manual_seed(2)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
        if variant == "dora":  # m moves away from ||W0||_row, as training would move it
            with torch.no_grad():
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude_vector))
    save_adapter(model, folder, base_model="tiny")
    return model


def test_cheap_svd_equals_numpy_svd_of_the_full_matrix():
    torch.manual_seed(0)
    lora_A, lora_B = torch.randn(5, 40), torch.randn(24, 5)
    u, s, v = delta_svd(lora_A, lora_B, scaling=1.7)
    full = 1.7 * (lora_B.double() @ lora_A.double()).numpy()
    assert np.allclose(s.numpy(), np.linalg.svd(full, compute_uv=False)[:5], rtol=0, atol=1e-5)
    assert np.allclose((u * s) @ v.T, full, atol=1e-10)  # U S V^T rebuilds dW
    assert u.shape == (24, 5) and v.shape == (40, 5)


@pytest.mark.parametrize("variant, scaling", [("lora", 8 / 4), ("rslora", 8 / 2), ("dora", 8 / 4)])
def test_every_column_matches_numpy_on_the_full_matrices(tmp_path, base_dir, variant, scaling):
    model = saved(tmp_path, variant)
    result = inspect_adapter(tmp_path, base_dir)
    assert (result["variant"], result["scaling"]) == (variant, scaling)
    reports = {m["name"]: m for m in result["modules"]}
    assert list(reports) == [name for name, _ in lora_layers(model)]
    for name, layer in lora_layers(model):
        delta = scaling * (layer.lora_B.double() @ layer.lora_A.double()).detach().numpy()  # [out, in]
        w0 = layer.base.weight.double().detach().numpy()
        u, s, vt = np.linalg.svd(delta)
        report = reports[name]
        assert np.allclose(report["singular_values"], s[:4], rtol=0, atol=1e-5)
        energy = s**2
        assert report["delta_norm"] == pytest.approx(np.linalg.norm(delta), abs=1e-6)
        assert report["stable_rank"] == pytest.approx(energy.sum() / energy[0], rel=1e-6)
        assert report["top1_energy"] == pytest.approx(energy[0] / energy.sum(), rel=1e-6)
        assert report["top4_energy"] == pytest.approx(energy[:4].sum() / energy.sum(), rel=1e-6)
        assert report["relative_norm"] == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w0), rel=1e-6)
        projected = np.linalg.norm(u[:, :4].T @ w0 @ vt[:4].T)
        assert report["projected_base_norm"] == pytest.approx(projected, rel=1e-6)
        assert report["amplification"] == pytest.approx(np.linalg.norm(delta) / projected, rel=1e-6)
        if variant == "dora":
            start = np.linalg.norm(w0, axis=1)  # [out]: m at init
            magnitude = layer.lora_magnitude_vector.double().detach().numpy()
            assert report["magnitude_change"] == pytest.approx(np.linalg.norm(magnitude - start) / np.linalg.norm(start), rel=1e-6)
            assert report["magnitude_change"] > 0.01
        else:
            assert report["magnitude_change"] is None


def test_dora_magnitude_change_is_zero_at_init_and_read_from_the_table(tmp_path, base_dir, capsys):
    model = make_tiny_model()
    inject_lora(model, rank=2, alpha=4, variant="dora")  # m = ||W0||_row
    save_adapter(model, tmp_path, base_model="tiny")
    assert [m["magnitude_change"] for m in inspect_adapter(tmp_path, base_dir)["modules"]] == pytest.approx([0.0] * 4, abs=1e-7)
    layer = next(layer for _, layer in lora_layers(model))
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.5)  # every row 50% longer: ||0.5 n|| / ||n|| = 0.5
    save_adapter(model, tmp_path, base_model="tiny")
    assert main([str(tmp_path), "--base", str(base_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[-1] == "|dm|/|m0|"
    assert table[2].split()[-1] == "0.5000" and table[3].split()[-1] == "0.0000"


def test_untrained_adapter_has_no_stable_rank(tmp_path):
    model = make_tiny_model()
    inject_lora(model, rank=2, alpha=4)  # B = 0, so dW = 0
    save_adapter(model, tmp_path, base_model="tiny")
    module = inspect_adapter(tmp_path)["modules"][0]
    assert module["delta_norm"] == 0 and module["stable_rank"] is None and module["top1_energy"] is None


def test_table_without_base_says_w0_columns_are_absent(tmp_path, capsys):
    saved(tmp_path, "lora")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("lora, r=4, alpha=8, scaling=2, 4 modules")
    assert out[2].startswith("layers.0.self_attn.q_proj ") and out[2].split()[2] == "-"
    assert "W0 columns (/|W0|, |UtW0V|, amplif, |dm|/|m0|) absent: pass --base FOLDER" in out[-1]


def test_json_and_plot(tmp_path, base_dir, capsys):
    saved(tmp_path / "adapter", "dora")
    png = tmp_path / "heat.png"
    assert main([str(tmp_path / "adapter"), "--base", str(base_dir), "--json", "--plot", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["variant"] == "dora" and len(result["modules"]) == 4
    assert all(m["amplification"] > 0 for m in result["modules"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_error(argv, capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    return captured.err.strip()


def test_bad_input_is_one_line_and_exit_2(tmp_path, base_dir, capsys):
    assert "adapter folder not found" in run_error([str(tmp_path / "nope")], capsys)
    save_tiny_adapter("tiny", tmp_path / "wide", hidden_size=48)
    message = run_error([str(tmp_path / "wide"), "--base", str(base_dir)], capsys)
    assert "q_proj.weight has shape [64, 64] but the adapter's update is [64, 48]" in message
    saved(tmp_path / "ok", "lora")
    assert "not a folder holding .safetensors files" in run_error([str(tmp_path / "ok"), "--base", str(tmp_path)], capsys)
    assert run_error([str(tmp_path / "ok"), "--plot", str(tmp_path / "no" / "dir.png")], capsys).startswith("error: ")
