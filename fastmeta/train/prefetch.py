"""Episodes made while the step runs: a background thread builds episode i + 1 (sampling, decoding,
normalisation, augmentation) while the meta-step on episode i computes.

Episode i of a run's episode set is a function of i alone (its seed is mixed from the run's seed and i), so
building it early, on another thread, gives the same tensors as building it in turn: the run, its seeds and
--resume are exactly as without prefetching. The thread runs torch ops, which release the GIL."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["Prefetcher"]


class Prefetcher:
    """`episodes[i]` for i = start, start + 1, ..., each built one step ahead on a background thread.

    get(i) returns episodes[i] and starts building episodes[i + 1] (when i + 1 < stop); `waited` is the
    seconds get() spent waiting for an episode that was not ready yet (the time the loop lost to episodes).
    Use as a context manager, or call close()."""

    def __init__(self, episodes: Any, start: int, stop: int) -> None:
        self.episodes, self.stop = episodes, stop
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmeta-episodes")
        self.next: tuple[int, Future] | None = None
        self.waited = 0.0
        if start < stop:
            self._submit(start)

    def _submit(self, i: int) -> None:
        self.next = (i, self.pool.submit(self.episodes.__getitem__, i))

    def get(self, i: int) -> Any:
        """episodes[i]; an error raised building it is raised here."""
        tic = time.perf_counter()
        if self.next is not None and self.next[0] == i:
            batch = self.next[1].result()
        else:  # not the one built ahead (a caller that skipped): build it now
            if self.next is not None:
                self.next[1].cancel()
            batch = self.episodes[i]
        self.waited += time.perf_counter() - tic
        self.next = None
        if i + 1 < self.stop:
            self._submit(i + 1)
        return batch

    def close(self) -> None:
        """Stops the thread (an episode being built is finished and dropped)."""
        if self.next is not None:
            self.next[1].cancel()
            self.next = None
        self.pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
