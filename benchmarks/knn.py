"""Weighted k-NN (DINO protocol): vitrail's FAISS search vs a chunked torch matmul, side by side.

    python benchmarks/knn.py [--train 60000] [--queries 10000] [--dim 384] [--k 20]

Both run on the same clustered float32 features with the same number of threads, must give
identical predictions, and are timed end to end (normalisation, search, votes); the best of
`--repeats` runs is kept because other processes share the CPU.
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F

from vitrail.eval.knn import knn_predict


def torch_knn_predict(train_features, train_labels, test_features, k, temperature, num_classes, chunk):
    """The same protocol with torch only: (chunk, N_train) similarity blocks, topk, weighted votes."""
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    predictions = []
    for queries in test_features.split(chunk):
        similarities, neighbours = (queries @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes).scatter_add_(
            1, train_labels[neighbours], (similarities / temperature).exp())
        predictions.append(votes.sort(dim=1, descending=True, stable=True).indices[:, :min(5, k)])
    return torch.cat(predictions)


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
    parser.add_argument("--torch-chunk", type=int, default=1024, help="queries per similarity block")
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

    faiss_seconds, faiss_predictions = best_time(lambda: knn_predict(
        train_features, train_labels, test_features, (args.k,), args.temperature, args.classes,
        num_threads=threads)[args.k], args.repeats)
    torch_seconds, torch_predictions = best_time(lambda: torch_knn_predict(
        train_features, train_labels, test_features, args.k, args.temperature, args.classes,
        args.torch_chunk), args.repeats)
    if not torch.equal(faiss_predictions, torch_predictions):
        differing = (faiss_predictions != torch_predictions).any(dim=1).sum().item()
        raise SystemExit(f"FAISS and torch disagree on {differing} of {args.queries} queries")

    top1 = 100.0 * (faiss_predictions[:, 0] == test_labels).float().mean().item()
    print(f"{args.train} x {args.dim} train, {args.queries} queries, k={args.k}, {threads} threads, "
          f"top-1 {top1:.2f} %, predictions identical\n")
    print("| method | seconds | queries/s | speed-up |\n|---|---:|---:|---:|")
    print(f"| torch chunked mm + topk (chunk {args.torch_chunk}) | {torch_seconds:.2f} | "
          f"{args.queries / torch_seconds:,.0f} | 1.00x |")
    print(f"| vitrail FAISS IndexFlatIP | {faiss_seconds:.2f} | {args.queries / faiss_seconds:,.0f} | "
          f"{torch_seconds / faiss_seconds:.2f}x |")


if __name__ == "__main__":
    main()
