"""medlora/model.py: the choices of precision and attention kernel."""

from pathlib import Path

import pytest
import torch

from medlora import model as model_module
from medlora.model import attention_for, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "native, pays, expected", [(True, True, "bf16"), (False, True, "fp32"), (True, False, "fp32"), (False, False, "fp32")]
)
def test_auto_on_cpu_is_bf16_only_with_native_bf16_matmuls_that_measure_faster(monkeypatch, native, pays, expected):
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(model_module, "cpu_bf16_matmul_pays", lambda: pays)
    assert resolve_precision("auto", CPU) == expected


def test_bf16_pays_when_its_matmul_is_fast_enough(monkeypatch):
    timings = {torch.float32: 1.0, torch.bfloat16: 0.5}  # 2x faster
    monkeypatch.setattr(model_module, "_best_matmul_seconds", lambda a, b: timings[a.dtype])
    model_module.cpu_bf16_matmul_pays.cache_clear()
    assert model_module.cpu_bf16_matmul_pays() is True
    timings[torch.bfloat16] = 0.9  # only 1.11x faster
    model_module.cpu_bf16_matmul_pays.cache_clear()
    assert model_module.cpu_bf16_matmul_pays() is False
    model_module.cpu_bf16_matmul_pays.cache_clear()  # the next caller measures this machine again


def test_batch_invariant_auto_on_cpu_is_fp32(monkeypatch):
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(model_module, "cpu_bf16_matmul_pays", lambda: True)
    assert resolve_precision("auto", CPU, batch_invariant=True) == "fp32"
    assert resolve_precision("bf16", CPU, batch_invariant=True) == "bf16"  # asked for explicitly


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_prefers_bf16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert resolve_precision("auto", CUDA) == expected


@pytest.mark.parametrize("asked", ["fp32", "fp16", "bf16"])
def test_an_explicit_precision_is_kept(monkeypatch, asked):
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision(asked, CPU) == asked


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", CPU)


def test_eager_attention_only_for_bf16_on_cpu():
    assert attention_for(CPU, torch.bfloat16) == "eager"
    assert attention_for(CPU, torch.float32) == "sdpa"
    assert attention_for(CUDA, torch.bfloat16) == "sdpa"
    assert attention_for(CUDA, torch.float16) == "sdpa"


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_native_bf16_probe_is_true_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert model_module.cpu_has_native_bf16() is expected


def test_native_bf16_probe_agrees_with_the_cpu_flags_of_this_machine():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with (not Linux)")
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    assert model_module.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})
