"""Peak memory of the k-NN search on a memory-mapped ImageNet-sized feature cache, side by side.

    python benchmarks/knn_memory.py [--train 1281167] [--dim 768] [--queries 1000] [--budget-mb 512]

Writes an (N, D) float32 memmap of clustered features (ImageNet-1k's 1,281,167 x ViT-B's 768 by
default, 3.9 GB) to a temp dir, then runs two searches of the same queries, each in a fresh
process, and samples the process's anonymous resident memory (RssAnon: the memmap's own pages
are file-backed and the kernel may drop them) every 20 ms:

  whole copy  what the search did before: the memmap copied into RAM, normalised as a whole,
              then added to the FAISS index
  vitrail     `knn_predict` on the memmap itself: the train set normalised and the queries searched in
              chunks within `--budget-mb`

Both must give identical predictions. The figure that matters is the peak over the index
(N x D x 4 bytes, which any exact search must hold) against the stated budget.
"""

import argparse
import multiprocessing
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

MiB = 2**20


def _anonymous_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _search(path, labels_path, queries_path, budget_mb, whole_copy):
    import torch
    import torch.nn.functional as F

    from vitrail.eval.knn import knn_predict

    torch.set_num_threads(1)
    peak, done = [_anonymous_rss()], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak.append(_anonymous_rss())

    sampler = threading.Thread(target=sample, daemon=True)
    features = np.load(path, mmap_mode="r")
    labels, queries = np.load(labels_path), np.load(queries_path)
    before = _anonymous_rss()
    sampler.start()
    start = time.perf_counter()
    if whole_copy:  # the raw copy stays alive beside the normalised one, as it did
        raw = np.array(features)
        features = F.normalize(torch.from_numpy(raw), dim=1)
    predictions = knn_predict(features, labels, queries, (20,), max_memory_mb=budget_mb)[20]
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return max(peak) - before, seconds, predictions.numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--budget-mb", type=int, default=512)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        features = np.lib.format.open_memmap(folder / "train.npy", "w+", np.float32, (args.train, args.dim))
        labels = rng.integers(args.classes, size=args.train)
        for start in range(0, args.train, 65536):
            rows = labels[start:start + 65536]
            features[start:start + 65536] = centers[rows] + 4.0 * rng.standard_normal((len(rows), args.dim), dtype=np.float32)
        features.flush()
        del features
        np.save(folder / "labels.npy", labels)
        query_labels = rng.integers(args.classes, size=args.queries)
        np.save(folder / "queries.npy", centers[query_labels] + 4.0 * rng.standard_normal((args.queries, args.dim), dtype=np.float32))

        index_mib = args.train * args.dim * 4 / MiB
        print(f"{args.train:,} x {args.dim} float32 train features ({index_mib:,.0f} MiB memmap), "
              f"{args.queries:,} queries, k=20, budget {args.budget_mb} MiB\n")
        print("| search | peak anonymous memory | over the index | seconds |\n|---|---:|---:|---:|")
        results = {}
        for name, whole_copy in (("whole copy (before)", True), ("vitrail knn_predict", False)):
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                peak, seconds, predictions = pool.submit(
                    _search, folder / "train.npy", folder / "labels.npy",
                    folder / "queries.npy", args.budget_mb, whole_copy).result()
            results[name] = predictions
            print(f"| {name} | {peak / MiB:,.0f} MiB | {peak / MiB - index_mib:,.0f} MiB | {seconds:.1f} |", flush=True)
        first, second = results.values()
        if not np.array_equal(first, second):
            raise SystemExit("the two searches disagree")
        print("\npredictions identical")


if __name__ == "__main__":
    main()
