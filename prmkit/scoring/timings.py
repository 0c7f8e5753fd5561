"""Where a scoring run's time goes: start-up, model loading, tokenizing, forward passes and writing.

Each stage adds up the seconds spent in it: ``model_load`` (the config, the architecture's code, the weights onto the
device, the tokenizer, the model's identity hash), ``tokenize`` (reading, validating and tokenizing input),
``forward`` (forward passes, to the last device synchronisation) and ``write`` (output lines and state commits).
``startup`` is the rest of the time since the run began (the interpreter, importing torch and transformers, CUDA
initialisation, the config, the input's fingerprint and the output's state), so the five add up to the wall time up
to the summary. A command-line run begins when its process started; a run from Python when its :class:`Timings` was
made.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STAGES = ("model_load", "tokenize", "forward", "write")


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            stat = fh.read()
        # Field 22 (starttime, in clock ticks since boot) follows the command name, which may hold spaces.
        started = int(stat[stat.rindex(b")") + 2 :].split()[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass
class Timings:
    origin: float = field(default_factory=time.perf_counter)
    """perf_counter() at the start of the run."""
    model_load: float = 0.0
    tokenize: float = 0.0
    forward: float = 0.0
    write: float = 0.0

    @classmethod
    def since_process_start(cls) -> Timings:
        age = process_age()
        return cls(origin=time.perf_counter() - age) if age is not None else cls()

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` more in stage ``name`` (one of :data:`STAGES`)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}")
        setattr(self, name, getattr(self, name) + seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the time spent in the ``with`` block in stage ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def to_dict(self) -> dict[str, float]:
        """Seconds per stage, ``startup`` being the rest of the wall time so far."""
        total = time.perf_counter() - self.origin
        spent = {name: getattr(self, name) for name in STAGES}
        return {
            "startup": round(max(0.0, total - sum(spent.values())), 3),
            **{k: round(v, 3) for k, v in spent.items()},
        }
