"""medlora/evaluation/cache.py: the base model's results are reused by a second run and missed on a changed key."""

import json

import pytest

from medlora.evaluation import cache, run as run_module
from medlora.evaluation.settings import resolve_settings
from tests.conftest import SCOPE_PROMPTS, save_run_folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return save_run_folder(tmp_path_factory.mktemp("run"), tiny_model_dir)


@pytest.fixture
def counted_evaluations(monkeypatch):
    """Count evaluate_model calls (one per model actually evaluated)."""
    calls = []
    real = run_module.evaluate_model

    def counting(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_model", counting)
    return calls


def evaluate(run_dir, **flags):
    settings = resolve_settings({"adapter": str(run_dir / "adapter"), "compare_base": True, "limit": 2,
                                 "max_new_tokens": 6, "scope_set": str(SCOPE_PROMPTS), **flags})
    return run_module.run_evaluation(settings, progress=False)


def test_second_run_reuses_the_base_results_and_no_cache_recomputes(run_dir, counted_evaluations, capsys):
    first = evaluate(run_dir)
    assert len(counted_evaluations) == 2  # fine-tuned and base
    assert len(list(cache.eval_cache_dir().glob("*.json"))) == 1

    second = evaluate(run_dir)
    assert len(counted_evaluations) == 3  # only the fine-tuned model again
    assert "base model: reusing its results" in capsys.readouterr().out
    assert second.report["base"] == first.report["base"]  # the same numbers, intervals included
    assert second.outputs["base"].scope_answers == first.outputs["base"].scope_answers
    assert second.outputs["base"].nll.to_json() == first.outputs["base"].nll.to_json()

    evaluate(run_dir, no_cache=True)  # --no-cache: evaluated again, nothing new written
    assert len(counted_evaluations) == 5
    assert len(list(cache.eval_cache_dir().glob("*.json"))) == 1


def test_a_changed_key_misses(run_dir, monkeypatch):
    """Split, seed, precision, generation settings, scope set and code version each change the key (a miss)."""
    import torch

    settings = resolve_settings({"adapter": str(run_dir / "adapter"), "compare_base": True})
    key = cache.cache_key(settings, torch.float32, torch.device("cpu"))
    changed = [
        cache.cache_key(resolve_settings({"adapter": str(run_dir / "adapter"), "seed": 3}), torch.float32, torch.device("cpu")),
        cache.cache_key(resolve_settings({"adapter": str(run_dir / "adapter"), "split": "validation"}), torch.float32, torch.device("cpu")),
        cache.cache_key(settings, torch.bfloat16, torch.device("cpu")),
        cache.cache_key(resolve_settings({"adapter": str(run_dir / "adapter"), "max_new_tokens": 5}), torch.float32, torch.device("cpu")),
        cache.cache_key(resolve_settings({"adapter": str(run_dir / "adapter"), "scope_set": str(SCOPE_PROMPTS)}),
                        torch.float32, torch.device("cpu")),
    ]
    monkeypatch.setattr(cache, "code_version", lambda: "another version")
    changed.append(cache.cache_key(settings, torch.float32, torch.device("cpu")))
    assert len({cache.cache_path(k) for k in [key, *changed]}) == 1 + len(changed)


def test_an_unreadable_cache_file_is_a_miss(run_dir):
    import torch

    key = cache.cache_key(resolve_settings({"adapter": str(run_dir / "adapter")}), torch.float32, torch.device("cpu"))
    path = cache.cache_path(key)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert cache.read_cached(key) is None
    path.write_text(json.dumps({"key": {"other": 1}, "outputs": {}}))
    assert cache.read_cached(key) is None
