"""The cores this process may use: its CPU affinity, counted in physical cores where the machine says which
logical CPUs share one (torch's own default counts physical cores too), and capped by a cgroup CPU quota (a
container's `--cpus`). Linux files are read where they exist; elsewhere `os.cpu_count()`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Cores:
    count: int      # what the process may keep busy at once
    why: str        # in words: "2 physical cores of the CPU affinity", "cgroup quota 1.5 CPUs"


def usable(sys_cpu: Path = SYS_CPU, cgroup: Path = CGROUP, proc_cgroup: Path = PROC_CGROUP) -> Cores:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
        return Cores(n, f"{n} CPUs")
    physical = _physical(cpus, sys_cpu)
    if physical < len(cpus):
        count, why = physical, f"{physical} physical cores of the {len(cpus)} CPUs this process may run on"
    else:
        count, why = len(cpus), f"{len(cpus)} CPUs this process may run on"
    quota = cgroup_quota(cgroup, proc_cgroup)
    if quota is not None and int(quota) < count:
        count, why = max(1, int(quota)), f"a cgroup CPU quota of {quota:g} CPUs"
    return Cores(count, why)


def _physical(cpus: list[int], sys_cpu: Path) -> int:
    """Distinct (package, core) pairs among `cpus`; len(cpus) where the topology files are missing."""
    cores = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def cgroup_quota(cgroup: Path = CGROUP, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs the cgroup lets this process use per period (`cpu.max` of cgroup v2, `cpu.cfs_quota_us` /
    `cpu.cfs_period_us` of v1), at its own cgroup's path and at the root a container sees; None: no limit."""
    own = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and not controllers:
                own = path.lstrip("/")
    except OSError:
        pass
    limits = []
    for folder in {cgroup / own, cgroup}:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                limits.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
        try:
            quota = int((folder / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu" / "cpu.cfs_period_us").read_text())
            if quota > 0 and period > 0:
                limits.append(quota / period)
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def load_average() -> float | None:
    """The 1-minute load average (processes running or waiting to run), None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
