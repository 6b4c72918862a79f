"""LoRA+ (medlora/optimizer_step.py parameter_groups and adamw): B's learning rate is lambda times A's,
grouped as PEFT's create_loraplus_optimizer (test-only reference) groups them, for every variant."""

import peft  # test-only reference implementation
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

from lora import VARIANTS, inject_lora, lora_parameters
from medlora.config import TrainConfig
from medlora.optimizer_step import adamw, parameter_groups
from tests.conftest import make_tiny_model

PEFT_FLAGS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"}}
LR, RATIO, WEIGHT_DECAY = 2e-4, 16.0, 0.001


def our_names(model) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def peft_name(name: str) -> str:
    """PEFT's `base_model.model.X.lora_A.default.weight` as our `X.lora_A`."""
    return name.removeprefix("base_model.model.").removesuffix(".weight").removesuffix(".default")


def groups_as_names(optimizer, names: dict[int, str], rename=lambda n: n) -> list[tuple[list[str], float, float]]:
    """(parameter names, lr, weight decay) of every non-empty group, in order."""
    return [
        ([rename(names[id(p)]) for p in group["params"]], group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
        if group["params"]
    ]


def test_every_variant_is_covered():
    assert set(PEFT_FLAGS) == set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_groups_and_learning_rates_equal_peft_create_loraplus_optimizer(variant):
    """A at lr; B, and DoRA's magnitude m (PEFT puts every 1-D parameter with B), at lambda x lr.

    PEFT sets each group's weight decay to its loraplus_weight_decay, so it gets ours."""
    reference = peft.get_peft_model(
        make_tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **PEFT_FLAGS[variant])
    )
    theirs = create_loraplus_optimizer(
        reference, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=WEIGHT_DECAY, weight_decay=WEIGHT_DECAY
    )
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, variant=variant)
    optimizer = adamw(parameter_groups(model, RATIO), LR, WEIGHT_DECAY, "cpu")
    ours = groups_as_names(optimizer, our_names(model))
    assert ours == groups_as_names(theirs, {id(p): n for n, p in reference.named_parameters()}, peft_name)
    assert [group["lr_ratio"] for group in optimizer.param_groups] == [1.0, RATIO]
    assert len(ours[1][0]) == (2 if variant == "dora" else 1) * len(ours[0][0])  # B (and m) per A


def test_without_lora_plus_one_group_at_ratio_one_in_the_order_of_lora_parameters():
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8)
    for params in (parameter_groups(model), lora_parameters(model)):  # train.py's, and a benchmark's plain list
        optimizer = adamw(params, LR, WEIGHT_DECAY, "cpu")
        assert len(optimizer.param_groups) == 1
        group = optimizer.param_groups[0]
        assert (group["lr"], group["lr_ratio"]) == (LR, 1.0)
        assert [id(p) for p in group["params"]] == [id(p) for p in lora_parameters(model)]


def test_schedule_scales_each_group_and_b_moves_lambda_times_further_at_the_first_step():
    """train.py sets group["lr"] = lr x group["lr_ratio"]; Adam's first step moves each weight by about
    lr (its update is g / |g|), so B's step is about lambda times A's."""
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)  # so that A gets a gradient too
    optimizer = adamw(parameter_groups(model, RATIO), LR, 0.0, "cpu")
    for group in optimizer.param_groups:
        group["lr"] = 0.5 * LR * group["lr_ratio"]  # the schedule at half the peak
    assert [group["lr"] for group in optimizer.param_groups] == [0.5 * LR, 0.5 * LR * RATIO]
    before = [[p.detach().clone() for p in group["params"]] for group in optimizer.param_groups]
    ids = torch.randint(0, 49152, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    moved = [max((p - b).abs().max().item() for p, b in zip(group["params"], old)) for group, old in zip(optimizer.param_groups, before)]
    assert moved[0] == pytest.approx(0.5 * LR, rel=0.01)
    assert moved[1] == pytest.approx(0.5 * LR * RATIO, rel=0.01)


@pytest.mark.parametrize("ratio, ok", [(None, True), (16.0, True), (0.0, False), (-2.0, False)])
def test_config_checks_the_ratio(ratio, ok):
    config = TrainConfig(lora_plus_ratio=ratio)
    if ok:
        config.validate()
    else:
        with pytest.raises(ValueError, match=rf"--lora-plus-ratio must be positive, got {ratio}"):
            config.validate()
