"""Every setting of a training run: TrainConfig, the named presets, and the one check of them all.

    config = config_from_preset("cpu", lr=5e-4, max_steps=20)
    config.validate()                                  # ValueError naming the first bad setting
    TrainConfig.from_json(config.to_json()) == config  # what RUN/config.json holds

train.py builds the config from --preset and the flags, prints it, and stores it as config.json
in the run folder and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from data import check_max_length, check_num_examples
from lora import check_hyperparameters
from medlora.model import check_precision
from medlora.preference import DECLINE_REJECTED, PREFERENCE_LOSSES


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as config.json in the run folder and each checkpoint."""

    model: str | None = None  # base model: None = embedded SmolLM2-135M-Instruct, a local folder, or a hub id
    data: str | None = None  # dataset: None = embedded flashcards, a local file, or a hub id
    num_examples: int | None = None  # rows sampled after cleaning before the 85/10/5 split (None = all)
    output_dir: str = "runs/cpu"  # run folder: config.json, metrics.jsonl, adapter/, checkpoints/
    preset: str = "cpu"  # named defaults (see PRESETS); explicit flags override them
    epochs: float = 1.0  # passes over the training split
    max_steps: int | None = None  # stop after this many optimizer steps (None = epochs decide)
    batch_size: int = 16  # rows per micro-batch (ignored for splitting when max_batch_tokens is set)
    grad_accum: int = 1  # micro-batches per optimizer step; a step sees batch_size x grad_accum rows
    max_batch_tokens: int | None = 1024  # padded tokens per micro-batch (rows x longest row); None = fixed rows
    lr: float = 1e-3  # peak learning rate after warmup
    warmup_fraction: float = 0.03  # share of optimizer steps spent warming up linearly from 0
    weight_decay: float = 0.001  # AdamW weight decay, as the reference
    max_grad_norm: float = 1.0  # gradients are clipped to this global L2 norm
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA alpha; the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the LoRA branch input
    lora_variant: str = "lora"  # lora (scale alpha/r) | rslora (alpha/sqrt(r)) | dora (learned magnitude) | pissa (SVD start); lora/layer.py
    lora_plus_ratio: float | None = None  # LoRA+: B's learning rate is this times A's (None = off); medlora/optimizer_step.py
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module-name suffixes that get adapters
    scope_repeats: int = 1  # times each out_of_domain / borderline / safety training row is seen per epoch (data.repeat_scope_rows)
    scope_weight: float = 1.0  # SFT loss weight of each out_of_domain / borderline / safety row's tokens (medlora.loss.AnswerLoss)
    borderline_weight: float | None = None  # SFT loss weight of each borderline row's tokens (None = scope_weight): the boundary rows
    safety_weight: float | None = None  # SFT loss weight of each safety row's tokens (None = scope_weight): emergencies, personal doses
    dpo_epochs: float = 0.0  # stage 2, preference training (DPO): passes over the pairs (0 = no stage 2); medlora/preference.py
    preference_loss: str = "dpo"  # loss of stage 2: dpo (against the SFT adapter's log-probabilities) | orpo (odds ratio, no reference)
    dpo_beta: float = 0.1  # DPO beta: how far the rewards may pull the model from the SFT adapter it starts from; ORPO's lambda
    dpo_lr: float = 2e-4  # peak learning rate of the DPO stage (its own cosine schedule with warmup)
    dpo_pairs_per_step: int = 8  # preference pairs per DPO optimizer step (each pair is two rows)
    dpo_nll_weight: float = 0.0  # weight of the chosen answers' mean token NLL added to the preference loss (0 = plain DPO; 1 = ORPO as published)
    dpo_answer_rows: int = 64  # medical / borderline training rows paired (answer chosen, a decline rejected): borderline ones first
    dpo_decline_rows: int | None = None  # out-of-domain training rows paired (a decline chosen), drawn by seed; None = all
    dpo_base_rejected: tuple[str, ...] = ("decline",)  # kinds whose rows the SFT model already handles are paired against the base model's answer
    dpo_own_declines: bool = False  # a medical row the model answers is paired against its own decline (started "I can only answer"), not a training row's
    dpo_decline_rejected: str = "base"  # an out-of-domain row the model already declines is paired against: base (the base model's answer) | own (its own, declines banned)
    dpo_answered_pairs: bool = True  # a medical row the model already answers is paired against a training row's decline or referral
    dpo_max_ppl_increase: float = 0.05  # DPO adapters are kept while validation answer-ppl is at most this much above SFT's
    max_length: int = 512  # tokens per example; the answer is cut, never the prompt
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (auto: medlora.model.resolve_precision)
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    eval_every: int = 10  # optimizer steps between validation passes (also at step 0 and the end)
    save_every: int = 10  # optimizer steps between checkpoints (also at the end)
    keep_last: int = 2  # checkpoints kept on disk
    seed: int = 42  # sampling, split, data order, LoRA init and dropout
    max_nan_steps: int = 3  # stop after this many consecutive steps with a non-finite loss
    device: str | None = None  # cpu | cuda | cuda:N (None = CUDA when available; under torchrun each rank takes cuda:LOCAL_RANK)
    world_size: int = 1  # ranks (processes) that train together: set from torchrun, not a flag; resume needs the same
    dist_timeout: float = 600.0  # seconds a rank waits for the others at a collective before it stops (torchrun only)

    @property
    def step_examples(self) -> int:
        """Examples per optimizer step: micro-batch rows x gradient accumulation."""
        return self.batch_size * self.grad_accum

    def to_json(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, values: dict, source: str = "config") -> TrainConfig:
        """The config `to_json` wrote; ValueError naming `source` and the first unknown key."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(known))}")
        values = dict(values)
        for key in ("targets", "dpo_base_rejected"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting (before any model is loaded)."""
        checks = [
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}"),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.max_steps is None or self.max_steps > 0, f"--max-steps must be positive, got {self.max_steps}"),
            (self.max_batch_tokens is None or self.max_batch_tokens > 0, f"--max-batch-tokens must be positive, got {self.max_batch_tokens}"),
            (self.eval_every > 0 and self.save_every > 0, "--eval-every and --save-every must be positive"),
            (self.dist_timeout > 0, f"--dist-timeout must be positive, got {self.dist_timeout}"),
            (self.keep_last > 0, f"--keep-last must be positive, got {self.keep_last}"),
            (len(self.targets) > 0, "--targets must name at least one module"),
            (self.scope_repeats >= 1, f"--scope-repeats must be a positive integer, got {self.scope_repeats}"),
            (self.scope_weight > 0, f"--scope-weight must be positive, got {self.scope_weight}"),
            (self.borderline_weight is None or self.borderline_weight > 0,
             f"--borderline-weight must be positive, got {self.borderline_weight}"),
            (self.safety_weight is None or self.safety_weight > 0, f"--safety-weight must be positive, got {self.safety_weight}"),
            (self.dpo_epochs >= 0, f"--dpo-epochs must be 0 (no preference stage) or positive, got {self.dpo_epochs}"),
            (self.preference_loss in PREFERENCE_LOSSES,
             f"--preference-loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.preference_loss!r}"),
            (self.dpo_decline_rejected in DECLINE_REJECTED,
             f"--dpo-decline-rejected must be one of {', '.join(DECLINE_REJECTED)}, got {self.dpo_decline_rejected!r}"),
            (self.dpo_beta > 0, f"--dpo-beta must be positive, got {self.dpo_beta}"),
            (self.dpo_lr > 0, f"--dpo-lr must be positive, got {self.dpo_lr}"),
            (self.dpo_pairs_per_step > 0, f"--dpo-pairs-per-step must be positive, got {self.dpo_pairs_per_step}"),
            (self.dpo_nll_weight >= 0, f"--dpo-nll-weight must be 0 or positive, got {self.dpo_nll_weight}"),
            (self.dpo_answer_rows >= 0, f"--dpo-answer-rows must be 0 or positive, got {self.dpo_answer_rows}"),
            (self.dpo_decline_rows is None or self.dpo_decline_rows >= 0,
             f"--dpo-decline-rows must be 0 or positive, got {self.dpo_decline_rows}"),
            (set(self.dpo_base_rejected) <= {"decline", "emergency", "clinician"},
             f"--dpo-base-rejected takes decline, emergency and clinician, got {','.join(self.dpo_base_rejected)}"),
            (self.dpo_max_ppl_increase >= 0, f"--dpo-max-ppl-increase must be 0 or positive, got {self.dpo_max_ppl_increase}"),
            (self.lora_plus_ratio is None or self.lora_plus_ratio > 0, f"--lora-plus-ratio must be positive, got {self.lora_plus_ratio}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_hyperparameters(self.rank, self.alpha, self.dropout, self.lora_variant)  # the LoRA layer's own check
        check_precision(self.precision)
        check_max_length(self.max_length)
        check_num_examples(self.num_examples)
        check_preset(self.preset)


PRESETS: dict[str, dict] = {
    # The default: the embedded model and dataset, sized for a 2-core CPU (`make run`'s measured
    # time is in the README). Two stages (docs/scope.md, issue 31's try e13): one SFT epoch with
    # adapters on all seven projections (the step is the frozen model's forward and backward, so the
    # extra capacity costs little), in which borderline and safety rows' tokens weigh 3 (at weight 1
    # the 567 out-of-domain training rows taught a decline that took most lay-health questions, e7;
    # borderline rows alone at 3 lost the dose referrals, e11), then one DPO epoch over pairs built from the training rows with
    # the SFT model's own answers rejected: the model itself learns to decline and refer, which is
    # what every export carries. LoRA+ (B's learning rate 16 times A's, issue 33's study) in both
    # stages: dpo_lr is A's rate, so B's is 8e-4 in the DPO stage (at dpo_lr 2e-4, B at 3.2e-3 took
    # validation answer-ppl 9-14% over SFT's and no DPO adapter was kept, try e7 in docs/scope.md).
    # DPO beta 0.3 with dpo_lr 5e-5 (docs/scope.md round seven): false declines 3-4/127 over three draws
    # of the DPO rows, where beta 0.1 at 2.5e-5 (e13, the preset of rounds four to six) got 4-6/127.
    # eval_every=29: a validation pass of the embedded split costs about 2 optimizer steps
    # (docs/performance.md), so the epoch validates every 29 steps and at its end.
    "cpu": dict(
        model=None, data=None, num_examples=None, epochs=1.0, batch_size=16, grad_accum=1,
        max_batch_tokens=1024, lr=1e-3, rank=16, alpha=32.0, dropout=0.05, max_length=512,
        precision="auto", grad_checkpointing=False, eval_every=29, save_every=10,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), scope_weight=1.0, borderline_weight=3.0, safety_weight=3.0,
        lora_plus_ratio=16.0,
        dpo_epochs=1.0, dpo_beta=0.3, dpo_lr=5e-5, dpo_pairs_per_step=8, dpo_nll_weight=1.0, dpo_answer_rows=320, dpo_decline_rows=200,
    ),
    # The cpu preset before issue 31: q_proj and v_proj, one SFT epoch, no preference stage. What
    # the experiment files (experiments/*.json) build on, so that their studies keep their meaning.
    "cpu-sft": dict(
        model=None, data=None, num_examples=None, epochs=1.0, batch_size=16, grad_accum=1,
        max_batch_tokens=1024, lr=1e-3, rank=16, alpha=32.0, dropout=0.05, max_length=512,
        precision="auto", grad_checkpointing=False, eval_every=29, save_every=10,
        targets=("q_proj", "v_proj"), scope_weight=1.0, borderline_weight=None, safety_weight=None, lora_plus_ratio=None,
        dpo_epochs=0.0, dpo_beta=0.1, dpo_lr=2e-4, dpo_pairs_per_step=8, dpo_nll_weight=0.0, dpo_answer_rows=64, dpo_decline_rows=None,
    ),
    # The reference notebook's run on a T4: TinyLlama-1.1B-Chat, 3,000 flashcards, fp16 AMP.
    "t4": dict(
        model="TinyLlama/TinyLlama-1.1B-Chat-v1.0", data="medalpaca/medical_meadow_medical_flashcards",
        num_examples=3000, epochs=2.0, batch_size=2, grad_accum=8, max_batch_tokens=None, lr=2e-4,
        rank=16, alpha=32.0, dropout=0.05, max_length=512, precision="fp16", grad_checkpointing=True,
        eval_every=50, save_every=50, targets=("q_proj", "v_proj"), scope_weight=1.0, borderline_weight=None, safety_weight=None, lora_plus_ratio=None,
        dpo_epochs=0.0, dpo_beta=0.1, dpo_lr=2e-4, dpo_pairs_per_step=8, dpo_nll_weight=0.0, dpo_answer_rows=64, dpo_decline_rows=None,
    ),
}


def check_preset(preset: str) -> None:
    """Raise ValueError unless `preset` names one of PRESETS."""
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")


def config_from_preset(preset: str, **overrides) -> TrainConfig:
    """A preset's values with `overrides` on top (what the command line and experiment files do)."""
    check_preset(preset)
    return TrainConfig.from_json({**PRESETS[preset], "preset": preset, **overrides})


def resumed_config(saved: TrainConfig, requested: TrainConfig, given: set[str], source: str) -> TrainConfig:
    """The saved config of the run being resumed, with the requested output_dir.

    Resuming continues the saved run exactly, so a setting given on the command line (`given`,
    field names) that differs from the saved one is refused instead of being ignored, and so is
    another number of ranks: the data shards and each rank's RNG stream depend on it. Where the
    run lives and how long ranks wait for each other may change.
    """
    if requested.world_size != saved.world_size:
        raise ValueError(
            f"{source}: the run was trained by {saved.world_size} rank(s) and this job has {requested.world_size}; "
            f"resume it with the same number (torchrun --nproc_per_node {saved.world_size} ..., or python train.py for 1), "
            f"or start a new run with --overwrite"
        )
    for name in sorted(given - {"output_dir", "dist_timeout"}):
        if getattr(requested, name) != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {getattr(requested, name)!r} differs from the resumed run's {getattr(saved, name)!r} "
                f"({source}): resume continues that run as it was; drop {flag}, or start a new run with --overwrite"
            )
    return dataclasses.replace(saved, output_dir=requested.output_dir, dist_timeout=requested.dist_timeout)
