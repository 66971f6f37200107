"""The k-NN search of cached features in a spawned process of its own.

pip's torch and faiss-cpu each ship their own libgomp, so a process that has run a backbone
holds two OpenMP thread pools that compete for the same cores. The search process reads the
memory-mapped features from disk, keeps torch single-threaded (it only normalises and counts
votes) and gives FAISS every core, set explicitly.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def knn_in_subprocess(train_folder: Path, test_folder: Path, columns: slice = slice(None), ks=(10, 20, 100, 200),
                      temperature: float = 0.07, max_memory_mb: int = 512, num_threads: int | None = None,
                      test_label_map=None):
    """({k: {"top1", "top5"}}, pid of the process that searched) for features cached in two folders.

    `columns` picks the k-NN features out of wider cached ones (a probe's concatenated CLS tokens);
    `test_label_map[label]`, when given, is a test label's number in the train class list.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_search, train_folder, test_folder, columns, tuple(ks), temperature, max_memory_mb,
                           num_threads, test_label_map).result()


def _search(train_folder, test_folder, columns, ks, temperature, max_memory_mb, num_threads, test_label_map):
    import torch

    from vitrail.eval import cache
    from vitrail.eval.knn import knn_classify_multi_k

    torch.set_num_threads(1)
    train, test = cache.load(Path(train_folder)), cache.load(Path(test_folder))
    # The memmaps go in as they are: the search reads them a chunk at a time.
    test_labels = test.labels if test_label_map is None else test_label_map[test.labels]
    accuracies = knn_classify_multi_k(train.features[:, columns], train.labels, test.features[:, columns],
                                      test_labels, ks=ks, temperature=temperature, max_memory_mb=max_memory_mb,
                                      num_threads=num_threads or len(os.sched_getaffinity(0)))
    return accuracies, os.getpid()
