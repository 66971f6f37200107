"""Weighted k-NN (DINO protocol), side by side: DINO's torch reference, a tuned torch version, vitrail's FAISS.

    python benchmarks/knn.py [--train 60000] [--queries 10000] [--dim 384] [--k 20]

(a) the protocol as DINO's eval_knn.py computes it (written here from its description): the
    test set in 100 chunks, each a matmul against the whole train set, topk, the neighbours'
    labels gathered, a (chunk * k, classes) one-hot scaled by exp(sim / T) and summed;
(b) the same with 1024-query chunks and a scatter-add of the votes (this project's tuned torch);
(c) vitrail's `knn_predict` (FAISS's exact search, `faiss.knn`);
(d) the same in a fresh process that imports faiss plainly, leaving its bundled OpenBLAS to
    detect the CPU (what vitrail did before `vitrail.faiss_blas`; on a CPU that OpenBLAS
    does not know, its SSE3 'Prescott' kernels).
All run on the same clustered float32 features with the same number of threads, must give
identical predictions, and are timed end to end (normalisation, search, votes); the best of
`--repeats` runs is kept because other processes may share the CPU.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitrail.faiss_blas import openblas_kernels
from vitrail.eval.knn import knn_predict


def dino_reference_predict(train_features, train_labels, test_features, k, temperature, num_classes, num_chunks=100):
    train_features = F.normalize(train_features, dim=1).T  # (D, N_train)
    test_features = F.normalize(test_features, dim=1)
    per_chunk = max(1, len(test_features) // num_chunks)
    one_hot = torch.zeros(per_chunk * k, num_classes)
    predictions = []
    for start in range(0, len(test_features), per_chunk):
        queries = test_features[start:start + per_chunk]
        similarities, neighbours = (queries @ train_features).topk(k, dim=1, largest=True, sorted=True)
        neighbour_labels = torch.gather(train_labels.view(1, -1).expand(len(queries), -1), 1, neighbours)
        one_hot.resize_(len(queries) * k, num_classes).zero_()
        one_hot.scatter_(1, neighbour_labels.view(-1, 1), 1)
        weights = (similarities / temperature).exp()
        votes = (one_hot.view(len(queries), k, num_classes) * weights.view(len(queries), k, 1)).sum(dim=1)
        # Stable, so classes without votes rank by index as in vitrail (DINO's sort leaves their order open).
        predictions.append(votes.sort(dim=1, descending=True, stable=True).indices[:, :min(5, k)])
    return torch.cat(predictions)


def chunked_torch_predict(train_features, train_labels, test_features, k, temperature, num_classes, chunk):
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    predictions = []
    for queries in test_features.split(chunk):
        similarities, neighbours = (queries @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes).scatter_add_(
            1, train_labels[neighbours], (similarities / temperature).exp())
        predictions.append(votes.sort(dim=1, descending=True, stable=True).indices[:, :min(5, k)])
    return torch.cat(predictions)


PLAIN_FAISS = """
import json, sys, time
import faiss  # before vitrail: its OpenBLAS loads as plain `import faiss` leaves it, whatever vitrail sets later
import torch
from vitrail.eval import knn
from vitrail.faiss_blas import openblas_kernels
folder, k, temperature, classes, threads, repeats = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
train, labels, test = (torch.load(f"{folder}/{name}.pt") for name in ("train", "labels", "test"))
seconds = []
for _ in range(repeats):
    start = time.perf_counter()
    predictions = knn.knn_predict(train, labels, test, (k,), temperature, classes, num_threads=threads)[k]
    seconds.append(time.perf_counter() - start)
torch.save(predictions, f"{folder}/plain.pt")
print(json.dumps({"seconds": min(seconds), "kernels": openblas_kernels()}))
"""


def plain_faiss_time(train_features, train_labels, test_features, k, temperature, num_classes, threads, repeats):
    """(seconds, predictions, OpenBLAS kernels) of `knn_predict` in a fresh process whose faiss was imported plainly."""
    env = {name: value for name, value in os.environ.items() if name != "OPENBLAS_CORETYPE"}
    with tempfile.TemporaryDirectory() as folder:
        for name, tensor in (("train", train_features), ("labels", train_labels), ("test", test_features)):
            torch.save(tensor, Path(folder) / f"{name}.pt")
        result = subprocess.run([sys.executable, "-c", PLAIN_FAISS, folder, str(k), str(temperature), str(num_classes),
                                 str(threads), str(repeats)], env=env, check=True, capture_output=True, text=True)
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        return measured["seconds"], torch.load(Path(folder) / "plain.pt"), measured["kernels"]


def best_time(run, repeats):
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    return min(seconds), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--torch-chunk", type=int, default=1024, help="queries per similarity block of (b)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(args.classes, args.dim, generator=generator)
    labels = torch.randint(args.classes, (args.train + args.queries,), generator=generator)
    features = centers[labels] + 4.0 * torch.randn(args.train + args.queries, args.dim, generator=generator)
    train_features, train_labels = features[:args.train], labels[:args.train]
    test_features, test_labels = features[args.train:], labels[args.train:]
    protocol = (train_features, train_labels, test_features, args.k, args.temperature, args.classes)

    runs = {
        "vitrail knn_predict (faiss.knn)": lambda: knn_predict(
            train_features, train_labels, test_features, (args.k,), args.temperature, args.classes,
            num_threads=threads)[args.k],
        f"torch chunked mm + topk (chunk {args.torch_chunk})": lambda: chunked_torch_predict(*protocol, args.torch_chunk),
        "DINO eval_knn.py reference (100 chunks)": lambda: dino_reference_predict(*protocol),
    }
    timings = {name: best_time(run, args.repeats) for name, run in runs.items()}
    plain_seconds, plain_predictions, plain_kernels = plain_faiss_time(*protocol[:3], args.k, args.temperature,
                                                                       args.classes, threads, args.repeats)
    timings[f"vitrail knn_predict, faiss imported plainly (its OpenBLAS: {plain_kernels} kernels)"] = (
        plain_seconds, plain_predictions)
    (faiss_name, (faiss_seconds, faiss_predictions)), *others = timings.items()
    for name, (_, predictions) in others:
        if not torch.equal(faiss_predictions, predictions):
            differing = (faiss_predictions != predictions).any(dim=1).sum().item()
            raise SystemExit(f"FAISS and {name} disagree on {differing} of {args.queries} queries")

    top1 = 100.0 * (faiss_predictions[:, 0] == test_labels).float().mean().item()
    print(f"{args.train} x {args.dim} train, {args.queries} queries, k={args.k}, {threads} threads, "
          f"top-1 {top1:.2f} %, predictions identical; vitrail's FAISS runs OpenBLAS's {openblas_kernels()} kernels\n")
    print("| method | seconds | queries/s | FAISS speed-up over it |\n|---|---:|---:|---:|")
    for name, (seconds, _) in reversed(timings.items()):
        print(f"| {name} | {seconds:.2f} | {args.queries / seconds:,.0f} | {seconds / faiss_seconds:.2f}x |")

    # Any exact search computes every query-train similarity in float32: a floor set by the CPU's GEMM peak.
    square = torch.randn(4096, 4096)
    peak_seconds, _ = best_time(lambda: square @ square, args.repeats)
    peak = 2 * 4096**3 / peak_seconds
    flops = 2 * args.queries * args.train * args.dim
    torch_seconds = timings[f"torch chunked mm + topk (chunk {args.torch_chunk})"][0]
    print(f"\nfloat32 GEMM peak of this CPU (4096^3, {threads} threads): {peak / 1e9:,.0f} GFLOP/s; FAISS runs the "
          f"{flops / 1e9:,.1f} GFLOP similarity product at {flops / faiss_seconds / 1e9:,.0f} GFLOP/s. At the peak it "
          f"takes {flops / peak:.2f} s, {torch_seconds / (flops / peak):.2f}x faster than the chunked torch version.")


if __name__ == "__main__":
    main()
