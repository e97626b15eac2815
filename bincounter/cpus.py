"""How many CPUs this process may really use: its affinity, capped by the cgroup CPU quota.

In a pod, ``os.sched_getaffinity`` and ``os.cpu_count`` report the node's cores, not the pod's
CPU limit: sizing a thread or process pool by them on a 64-core node with a 2-CPU limit means
64 workers throttled to 2 CPUs. The model server sizes torch's threads by this, and split its
processes.
"""

from __future__ import annotations

import math
import os


def cpu_limit() -> int:
    """CPUs this process may use: its affinity, capped by the cgroup CPU quota (a pod's CPU limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for read in (_cgroup_v2_quota, _cgroup_v1_quota):
        try:
            quota = read()
        except (OSError, ValueError):
            continue
        if quota is not None:
            return min(cpus, max(1, math.ceil(quota)))
    return cpus


def _cgroup_v2_quota() -> float | None:
    with open("/sys/fs/cgroup/cpu.max") as f:
        quota, period = f.read().split()
    return None if quota == "max" else int(quota) / int(period)


def _cgroup_v1_quota() -> float | None:
    with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as g:
        quota, period = int(f.read()), int(g.read())
    return None if quota <= 0 else quota / period
