"""A run folder written without training (a tiny untrained U-Net and a preset policy), for tests of the files."""

from __future__ import annotations

from pathlib import Path

from augsearch.artifacts.checkpoint import checkpoint_payload
from augsearch.artifacts.run_folder import commit_step
from augsearch.config import PreprocessConfig, load_config
from augsearch.model import UNet, model_config
from augsearch.policy.io import policy_to_dict
from augsearch.policy.presets import policy_from_file_or_preset

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"
LABELS = {"background": 0, "organ": 1, "lesion": 2}


def fake_payload(epoch: int = 1, overrides: list[str] | None = None) -> tuple[dict, dict]:
    """(checkpoint payload, policy document) of a run at EPOCH under smoke.toml with OVERRIDES."""
    cfg = load_config(SMOKE, overrides)
    model = UNet(dims=2, in_channels=1, num_classes=3, base_features=4, max_features=8, depth=2)
    policy = policy_from_file_or_preset("uniform-0.1", dims=2, label_names=LABELS, patch_size=[32, 32])
    document = policy_to_dict(policy, {"epoch": epoch, "step": epoch})
    payload = checkpoint_payload(
        model=model, model_config=model_config(model), config=cfg.to_dict(), label_names=LABELS,
        preprocess=PreprocessConfig().model_dump(mode="json"), patch_size=[32, 32], epoch=epoch, step=epoch,
        optimizers={}, policy=document, metrics={"epoch": epoch, "val/dice_rare": 0.5}, generators={},
        data_fingerprint="0" * 64,
    )
    return payload, document


def write_fake_run(run_dir: Path, epoch: int = 1) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    commit_step(run_dir, *fake_payload(epoch))
    return run_dir
