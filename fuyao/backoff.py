"""The one retry delay of every fuyao loop, after client-go's ``wait.Backoff``: start at ``initial``, multiply by
``factor`` after each failure up to ``cap``, add up to ``jitter`` x the delay at random (so replicas that failed
together do not retry together), and start over after a success.

Used by the device plugin's node publisher, kubelet registration and discovery, and by every list + watch
(``fuyao.kube_watch``: the extender's informers, the router's and the KV index's discovery, the NPU operator).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays for retrying one thing. ``next()`` after a failure gives the time to wait and grows the following
    one; ``reset()`` after a success (or when what is retried changed) starts over; ``failures`` counts failures
    in a row, for logs and readiness.

    Jitter is added on top of the delay, as client-go does: a delay ``d`` becomes ``d x (1 + jitter x U[0, 1))``.
    """

    initial: float
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.0
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)
    failures: int = field(default=0, init=False)
    _current: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.initial <= 0:
            raise ValueError(f"backoff initial delay must be positive, got {self.initial}")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be at least 1, got {self.factor}")
        if self.cap < self.initial:
            raise ValueError(f"backoff cap {self.cap} is below its initial delay {self.initial}")
        if self.jitter < 0:
            raise ValueError(f"backoff jitter must not be negative, got {self.jitter}")
        self._current = self.initial

    @property
    def current(self) -> float:
        """The delay the next failure will get (without jitter)."""
        return self._current

    def next(self) -> float:
        """A failure: the delay to wait now; the following one grows by ``factor`` up to ``cap``."""
        delay = self._current
        self.failures += 1
        self._current = min(self._current * self.factor, self.cap)
        if self.jitter:
            delay *= 1.0 + self.jitter * self.rand()
        return delay

    def reset(self) -> None:
        """A success: the next failure waits ``initial`` again."""
        self._current = self.initial
        self.failures = 0
