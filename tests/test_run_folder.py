"""A run folder is one unit: never overwritten unasked, checkpoint and policy committed together, put back in order
after a kill, and resumed only under the config and data it was written with."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from fake_run import SMOKE, fake_payload, write_fake_run

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.atomic import write_text
from augsearch.artifacts.run_folder import (
    RunFolderError,
    check_resumable,
    commit_step,
    prepare_run_dir,
    restore_consistency,
)
from augsearch.cli import main
from augsearch.config import load_config
from augsearch.train import fit


def test_train_refuses_a_run_directory_that_holds_a_run(tmp_path, capsys):
    run = write_fake_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", str(SMOKE), "--out", str(run), "--set", f"data.root={tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and f"--resume {run}" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert not (tmp_path / "data").exists()  # refused before anything else happened


def test_overwrite_removes_the_old_runs_files_only(tmp_path):
    run = write_fake_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run / "tb").mkdir()
    (run / "notes.txt").write_text("mine")
    prepare_run_dir(run, resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    with pytest.raises(RunFolderError, match="one of them"):
        prepare_run_dir(run, resume=True, overwrite=True)


def test_stale_temp_files_are_removed_on_start(tmp_path):
    run = write_fake_run(tmp_path / "run")
    stale = run / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half")
    prepare_run_dir(run, resume=True, overwrite=False)
    assert not stale.exists() and (run / "checkpoint.pt").is_file()


def test_policy_never_lags_the_checkpoint_when_killed_between_renames(tmp_path, monkeypatch):
    run = write_fake_run(tmp_path / "run", epoch=1)
    renames = []
    real_replace = os.replace

    def killed_after_first(src, dst):
        if renames:
            raise KeyboardInterrupt  # the process dies before the second rename
        renames.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        commit_step(run, *fake_payload(epoch=2))
    monkeypatch.undo()
    policy_epoch = json.loads((run / "policy.json").read_text())["provenance"]["epoch"]
    assert renames == ["policy.json"] and policy_epoch >= load_checkpoint(run).epoch


def test_written_files_get_a_new_files_permissions_or_keep_their_own(tmp_path):
    umask = os.umask(0)  # the process's umask, read back unchanged (0o022 gives 0o644)
    os.umask(umask)
    new_file = 0o666 & ~umask
    run = write_fake_run(tmp_path / "run", epoch=1)
    commit_step(run, *fake_payload(epoch=2))
    write_text(tmp_path / "report.html", "<html></html>")
    for path in (run / "checkpoint.pt", run / "policy.json", tmp_path / "report.html"):
        assert stat.S_IMODE(path.stat().st_mode) == new_file, path  # not mkstemp's 0600
    (run / "policy.json").chmod(0o600)  # a file the user restricted stays restricted when rewritten
    commit_step(run, *fake_payload(epoch=3))
    assert stat.S_IMODE((run / "policy.json").stat().st_mode) == 0o600


def test_resume_puts_policy_and_metrics_back_in_line_with_the_checkpoint(tmp_path):
    run = write_fake_run(tmp_path / "run", epoch=2)
    ckpt = load_checkpoint(run)
    (run / "policy.json").write_text(json.dumps(fake_payload(epoch=3)[1]))  # a step ahead
    lines = [json.dumps({"epoch": e}) for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 4, "trai')  # 3 past the checkpoint, 4 cut
    restore_consistency(run, ckpt)
    assert json.loads((run / "policy.json").read_text()) == ckpt.policy
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_refuses_another_config_or_dataset_naming_both(tmp_path):
    write_fake_run(tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run")
    same = load_config(SMOKE)
    check_resumable(ckpt, same.to_dict(), same.fingerprint(), "0" * 64, anyway=False)
    other = load_config(SMOKE, ["train.lr=0.5"])
    with pytest.raises(RunFolderError) as err:
        check_resumable(ckpt, other.to_dict(), other.fingerprint(), "f" * 64, anyway=False)
    message = str(err.value)
    assert "config hash" in message and "train.lr" in message and "data fingerprint" in message
    assert "--resume-anyway" in message
    check_resumable(ckpt, other.to_dict(), other.fingerprint(), "f" * 64, anyway=True)
    with pytest.raises(RunFolderError, match="data fingerprint"):
        check_resumable(ckpt, other.to_dict(), other.fingerprint(), "f" * 64, anyway=False, ignore_config=True)


def _tiny(data_root, *extra):
    return load_config(SMOKE, [f"data.root={data_root}", "train.epochs=2", "train.iterations=1",
                               "train.batch_size=2", "train.val_batch_size=2", "augment.tea.views=2", *extra])


def test_fit_resume_end_to_end(tmp_path):
    """Killed after epoch 1 with metrics of epoch 2 already written: resume writes each epoch once; a changed
    config is refused until --resume-anyway."""
    data = tmp_path / "data"

    class Stop(Exception):
        pass

    def stop_after_first(report):
        if report.epoch == 1:
            (tmp_path / "run" / "metrics.jsonl").open("a").write('{"epoch": 2, "train/loss": 1.0}\n')
            raise Stop

    with pytest.raises(Stop):
        fit(_tiny(data), tmp_path / "run", callbacks=[stop_after_first], progress=False)
    with pytest.raises(RunFolderError, match="train.lr"):
        fit(_tiny(data, "train.lr=0.1"), tmp_path / "run", resume=tmp_path / "run", progress=False)
    fit(_tiny(data), tmp_path / "run", resume=tmp_path / "run", progress=False)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert main(["train", str(SMOKE), "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "run"),
                 "--resume-anyway", "--quiet", "--set", f"data.root={data}", "--set", "train.epochs=3",
                 "--set", "train.iterations=1", "--set", "train.batch_size=2", "--set", "train.val_batch_size=2",
                 "--set", "augment.tea.views=2"]) == 0
    assert load_checkpoint(tmp_path / "run").epoch == 3
