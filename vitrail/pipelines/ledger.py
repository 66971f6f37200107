"""The bad-data counts of a run, kept beside its batches: per (epoch, shard), the samples skipped
and extra. A plain object in the local launcher; under Ray one actor, made on the driver, which
the view tasks on every node and the training workers call. This module imports no torch, so the
actor's process starts in 2.4 s of CPU instead of 4.5 (BENCHMARKS.md, "The suite's wall time")."""

from __future__ import annotations


class ShardLedger:
    """Per (epoch, shard): its samples skipped and extra, and under Ray how often its view task
    started. A shard's counts are set, not added to: a retried view task, or a restarted worker
    group reading its epoch again, counts each shard once."""

    def __init__(self):
        self.counts: dict[tuple[int, str], tuple[int, int]] = {}
        self.started: dict[tuple[int, int, str], int] = {}
        self.datasets = 0

    def record(self, epoch: int, path: str, skipped: int, extra: int) -> None:
        self.counts[(epoch, path)] = (skipped, extra)

    def totals(self) -> dict[str, int]:
        """{"skipped": n, "extra": m} over every shard recorded so far."""
        return {"skipped": sum(skipped for skipped, _ in self.counts.values()),
                "extra": sum(extra for _, extra in self.counts.values())}

    def new_dataset(self) -> int:
        """An id for the view tasks of one dataset: each worker-group start builds its own, whose
        tasks get their full retries again."""
        self.datasets += 1
        return self.datasets

    def start(self, dataset: int, epoch: int, path: str) -> int:
        """Registers a view task's start; returns how many starts of its (epoch, shard) came before it.
        A task killed by the OS or by a crash in native code cannot say which shard it held; its retry
        can, and the last retry Ray allows fails the run naming the shard instead of dying once more."""
        before = self.started.get((dataset, epoch, path), 0)
        self.started[(dataset, epoch, path)] = before + 1
        return before


class RemoteLedger:
    """A ShardLedger in a Ray actor, with ShardLedger's methods (each call waits for its answer):
    one made on the driver serves the view tasks on every node and the training workers. It lives
    as long as the process that made it."""

    def __init__(self):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the maker's node: a run that survives losing a worker node keeps its ledger.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = ray.remote(num_cpus=0, scheduling_strategy=here)(ShardLedger).remote()

    def __getattr__(self, name: str):
        # Dunder look-ups (pickle, copy) and a half-unpickled instance must not reach the actor.
        if name.startswith("_") or not callable(getattr(ShardLedger, name, None)):
            raise AttributeError(name)
        import ray

        method = getattr(self.actor, name)
        return lambda *args: ray.get(method.remote(*args))
