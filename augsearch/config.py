"""Typed experiment configuration: TOML files, dotted overrides, unknown keys rejected.

One `ExperimentConfig` describes a whole run: the data, the segmenter, the losses, the augmentation mode and the
search. Every section has defaults, so a config file only states what differs. Overrides use dotted keys,
`--set train.epochs=3 search.tra.lr=0.05`, and their values are parsed as TOML (`3`, `0.05`, `true`, `"jvp"`,
`[64, 64]`), with a bare word taken as a string.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from augsearch.errors import AugsearchError, brief
from augsearch.textfiles import MalformedText, parse_toml, read_text


class ConfigError(AugsearchError):
    """A config file or override that does not fit the schema; the message names the key and the fix."""


class _Section(BaseModel):
    # strict: `true` is no number and `1` no boolean (an int still fills a float field); numbers are finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class SynthConfig(_Section):
    """The bundled benchmark that `data.generate = true` writes at `data.root` when it has no dataset.json yet."""

    dims: Literal[2, 3] = 2
    cases: int = Field(24, ge=4, description="Total cases: training, validation and test together.")
    train_cases: int = Field(6, ge=1, description="Training cases; the rest split between validation and test.")
    size: int | None = Field(None, ge=24, description="Edge length in voxels; None picks 96 (2D) or 48 (3D).")
    seed: int = 0
    shift: str | None = Field(None, description="A planted train/test difference, e.g. 'flip_x', 'gamma_up'.")


class PreprocessConfig(_Section):
    """Resampling and intensity normalisation, applied identically at training and prediction time."""

    target_spacing: list[PositiveFloat] | None = Field(
        None, min_length=2, max_length=3, description="mm per voxel axis; None keeps each case's own."
    )
    normalization: Literal["auto", "zscore", "ct", "none"] = Field(
        "auto", description="'auto': 'ct' when dataset.json names every channel CT (as nnU-Net), else 'zscore'."
    )
    ct_clip: list[float] | None = Field(None, description="[low, high] HU window for normalization='ct'.")
    ct_mean: float | None = None
    ct_std: float | None = None


class SplitConfig(_Section):
    """Which cases train, validate (the search learns from these) and test.

    Precedence: explicit lists, then `splits_file` (nnU-Net `splits_final.json`, fold `fold`; when unset, the
    dataset's own `splits_final.json`, as nnU-Net does), then the benchmark's own `splits.json` when present, then
    seeded fractions of `imagesTr`. Test cases come from imagesTs/labelsTs when the dataset has them.
    """

    train: list[str] | None = None
    val: list[str] | None = None
    test: list[str] | None = None
    splits_file: str | None = Field(None, description="nnU-Net splits file; None uses <root>/splits_final.json if any.")
    fold: int = Field(0, ge=0, description="Fold of the splits file.")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    train_fraction: float = Field(1.0, gt=0, le=1, description="Use this share of the training cases (5-50% regimes).")
    seed: int = 0


class DataConfig(_Section):
    root: str = "runs/data/bench2d"
    cache_dir: str | None = Field(None, description="Preprocessed arrays; None means <root>/.augsearch_cache.")
    generate: bool = Field(
        False, description="Write the benchmark of [data.synth] at `root` when it has no dataset.json; otherwise a "
        "missing dataset is an error (a mistyped root never turns into a generated dataset).",
    )
    synth: SynthConfig | None = Field(None, description="The benchmark `generate` writes.")
    preprocess: PreprocessConfig = PreprocessConfig()
    split: SplitConfig = SplitConfig()

    @model_validator(mode="after")
    def _generate_needs_synth(self) -> DataConfig:
        if self.generate and self.synth is None:
            raise ValueError("data.generate = true needs a [data.synth] section describing the benchmark to write")
        return self


class ModelConfig(_Section):
    """nnU-Net-like U-Net: two convs per stage, InstanceNorm, LeakyReLU."""

    base_features: int = Field(16, ge=1)
    max_features: int = Field(320, ge=1)
    depth: int = Field(4, ge=1, description="Number of resolution levels (poolings + 1).")
    pool_kernels: list[list[int]] | None = Field(
        None, description="Per downsampling, one stride per axis (e.g. [[2, 2, 1], [2, 2, 2]]); None is 2 everywhere."
    )
    deep_supervision: bool = False


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    iterations: int = Field(50, ge=1, description="Iterations per epoch.")
    batch_size: int = Field(8, ge=1)
    val_batch_size: int = Field(8, ge=1, description="Validation patches per TRA meta-step.")
    patch_size: list[PositiveInt] = Field(default_factory=lambda: [64, 64], min_length=2, max_length=3)
    fg_fraction: float = Field(0.5, ge=0, le=1, description="Share of patches centred on a foreground voxel.")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(1e-2, gt=0)
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    grad_clip: float | None = 12.0
    update_model: bool = Field(True, description="False freezes the segmenter (TEA-only search on a trained model).")
    init_checkpoint: str | None = Field(None, description="Start from this segmenter checkpoint (weights only).")
    validate_every: int = Field(1, ge=1, description="Epochs between whole-volume validations.")
    checkpoint_every: int = Field(
        1, ge=1, description="Epochs between checkpoints (validation epochs always write one)."
    )
    sliding_window_batch: int = Field(8, ge=1)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default.")
    max_nonfinite_in_a_row: int = Field(
        20, ge=1, description="Stop when this many segmenter, TRA or TEA updates in a row are non-finite (skipped)."
    )


class LossConfig(_Section):
    """Segmentation loss and the imbalance regularisers of the 2020 paper (METHOD 7)."""

    kind: Literal["ce_dice", "ce", "dice"] = "ce_dice"
    rare_labels: list[str] | None = Field(None, description="Rare classes by label name; None marks all foreground.")
    asymmetric: bool = Field(True, description="Apply margin/focal/adversarial/mixup rules to rare classes only.")
    margin: float = Field(0.0, ge=0, description="Large-margin m (0 = off).")
    focal_gamma: float = Field(0.0, ge=0, description="Focal gamma (0 = off); also enters the Dice term.")
    adversarial_eps: float = Field(0.0, ge=0, description="Adversarial step size epsilon (0 = off).")
    adversarial_xi: float = Field(1e-5, gt=0)
    mixup_alpha: float = Field(0.0, ge=0, description="Mixup Beta(alpha, alpha) (0 = off).")
    mixup_margin: float = Field(0.2, ge=0, lt=1)
    bg_augment_prob: float = Field(1.0, ge=0, le=1, description="Asymmetric augmentation: P(augment a BG patch).")
    context_labels: Literal["none", "kmeans", "dilated", "organ", "colab"] = Field(
        "none", description="Split the background into context sub-classes for training (augsearch/context_labels.py): "
        "'kmeans' (intensity clusters), 'dilated' (a ring around the foreground), 'organ' (a label as context, not "
        "a target), 'colab' (learned by a generator network); predictions merge them back into the background.",
    )
    context_classes: int | None = Field(
        None, ge=1, description="t context sub-classes; None is 2 for 'kmeans' and 'colab', 1 for 'dilated' and "
        "'organ' (which make one).",
    )
    context_organ_label: str | None = Field(None, description="'organ': the dataset label whose voxels are context.")
    context_dilation: int = Field(4, ge=1, description="'dilated': ring width around the foreground, in voxels.")
    colab_lr: float = Field(1e-3, gt=0, description="'colab': Adam learning rate of the generator network.")
    colab_features: int = Field(8, ge=1, description="'colab': base width of the generator's small U-Net.")
    colab_backend: Literal["jvp", "functional"] = Field(
        "jvp", description="'colab': exact meta-gradient of the generator, by forward-over-reverse ('jvp') or "
        "second-order autograd through the unrolled step ('functional').",
    )

    @model_validator(mode="after")
    def _context_consistent(self) -> LossConfig:
        kind, t = self.context_labels, self.context_classes
        if kind in ("dilated", "organ") and t not in (None, 1):
            raise ValueError(f"loss.context_labels = {kind!r} makes one context class; set loss.context_classes = 1 "
                             f"(got {t})")
        if kind == "organ" and not self.context_organ_label:
            raise ValueError("loss.context_labels = 'organ' needs loss.context_organ_label naming a dataset label "
                             "(e.g. \"organ\"), whose voxels become the context class")
        if kind != "organ" and self.context_organ_label is not None:
            raise ValueError(f"loss.context_organ_label is read by loss.context_labels = 'organ' only (got "
                             f"{kind!r}); remove it or set loss.context_labels = 'organ'")
        if kind != "none" and (self.adversarial_eps > 0 or self.mixup_alpha > 0):
            raise ValueError("loss.context_labels does not combine with loss.adversarial_eps or loss.mixup_alpha yet; "
                             "set those to 0 or loss.context_labels = 'none'")
        return self

    @property
    def context_count(self) -> int:
        """t: the number of context sub-classes the head gets (0 without context labels)."""
        if self.context_labels == "none":
            return 0
        if self.context_classes is not None:
            return self.context_classes
        return 1 if self.context_labels in ("dilated", "organ") else 2


class TraSearchConfig(_Section):
    """Training-time augmentation: learned by meta-gradients or frozen at its initial policy."""

    learn: bool = False
    class_specific: bool = True
    groups: dict[str, list[str]] | None = Field(
        None, description="Class groups by label names; None is background vs all foreground labels."
    )
    lr: float = Field(5e-2, gt=0, description="Adam learning rate on the TRA logits (poly decay).")
    beta1: float = Field(
        0.9, ge=0, lt=1, description="Adam's beta1 on the TRA logits: near 0.99 its momentum averages the noisy "
        "meta-gradients over about 100 steps (experiments/signal/README.md) before they move the policy."
    )
    backend: Literal["jvp", "higher", "functional", "fd"] = "jvp"
    inner_lr: float | None = Field(None, gt=0, description="Inner SGD step; None uses the segmenter's current lr.")
    baseline: bool = Field(True, description="Centre per-sample meta-gradients within each class group.")
    baseline_decay: float = Field(
        0.9, ge=0, lt=1, description="Decay of each group's running mean of meta-gradients over recent steps, the "
        "baseline of a group with fewer than 2 samples in a batch (its own mean would cancel it: no learning)."
    )
    count_normalization: bool = Field(True, description="Divide by how many same-group samples chose each bin.")
    estimator: Literal["straight_through", "reinforce"] = Field(
        "straight_through",
        description="How the meta-gradients reach the TRA logits: 'straight_through' (Gumbel-softmax weights, biased, "
        "lower variance) or 'reinforce' (score function d log p / d logits, unbiased; it takes no count "
        "normalisation, which would bias it).",
    )
    outer_loss: Literal["ce_dice", "ce", "dice"] = "ce_dice"
    outer_rare_fraction: float = Field(
        0.0, ge=0, le=1,
        description="Share of the outer-loss batch centred on a rare class (loss.rare_labels); 0 is off.",
    )
    precondition: bool = Field(
        False,
        description="Inner step and JVP tangent in the segmenter's Adam geometry (P * grad, P * v) instead of SGD's.",
    )


class TeaSearchConfig(_Section):
    """Test-time augmentation: a distribution over deterministic transforms, learned from validation loss."""

    learn: bool = False
    lr: float = Field(5e-2, gt=0)
    views: int = Field(8, ge=2, description="Z transformed views per TEA step.")
    groups_per_step: int = Field(1, ge=1, description="Foreground-centred validation patches per TEA step.")
    top_k: int | None = Field(
        None, ge=1,
        description="TTA entries selected for inference; None keeps the policy's own (a preset's or a file's, 4 for a "
        "learned TEA). A value that differs from the policy's replaces it and is logged.",
    )
    init: Literal["flips", "single-flips", "identity", "uniform"] | None = Field(
        None,
        description="TEA start (METHOD 3.4): 'flips' (identity, flips, half turns at 0.1 each), 'single-flips' "
        "(identity and single flips share 0.8), 'identity' (0.99), 'uniform'; None keeps the policy's own start.",
    )
    exclude: list[str] = Field(
        default_factory=list, description="TEA pool entries never drawn nor exported, by name (e.g. 'rot90_xz+')."
    )
    class1_only: bool = Field(False, description="Reproduce the reference: TEA loss on label 1 only.")
    augment_outer_batch: bool = Field(
        True, description="When TEA is learned, apply its views to the TRA outer-loss batch (the joint coupling)."
    )


class AugmentConfig(_Section):
    """The augmentation mode. `policy` is a preset name, a baseline ('randaugment', 'trivialaugment') or a file."""

    mode: Literal["none", "policy"] = "policy"
    policy: str = "uniform-0.1"
    ops: list[str] | None = Field(
        None, description="Registry ops that TRA draws and the TEA pool holds (with the identity); None is all."
    )
    randaugment_n: int = Field(2, ge=1)
    randaugment_m: int = Field(2, ge=1)
    reference_signs: bool = Field(False, description="Random sign inside each bin, as the reference code does.")
    meta_every: int = Field(1, ge=1, description="Run the TRA meta-step and the TEA step every k iterations.")
    accumulate: int = Field(
        1, ge=1, description="Step the policy once per k meta-iterations, on the mean of their gradients."
    )
    warmup_iterations: int = Field(
        0, ge=0, description="Segmenter iterations under the initial policy before the first meta-step and TEA step."
    )
    tra: TraSearchConfig = TraSearchConfig()
    tea: TeaSearchConfig = TeaSearchConfig()


class SearchConfig(_Section):
    """Ray Tune: what varies across trials and how trials are placed and scheduled."""

    num_samples: int = Field(1, ge=1)
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted config key -> list (grid) or {choice=[...]}, {uniform=[a,b]}, {loguniform=[a,b]}.",
    )
    metric: str = "val/dice_rare"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["none", "asha", "pbt"] = "none"
    pbt_interval: int = Field(2, ge=1, description="Epochs between PBT exploit/explore steps.")
    max_failures: int = Field(2, ge=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    cpus_per_trial: float = Field(1.0, gt=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    policy_sharing: Literal["independent", "shared"] = Field(
        "independent",
        description="'independent': each trial learns its own policy; 'shared': num_workers trials (workers) push "
        "their policy gradients to one policy server that averages them and steps one policy, one such group of "
        "workers per point of a grid-only search.space.",
    )
    num_workers: int = Field(
        1, ge=1, description="Workers of a shared search; worker i has seed seed + 1000 i and shard i (search.shard)."
    )
    shard: Literal["disjoint", "all"] = Field(
        "disjoint",
        description="Shared search: 'disjoint': worker i trains on every num_workers-th training case from position "
        "i; 'all': every worker trains on all training cases (few cases, where shards would starve each segmenter; "
        "the workers still draw independent batches, augmentations and initialisations from their own seeds).",
    )
    worker: int = Field(0, ge=0, description="This worker's index (set per trial by a shared search).")
    sync_timeout_s: float = Field(
        120.0, gt=0, description="Shared search: how long a policy round waits for the slowest live worker."
    )


class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    search: SearchConfig = SearchConfig()

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, value: str) -> str:
        if not value or any(ch in value for ch in "/\\ "):
            raise ValueError(f"name must be non-empty without '/', '\\' or spaces, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.augment.mode == "none" and (self.augment.tra.learn or self.augment.tea.learn):
            raise ValueError("augment.mode='none' cannot learn a policy; set augment.mode='policy' or learn=false")
        if not self.train.update_model and self.augment.tra.learn:
            raise ValueError("augment.tra.learn needs a segmenter that trains; set train.update_model=true")
        if self.search.worker >= self.search.num_workers:
            raise ValueError(f"search.worker {self.search.worker} must be below search.num_workers "
                             f"{self.search.num_workers}")
        return self

    @property
    def dims(self) -> int:
        return len(self.train.patch_size)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the whole config, for provenance."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def parse_override_value(text: str) -> Any:
    """Parse the right-hand side of `key=value` as a TOML value; a bare word stays a string."""
    try:
        return parse_toml(f"v = {text}")["v"]
    except MalformedText:
        return text


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `tree['a']['b']['c'] = value` for `dotted='a.b.c'`, creating tables on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is a value ({child!r}), not a table")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Return a copy of `tree` with `key=value` strings (or a {dotted: value} dict) applied."""
    tree = json.loads(json.dumps(tree))
    if not overrides:
        return tree
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [(key, parse_override_value(text)) for key, text in map(_split_override, overrides)]
    for key, value in items:
        set_dotted(tree, key, value)
    return tree


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value; write it like --set train.epochs=3")
    return key.strip(), value.strip()


def config_from_dict(tree: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict; errors name the dotted key, what was expected and what came."""
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            if e["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key; check its spelling against `augsearch config show`")
            else:
                lines.append(f"  {key}: {e['msg']} (got {brief(e.get('input'))})")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a TOML config, apply dotted overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a TOML file such as experiments/smoke.toml")
    try:
        tree = parse_toml(read_text(path))
    except MalformedText as err:
        raise ConfigError(f"{path}: {err}") from None
    return config_from_dict(apply_overrides(tree, overrides), source=str(path))
