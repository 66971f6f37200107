"""`vitrail report RUN_DIR...`: runs side by side, as a markdown table and loss / online k-NN plots.

A run's curves come from its metrics.jsonl, which training writes whatever `run.tracking` is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vitrail import storage
from vitrail.errors import VitrailError

COLUMNS = ("run", "method", "backbone", "steps", "final loss", "online k-NN top-1", "k-NN top-1", "linear top-1")
PLOTS = {"loss.png": ("loss", "loss"), "knn.png": ("knn/top1", "online k-NN top-1 (%)")}


@dataclass
class RunSummary:
    name: str
    method: str | None
    backbone: str | None
    history: list[dict]  # one row per step, in step order
    results: dict = field(default_factory=dict)

    def curve(self, metric: str) -> list[tuple[int, float]]:
        return [(row["step"], row[metric]) for row in self.history if metric in row]

    def last(self, metric: str):
        curve = self.curve(metric)
        return curve[-1][1] if curve else None

    def result_top1(self, protocol: str):
        """top-1 of the trained backbone in results.json (`vitrail eval`), if evaluated; of the k-NN,
        at DINO's headline k = 20 where several k were run."""
        rows = [row for row in self.results.get(protocol, []) if str(row.get("features", "")).startswith("pretrained")]
        headline = [row for row in rows if row.get("k") == 20]
        return (headline or rows)[-1]["top1"] if rows else None

    def row(self) -> dict:
        return {"run": self.name, "method": self.method, "backbone": self.backbone,
                "steps": self.history[-1]["step"] if self.history else 0, "final loss": self.last("loss"),
                "online k-NN top-1": self.last("knn/top1"), "k-NN top-1": self.result_top1("knn"),
                "linear top-1": self.result_top1("linear")}


def history(run_dir: str) -> list[dict]:
    """The run's logged rows, those of one step merged (scalars and online k-NN are separate rows)."""
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        raise VitrailError(f"{path} does not exist: the report reads a run's curves from the metrics.jsonl its training writes")
    rows = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise VitrailError(f"{path} line {number} is not JSON: {line[:80]!r}") from None
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update(row)
    return [by_step[step] for step in sorted(by_step)]


def summarize(run_dir: str | Path, name: str | None = None) -> RunSummary:
    run_dir = storage.absolute(run_dir)
    storage.check_readable(run_dir, "run dir")
    if not storage.is_dir(run_dir):
        raise VitrailError(f"run dir {run_dir} does not exist")
    config_path, results_path = storage.join(run_dir, "config.yaml"), storage.join(run_dir, "results.json")
    config = yaml.safe_load(storage.read_text(config_path)) if storage.exists(config_path) else {}
    results = json.loads(storage.read_text(results_path)) if storage.exists(results_path) else {}
    return RunSummary(name or storage.name(run_dir), config.get("method", {}).get("name"), config.get("model", {}).get("backbone"),
                      history(run_dir), results)


def markdown_table(summaries: list[RunSummary]) -> str:
    def cell(column, value):
        if value is None:
            return "-"
        return f"{value:.4f}" if column == "final loss" else f"{value:.2f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for summary in summaries:
        row = summary.row()
        lines.append("| " + " | ".join(cell(column, row[column]) for column in COLUMNS) + " |")
    return "\n".join(lines)


def plot(summaries: list[RunSummary], metric: str, label: str, path: Path) -> bool:
    """`metric` against step, a line per run, as a PNG; False (no file) when no run logged it."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg renders the PNG

    curves = [(summary.name, summary.curve(metric)) for summary in summaries]
    if not any(curve for _, curve in curves):
        return False
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for name, curve in curves:
        if curve:
            steps, values = zip(*curve)
            axes.plot(steps, values, marker="o" if len(curve) < 30 else None, markersize=3, label=name)
    axes.set(xlabel="step", ylabel=label)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)
    return True


def report(run_dirs: list[str | Path], out: str | Path) -> tuple[str, list[Path]]:
    """(markdown, written files): the comparison table in OUT/report.md, and OUT/loss.png and
    OUT/knn.png where some run logged those curves."""
    names = [storage.name(storage.absolute(run_dir)) for run_dir in run_dirs]
    # Runs in same-named folders are told apart by the paths as given.
    names = [str(run_dir) if names.count(name) > 1 else name for run_dir, name in zip(run_dirs, names)]
    summaries = [summarize(run_dir, name) for run_dir, name in zip(run_dirs, names)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summaries)
    plots = [file for file, (metric, label) in PLOTS.items() if plot(summaries, metric, label, out / file)]
    markdown = "\n\n".join(["# vitrail report", table] + [f"![{file[:-4]}]({file})" for file in plots]) + "\n"
    (out / "report.md").write_text(markdown)
    return table, [out / "report.md"] + [out / file for file in plots]
