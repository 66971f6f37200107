"""`vitrail report`: two real tiny runs compared in a markdown table and PNG plots."""

import json

import numpy as np
from PIL import Image

from vitrail.launch import cli
from vitrail.config import from_dict
from vitrail.launch.local import pretrain

from conftest import tiny_config_tree


def _last(rows, key):
    return [row[key] for row in rows if key in row][-1]


def test_report_compares_runs_from_metrics_jsonl_and_results(fashion_shards, tmp_path, capsys):
    with_knn, wandb_only = tmp_path / "with-knn", tmp_path / "wandb-only"
    tree = tiny_config_tree(fashion_shards, with_knn, optim={"max_steps": 8})
    tree["eval"] = {"knn_every": 4, "knn_train_samples": 256, "knn_test_samples": 128}
    pretrain(from_dict(tree), progress=False)
    assert cli.main(["eval", "knn", str(with_knn), "--limit", "256"]) == 0
    tree = tiny_config_tree(fashion_shards, wandb_only, run={"tracking": "wandb"}, optim={"max_steps": 6, "lr": 1e-3})
    pretrain(from_dict(tree), progress=False)
    knn_rows = [json.loads(line) for line in (with_knn / "metrics.jsonl").read_text().splitlines()]
    wandb_rows = [json.loads(line) for line in (wandb_only / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((with_knn / "results.json").read_text())
    [evaluated] = [row for row in results["knn"] if row["features"].startswith("pretrained") and row["k"] == 20]
    capsys.readouterr()

    out = tmp_path / "report"
    assert cli.main(["report", str(with_knn), str(wandb_only), "--out", str(out)]) == 0
    expected = [
        f"| with-knn | dino | vit_tiny | 8 | {_last(knn_rows, 'loss'):.4f} | {_last(knn_rows, 'knn/top1'):.2f} "
        f"| {evaluated['top1']:.2f} | - |",
        f"| wandb-only | dino | vit_tiny | 6 | {_last(wandb_rows, 'loss'):.4f} | - | - | - |",
    ]
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[1:] == expected
    assert "\n".join(expected) in capsys.readouterr().out
    for plot in ("loss.png", "knn.png"):
        pixels = np.asarray(Image.open(out / plot).convert("RGB"))
        assert pixels.shape == (450, 700, 3)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # curves, axes and text, not a blank canvas
        assert f"![{plot[:-4]}]({plot})" in (out / "report.md").read_text()

    # The curves come from metrics.jsonl alone, never from wandb's own run files.
    (wandb_only / "metrics.jsonl").unlink()
    assert cli.main(["report", str(wandb_only), "--out", str(out)]) == 2
    assert f"{wandb_only / 'metrics.jsonl'} does not exist" in capsys.readouterr().err


def test_report_names_a_missing_run_dir(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 2
    assert f"run dir {tmp_path / 'absent'} does not exist" in capsys.readouterr().err
