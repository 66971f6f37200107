"""The `vitrail` command as a user runs it."""

import argparse
import json
import subprocess
import sys

import pytest

from vitrail.launch.cli import main, parser
from vitrail.config import from_dict
from vitrail.launch.local import pretrain

from conftest import tiny_config_tree


def _all_parsers(root):
    yield root
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_option_of_every_command_is_documented(capsys):
    for command in _all_parsers(parser()):
        assert command.description, command.prog
        for action in command._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{command.prog} {action.dest}"
    with pytest.raises(SystemExit) as done:
        main(["pretrain", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--workers" in text and "--local" in text and "overrides" in text


def _run(*args):
    # A fresh interpreter, to see whether the command got as far as starting Ray.
    code = ("import sys; from vitrail.launch.cli import main; code = main(sys.argv[1:]); "
            "ray = sys.modules.get('ray'); print('RAY-STARTED' if ray and ray.is_initialized() else 'NO-RAY'); sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_unknown_key_fails_before_ray_starts():
    done = _run("pretrain", "configs/demo.yaml", "model.bogus=1")
    assert done.returncode == 2
    assert "unknown config key 'model.bogus'" in done.stderr
    assert "NO-RAY" in done.stdout and "Traceback" not in done.stderr


def test_missing_shard_directory_is_named(tmp_path):
    absent = tmp_path / "no-shards"
    done = _run("pretrain", "configs/demo.yaml", f"data.shards={absent}", f"run.dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert f"shard directory {absent} does not exist" in done.stderr
    assert "NO-RAY" in done.stdout


def test_shard_verify_and_eval_all_with_baselines(fashion_shards, tmp_path, capsys):
    assert main(["shard", "verify", str(fashion_shards / "train")]) == 0
    assert "every sha256 matches" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    pretrain(from_dict(tiny_config_tree(fashion_shards, run_dir, optim={"max_steps": 4})), progress=False)
    assert main(["eval", "all", str(run_dir), "--baselines", "--k", "10", "--epochs", "20"]) == 0
    printed = capsys.readouterr().out
    assert "weighted k-NN (k=10, T=0.07)" in printed and "linear probe (20 epochs)" in printed
    assert "| raw pixels | 784 |" in printed and "| pretrained (step 4) | 48 |" in printed
    results = json.loads((run_dir / "results.json").read_text())
    for protocol in ("knn", "linear"):
        rows = results[protocol]
        assert [row["features"] for row in rows] == ["raw pixels", "random init", "pretrained (step 4)"]
        # Raw pixels of real Fashion-MNIST are far above the 10% of chance, even from 640 images.
        assert rows[0]["top1"] > 60 and all(0 <= row["top1"] <= row["top5"] <= 100 for row in rows)
    assert all(row["best_lr"] > 0 for row in results["linear"])


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "knn", str(tmp_path)]) == 2
    assert f"no checkpoint in {tmp_path / 'checkpoints'}" in capsys.readouterr().err


def test_eval_reuses_cached_features(fashion_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    pretrain(from_dict(tiny_config_tree(fashion_shards, run_dir, optim={"max_steps": 4})), progress=False)
    command = ["eval", "all", "--checkpoint", str(run_dir), "--data", str(fashion_shards), "--k", "10", "20",
               "--epochs", "5", "--limit", "256"]
    assert main(command) == 0
    first = capsys.readouterr().out
    assert first.count("extracting pretrained (step 4)") == 2 and "features cached in" not in first
    entries = sorted((run_dir / "features").iterdir())
    assert [entry.name.rsplit("-", 1)[0] for entry in entries] == ["pretrained-step-4-test", "pretrained-step-4-train"]
    stamps = {path: path.stat().st_mtime_ns for entry in entries for path in entry.iterdir()}
    results = json.loads((run_dir / "results.json").read_text())
    # A 48-wide ViT: the k-NN reads the last CLS, the probe DINO's ViT-S features (the last 4 blocks' CLS,
    # here both blocks' of this 2-block ViT).
    assert [(row["k"], row["dim"]) for row in results["knn"]] == [(10, 48), (20, 48)]
    assert results["linear"][0]["probe_features"] == "last4" and results["linear"][0]["dim"] == 2 * 48

    assert main(command) == 0
    second = capsys.readouterr().out
    assert "extracting" not in second and second.count("features cached in") == 2
    assert {path: path.stat().st_mtime_ns for entry in entries for path in entry.iterdir()} == stamps
    assert json.loads((run_dir / "results.json").read_text()) == results

    assert main(command + ["--no-cache"]) == 0
    assert capsys.readouterr().out.count("extracting") == 2
    assert sorted((run_dir / "features").iterdir()) == entries


def test_eval_names_its_checkpoint_once(tmp_path, capsys):
    assert main(["eval", "knn", str(tmp_path), "--checkpoint", str(tmp_path)]) == 2
    assert "name the checkpoint once" in capsys.readouterr().err
    assert main(["eval", "knn", str(tmp_path), "--data", str(tmp_path), "--train-shards", str(tmp_path)]) == 2
    assert "either --data" in capsys.readouterr().err
