"""The `vitrail` command: shard data, pretrain, evaluate, list backbones.

Each subcommand imports what it runs inside its function: `vitrail --help`, `vitrail jobs` or a
mistyped flag answer in a fraction of a second instead of first loading torch, Ray and FAISS.
"""

from __future__ import annotations

import argparse
import sys

from vitrail import storage
from vitrail.errors import VitrailError


def _shard(args) -> None:
    from vitrail.pipelines import shards, sources

    screening = shards.Screening(getattr(args, "strict", False), getattr(args, "decode", False),
                                 getattr(args, "max_image_pixels", None))
    if args.source == "fashion-mnist":
        sources.shard_fashion_mnist(args.out, root=args.root, shard_size=args.shard_size, limit=args.limit, workers=args.workers)
    elif args.source == "folder":
        samples, classes, problems = sources.folder_samples(args.src)
        shards.write_shards(samples[: args.limit], classes, args.out, args.shard_size, args.workers,
                            screening=screening, listed_problems=problems)
    elif args.source == "list":
        samples, classes = sources.list_samples(args.src)
        shards.write_shards(samples[: args.limit], classes, args.out, args.shard_size, args.workers, screening=screening)
    elif args.source == "index":
        shards.index_existing(args.out, args.workers)
    elif args.source == "verify":
        index = shards.verify(args.out, screening)
        decoded = ", every image decodes" if args.decode else ""
        print(f"{index.folder}: {len(index.shards)} shards, {index.num_samples} samples, every sha256 matches{decoded}")


def _pretrain(args) -> None:
    from vitrail import config as config_module

    overrides = list(args.overrides)
    for flag, key in (("workers", "ray.workers"), ("gpus_per_worker", "ray.gpus_per_worker"),
                      ("address", "ray.address"), ("run_dir", "run.dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    config = config_module.load(args.config, overrides)
    if args.local:
        from vitrail.launch.local import pretrain
        pretrain(config, reset=args.reset)
    else:
        from vitrail.launch.train import pretrain
        pretrain(config, dashboard=not args.no_dashboard, reset=args.reset)
    print(f"run dir: {config.run.dir}")


def _eval(args) -> None:
    from vitrail.eval.report import evaluate, table, write_results

    if (args.path is None) == (args.checkpoint is None):
        raise VitrailError("name the checkpoint once: `vitrail eval PROTOCOL RUN_DIR|FILE` or --checkpoint RUN_DIR|FILE")
    checkpoint = args.checkpoint or args.path
    train_shards, test_shards = args.train_shards, args.test_shards
    if args.data is not None:
        if train_shards or test_shards:
            raise VitrailError("pass either --data (a folder holding train/ and test/) or --train-shards/--test-shards")
        train_shards, test_shards = storage.join(args.data, "train"), storage.join(args.data, "test")
    protocols = ("knn", "linear") if args.protocol == "all" else (args.protocol,)
    results = evaluate(checkpoint, protocols, train_shards, test_shards, ks=args.k, temperature=args.temperature,
                       linear_epochs=args.epochs, resize_size=args.resize_size, crop_size=args.crop_size,
                       baselines=args.baselines, limit=args.limit, device=args.device, arch=args.arch,
                       patch_size=args.patch_size, probe_features=args.probe_features, cache_dir=args.cache_dir,
                       use_cache=not args.no_cache, workers=args.workers, faiss_threads=args.faiss_threads,
                       knn_memory_mb=args.knn_memory_mb)
    path = write_results(checkpoint, results)
    titles = {"knn": f"weighted k-NN (k={','.join(map(str, args.k))}, T={args.temperature})",
              "linear": f"linear probe ({args.epochs} epochs)"}
    columns = {"knn": ("features", "dim", "k", "top1", "top5"), "linear": ("features", "probe_features", "dim", "top1", "top5")}
    for protocol, rows in results.items():
        print(f"\n{titles[protocol]}, top-1 / top-5 in %:\n\n{table(rows, columns[protocol])}")
    print(f"\nwritten to {path}")


def _cluster(args) -> None:
    from vitrail.launch import submit

    if args.action == "up":
        address = submit.cluster_up(args.num_cpus, args.dashboard_port)
        print(f"Ray head on 127.0.0.1; dashboard and Jobs API at {address}\nsubmit with: vitrail submit CONFIG --address {address}")
    else:
        stopped = submit.cluster_down(args.dashboard_port)
        print(f"stopped the Ray head node of port {args.dashboard_port} ({stopped} processes)" if stopped
              else f"no vitrail cluster with its dashboard on port {args.dashboard_port} was running")


def _submit(args) -> None:
    from vitrail import config as config_module
    from vitrail.launch import submit

    config = config_module.load(args.config, args.overrides)
    job_id = submit.submit(config, args.address, evaluate=not args.no_eval)
    print(f"submitted job {job_id}\ndashboard: {args.address}/#/jobs/{job_id}\nrun dir: {config.run.dir}\n"
          f"follow with: vitrail jobs logs {job_id} --follow")


def _jobs(args) -> None:
    from vitrail.launch import submit

    if args.action != "list" and not args.job_id:
        raise VitrailError(f"`vitrail jobs {args.action}` needs a job id (see `vitrail jobs list`)")
    if args.action == "list":
        for job in submit.list_jobs(args.address):
            print(f"{job['id']}  {job['status']:<10}  {job['entrypoint']}")
    elif args.action == "logs":
        submit.logs(args.job_id, args.address, follow=args.follow)
    elif args.action == "status":
        print(submit.status(args.job_id, args.address))
    else:
        print(f"stop requested for {args.job_id}" if submit.stop(args.job_id, args.address) else f"{args.job_id} was not running")


def _dashboard(args) -> None:
    import subprocess

    from vitrail.launch.tracking import dashboard_command

    command = dashboard_command(args.run_dirs, args.port)
    print(f"TensorBoard at http://127.0.0.1:{args.port} (Ctrl-C stops it)")
    try:
        subprocess.run(command, check=False)
    except KeyboardInterrupt:
        pass


def _report(args) -> None:
    from vitrail.launch.run_report import report

    table, written = report(args.run_dirs, args.out)
    print(f"{table}\n\nwritten: {', '.join(str(path) for path in written)}")


def _export(args) -> None:
    from vitrail.launch.export import export_run

    folder = export_run(args.path, args.out, args.which, args.format)
    print(f"exported to {folder}: model.safetensors, config.json")


def _backbones(args) -> None:
    import torch

    from vitrail import backbones

    print("| backbone | embed_dim | parameters (features only) |\n|---|---|---|")
    for name in backbones.names():
        with torch.device("meta"):  # shapes only: ViT-g/14 would take 4.5 GB
            model = backbones.create(name)
        print(f"| {name} | {model.embed_dim} | {sum(p.numel() for p in model.parameters()):,} |")


def _decode_arguments(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("--decode", action="store_true", help=f"{what}, with the decoder training uses")
    command.add_argument("--max-image-pixels", type=int, default=None, help="with --decode: images with more pixels "
                         "fail, as data.max_image_pixels skips them in training (default: its default, Pillow's "
                         "decompression-bomb limit)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="vitrail", description="Self-supervised pretraining of vision backbones: "
                                   "shard images, pretrain with DINO on Ray, evaluate frozen features with FAISS k-NN.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shard = commands.add_parser("shard", help="write, index or verify webdataset shards", description="Write images as "
                                "webdataset tar shards plus index.json (counts, classes, sha256), index shards made "
                                "elsewhere, or verify a shard folder. "
                                "Re-running on a complete folder does nothing; a partial one is finished.")
    sources = shard.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, text in (("fashion-mnist", "Fashion-MNIST's idx files to OUT/train and OUT/test"),
                       ("folder", "an image folder with one sub-folder per class to OUT"),
                       ("list", "the images a file list names to OUT")):
        sub = sources.add_parser(name, help=text, description=text)
        if name == "folder":
            sub.add_argument("src", help="folder of class sub-folders holding images (jpg, png, webp, bmp, ppm): a path, "
                             "file://, s3:// or gs://")
        elif name == "list":
            sub.add_argument("src", help="text or CSV file, one `path` or `path<TAB or comma>label` per line; "
                             "relative paths are resolved against the file's folder; the file and its paths may be "
                             "URLs (file://, s3://, gs://, http(s)://)")
        else:
            sub.add_argument("--root", default=None, help="folder holding the idx files, a path or URL (default: "
                             "$VITRAIL_DATA, then /usr/share/datasets/fashion-mnist)")
        sub.add_argument("out", help="output shard folder")
        sub.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
        sub.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default 1)")
        sub.add_argument("--limit", type=int, default=None, help="keep only the first N samples (per split)")
        if name != "fashion-mnist":
            sub.add_argument("--strict", action="store_true", help="stop, naming them, at inputs that cannot be used "
                             "(unreadable, a dangling symlink, undecodable with --decode) instead of skipping them")
            _decode_arguments(sub, "leave out (and name) every image that does not decode whole")
        sub.set_defaults(run=_shard)
    existing = sources.add_parser("index", help="index webdataset shards made elsewhere, in place",
                                  description="Write index.json (samples per shard, sha256, classes from the "
                                  "integer .cls labels) for the *.tar webdataset shards in OUT, without copying them.")
    existing.add_argument("out", help="folder holding the .tar shards")
    existing.add_argument("--workers", type=int, default=1, help="processes reading shards in parallel (default 1)")
    existing.set_defaults(run=_shard)
    verify = sources.add_parser("verify", help="re-check every shard's sha256 against index.json",
                                description="Re-check every shard's presence and sha256 against index.json.")
    verify.add_argument("out", help="shard folder holding index.json")
    _decode_arguments(verify, "also read every shard whole and decode every image, naming each that fails "
                      "(training would skip it) and each shard whose sample count differs from index.json")
    verify.set_defaults(run=_shard)

    pretrain = commands.add_parser("pretrain", help="pretrain a backbone", description="Pretrain the backbone and method "
                                   "of CONFIG. Runs on Ray (a one-node cluster on 127.0.0.1 unless --address is given); "
                                   "re-running with the same run dir resumes from its last checkpoint. One run at a "
                                   "time per run dir (RUN_DIR/.lock).")
    pretrain.add_argument("config", help="YAML recipe, e.g. configs/demo.yaml")
    pretrain.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.epochs=10 model.backbone=vit_tiny")
    pretrain.add_argument("--local", action="store_true", help="train in this process without Ray (debugging, tests)")
    pretrain.add_argument("--workers", type=int, default=None, help="Ray Train workers (overrides ray.workers)")
    pretrain.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (overrides ray.gpus_per_worker)")
    pretrain.add_argument("--address", default=None, help="existing Ray cluster, e.g. auto or ray://host:10001 (overrides ray.address)")
    pretrain.add_argument("--run-dir", default=None, help="run directory (overrides run.dir)")
    pretrain.add_argument("--no-dashboard", action="store_true", help="start the local Ray cluster without its dashboard")
    pretrain.add_argument("--reset", action="store_true", help="start over in a run dir that holds a run: its files "
                          "(checkpoints, config, metrics, results) move into RUN_DIR/reset-<time>/; without it a run dir "
                          "holding checkpoints of another model or method is refused")
    pretrain.set_defaults(run=_pretrain)

    evaluate = commands.add_parser("eval", help="evaluate frozen features", description="Evaluate the frozen features of a run.")
    protocols = evaluate.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    texts = {
        "knn": ("DINO's weighted k-NN with FAISS", "Weighted k-NN (DINO): l2-normalised features, FAISS inner-product "
                "search, neighbours vote with weight exp(sim/T)."),
        "linear": ("linear probe on frozen features", "Linear probe (DINO/DINOv2): SGD on frozen features, a grid of "
                   "learning rates trained at once, the best on a held-out 10% of train reported on test."),
        "all": ("k-NN and linear probe", "Both the k-NN and the linear probe, from one feature extraction."),
    }
    for protocol, (summary, text) in texts.items():
        sub = protocols.add_parser(protocol, help=summary, description=f"{text} Prints top-1/top-5 and writes "
                                   "results.json in the run dir (beside a released checkpoint file). Features are "
                                   "extracted once and cached, memory-mapped, in RUN_DIR/features.")
        sub.add_argument("path", nargs="?", default=None, help="run dir (its last checkpoint) or a checkpoint file (or use --checkpoint)")
        sub.add_argument("--checkpoint", default=None, help="run dir, vitrail checkpoint file, or DINO / iBOT released weights (with --arch)")
        sub.add_argument("--data", default=None, help="shard folder holding train/ and test/ shard sets (e.g. from `vitrail shard fashion-mnist`)")
        sub.add_argument("--train-shards", default=None, help="shards of the k-NN bank / probe training set (default: data.eval_train_shards)")
        sub.add_argument("--test-shards", default=None, help="shards to classify (default: data.eval_test_shards)")
        sub.add_argument("--arch", default=None, help="backbone of a released checkpoint, e.g. vit_small (vitrail runs store theirs)")
        sub.add_argument("--patch-size", type=int, default=None, help="ViT patch size of a released checkpoint (default: read from its weights)")
        sub.add_argument("--probe-features", choices=["cls", "last4", "cls_avgpool"], default=None,
                         help="linear-probe features: last CLS, CLS of the last 4 blocks, or CLS + mean patch token "
                         "(default, DINO's: last4 for ViTs below 768 wide, cls_avgpool from ViT-B up, cls otherwise)")
        sub.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="k-NN neighbours, all from one search "
                         "(default 10 20 100 200, DINO's)")
        sub.add_argument("--faiss-threads", type=int, default=None, help="FAISS search threads (default: every core this process may use)")
        sub.add_argument("--knn-memory-mb", type=int, default=512, help="k-NN working memory beside the FAISS index "
                         "(N_train x dim float32): cached features are read and searched in chunks within it (default 512)")
        sub.add_argument("--cache-dir", default=None, help="feature cache folder (default RUN_DIR/features)")
        sub.add_argument("--no-cache", action="store_true", help="extract features afresh and keep none on disk")
        sub.add_argument("--workers", type=int, default=0, help="extract over N Ray tasks on a local 127.0.0.1 cluster (default 0: in this process)")
        sub.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature T (default 0.07)")
        sub.add_argument("--epochs", type=int, default=100, help="linear-probe epochs (default 100, DINO's)")
        sub.add_argument("--resize-size", type=int, default=None, help="short side before the centre crop (default crop*256/224)")
        sub.add_argument("--crop-size", type=int, default=None, help="centre crop (default: the training crop size)")
        sub.add_argument("--baselines", action="store_true", help="also evaluate raw pixels and the randomly initialised backbone")
        sub.add_argument("--limit", type=int, default=None, help="use only the first N samples of each split")
        sub.add_argument("--device", default="cpu", help="device for feature extraction and the probe (default cpu)")
        sub.set_defaults(run=_eval)

    cluster = commands.add_parser("cluster", help="start or stop a local Ray head node",
                                  description="Start (up) or stop (down) a Ray head node on this machine, bound to 127.0.0.1, "
                                  "to try `vitrail submit` without a cluster.")
    cluster.add_argument("action", choices=["up", "down"], help="up: start the head node; down: stop that head node "
                         "(only it: other Ray clusters on the machine keep running)")
    cluster.add_argument("--num-cpus", type=int, default=None, help="CPUs the node offers (default: all)")
    cluster.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and Jobs API port, which also names the cluster for down (default 8265)")
    cluster.set_defaults(run=_cluster)

    from vitrail.launch.submit import LOCAL_ADDRESS
    submit = commands.add_parser("submit", help="submit a pretraining run as a Ray Job",
                                 description="Submit CONFIG as a Ray Job: the job pretrains (and runs the k-NN eval when "
                                 "the config names eval shards); checkpoints and results land in the config's run dir.")
    submit.add_argument("config", help="YAML recipe")
    submit.add_argument("overrides", nargs="*", help="section.key=value overrides")
    submit.add_argument("--address", default=LOCAL_ADDRESS, help=f"Ray Jobs API address (default {LOCAL_ADDRESS})")
    submit.add_argument("--no-eval", action="store_true", help="skip the k-NN evaluation after pretraining")
    submit.set_defaults(run=_submit)

    jobs = commands.add_parser("jobs", help="list, follow or stop Ray Jobs", description="Inspect the jobs of a Ray cluster.")
    jobs.add_argument("action", choices=["list", "logs", "status", "stop"], help="what to do")
    jobs.add_argument("job_id", nargs="?", help="job id (for logs, status, stop)")
    jobs.add_argument("--address", default=LOCAL_ADDRESS, help=f"Ray Jobs API address (default {LOCAL_ADDRESS})")
    jobs.add_argument("--follow", action="store_true", help="with logs: keep printing until the job ends")
    jobs.set_defaults(run=_jobs)

    dashboard = commands.add_parser("dashboard", help="TensorBoard over one or many runs, on 127.0.0.1",
                                    description="Start TensorBoard on 127.0.0.1 over the event files of RUN_DIRs "
                                    "(runs trained with run.tracking=tensorboard), one curve per run.")
    dashboard.add_argument("run_dirs", nargs="+", help="run directories")
    dashboard.add_argument("--port", type=int, default=6006, help="port on 127.0.0.1 (default 6006)")
    dashboard.set_defaults(run=_dashboard)

    compare = commands.add_parser("report", help="compare runs: a markdown table and loss / k-NN plots",
                                  description="Compare RUN_DIRs: method, backbone, steps, final loss, last online k-NN, "
                                  "and `vitrail eval` results, as a markdown table (printed and written to OUT/report.md) "
                                  "with OUT/loss.png and OUT/knn.png (metric against step, one line per run). Curves come "
                                  "from metrics.jsonl, or from the run's wandb files where it is missing.")
    compare.add_argument("run_dirs", nargs="+", help="run directories")
    compare.add_argument("--out", default="report", help="folder for report.md and the plots (default ./report)")
    compare.set_defaults(run=_report)

    exporting = commands.add_parser(
        "export", help="write a run's backbone as safetensors for timm or vitrail",
        description="Write the backbone of a run as OUT/model.safetensors + OUT/config.json (no pickle). "
        "--format timm (ViT, Swin, LeViT, ResNet): timm's key names and hub config, loaded by "
        "timm.create_model('local-dir:OUT', pretrained=True). --format torch (every backbone): vitrail's "
        "registry name and arguments, loaded by vitrail.backbones.load_exported(OUT). config.json also records "
        "the method, step, data set and the k-NN score of results.json.")
    exporting.add_argument("path", help="run dir (its latest checkpoint) or a checkpoint file")
    exporting.add_argument("out", help="folder to write")
    exporting.add_argument("--which", choices=("teacher", "student"), default=None,
                           help="network to export (default: the one vitrail evaluates: DINO/iBOT's teacher, "
                           "BYOL's online network)")
    exporting.add_argument("--format", choices=("timm", "torch"), default="timm", help="default: timm")
    exporting.set_defaults(run=_export)

    listing = commands.add_parser("backbones", help="list the registered backbones with parameter counts",
                                  description="List the registered backbones with their feature width and parameter count.")
    listing.set_defaults(run=_backbones)
    return root


def main(argv: list[str] | None = None) -> int:
    root = parser()
    args, extra = root.parse_known_args(argv)
    # argparse stops filling `overrides` at the first option, so `pretrain CONFIG --workers 2 optim.lr=0.001`
    # leaves the override over: it joins the others.
    if extra and hasattr(args, "overrides") and not any(item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        root.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args)
    except VitrailError as error:
        print(f"vitrail: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
