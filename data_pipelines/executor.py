"""Executors run a stage: a list of independent tasks, each a picklable call of a
module-level function. `local` uses a process pool (one worker per core by
default); `ray` submits Ray tasks to the cluster at `executor.ray.address` (or a
local Ray). Both skip tasks whose completion marker exists, so a rerun after a
crash does only the unfinished work; a task writes its outputs under temporary
names and its marker last."""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from data_pipelines import io as dio
from data_pipelines.config import ExecutorConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    fn: Callable[..., dict[str, Any]]  # returns a JSON-able result (stats)
    args: tuple
    marker: str  # written with the result once the task's outputs are committed


def run_task(task: Task) -> dict[str, Any]:
    if dio.exists(task.marker):
        return dio.read_json(task.marker)
    result = task.fn(*task.args)
    dio.write_json(task.marker, result)
    return result


class Executor:
    def __init__(self, cfg: ExecutorConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None
        self._ray = None

    def map(self, tasks: list[Task], desc: str) -> list[dict[str, Any]]:
        """Runs the tasks (skipping finished ones); results in task order."""
        results: list[dict[str, Any] | None] = [None] * len(tasks)
        pending = []
        for i, task in enumerate(tasks):
            if dio.exists(task.marker):
                results[i] = dio.read_json(task.marker)
            else:
                pending.append(i)
        if pending and len(pending) < len(tasks):
            log.info("%s: %d of %d tasks already done, running the rest", desc, len(tasks) - len(pending), len(tasks))
        bar = _bar(len(tasks), len(tasks) - len(pending), desc, self.progress)
        run = self._run_ray if self.cfg.kind == "ray" else self._run_local
        for i, result in run([tasks[i] for i in pending], pending):
            results[i] = result
            bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]

    def _run_local(self, tasks: list[Task], indices: list[int]):
        if not tasks:
            return
        if self.cfg.num_workers == 1 or len(tasks) == 1:
            for i, task in zip(indices, tasks):
                yield i, run_task(task)
            return
        if self._pool is None:
            # fork starts fastest and works from any __main__ (a REPL, stdin); but a parent
            # that imported JAX holds threads fork would break, so then spawn.
            context = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
            self._pool = ProcessPoolExecutor(max_workers=self.cfg.num_workers, mp_context=context)
        futures = {self._pool.submit(run_task, t): i for i, t in zip(indices, tasks)}
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                yield futures.pop(future), future.result()

    def _run_ray(self, tasks: list[Task], indices: list[int]):
        if not tasks:
            return
        import ray

        if self._ray is None:
            if not ray.is_initialized():
                kwargs = {"address": self.cfg.ray.address} if self.cfg.ray.address else {"num_cpus": self.cfg.num_workers}
                ray.init(**kwargs, include_dashboard=False, log_to_driver=False)
            self._ray = ray.remote(num_cpus=1, max_retries=2)(run_task)
        refs = {self._ray.remote(t): i for i, t in zip(indices, tasks)}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                yield refs.pop(ref), ray.get(ref)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="task", disable=not enabled, leave=True)
