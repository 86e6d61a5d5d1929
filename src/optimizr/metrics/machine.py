"""What the CPUs a run may use did during it, from ``/proc/stat`` (Linux).

The run's own CPU time (its processes') says how much CPU it got, not why it got
no more. Read beside the CPUs' own counters it does: the CPU time those CPUs gave
to any process, minus the run's, is what other processes took (contention); the
time the hypervisor ran other guests is ``steal``; idle time while a task waited
for a disk is ``iowait``. The analysis tells contention from slow storage by
these figures (issue 10, item 12) instead of guessing from the run's alone.

Measured only when the CPUs the process may use (its affinity mask) are all it may
use: under a cgroup quota smaller than the mask, those CPUs also serve other
groups without taking anything from this one, so "others" would mean nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuTimes:
    """Seconds, summed over the CPUs read."""

    busy: float  # user, nice, system, irq, softirq (guest time is inside user)
    iowait: float
    steal: float


@dataclass(frozen=True)
class MachineCpuStatistics:
    cpus: int
    busy_seconds: float
    iowait_seconds: float
    steal_seconds: float


def read_cpu_times(cpus: frozenset[int], stat: Path = Path("/proc/stat")) -> CpuTimes | None:
    """The counters of ``cpus`` now, or None where /proc/stat cannot say."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = iowait = steal = 0
    seen = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        if int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in rest.split()]
        if len(values) < 8:
            return None
        user, nice, system, _idle, io, irq, softirq, st = values[:8]
        busy += user + nice + system + irq + softirq
        iowait += io
        steal += st
        seen += 1
    if seen != len(cpus):
        return None
    return CpuTimes(busy / _TICK, iowait / _TICK, steal / _TICK)


class MachineCpuSampler:
    """Reads the counters of the run's CPUs at ``start`` and ``stop``."""

    def __init__(self, usable_cpus: int) -> None:
        try:
            mask = frozenset(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            mask = frozenset()
        # A quota below the mask (see the module docstring): nothing to measure.
        self.cpus = mask if mask and len(mask) == usable_cpus else frozenset()
        self._start: CpuTimes | None = None

    def start(self) -> MachineCpuSampler:
        self._start = read_cpu_times(self.cpus) if self.cpus else None
        return self

    def stop(self) -> MachineCpuStatistics | None:
        if self._start is None:
            return None
        end = read_cpu_times(self.cpus)
        if end is None:
            return None
        return MachineCpuStatistics(
            cpus=len(self.cpus),
            busy_seconds=max(0.0, end.busy - self._start.busy),
            iowait_seconds=max(0.0, end.iowait - self._start.iowait),
            steal_seconds=max(0.0, end.steal - self._start.steal),
        )
