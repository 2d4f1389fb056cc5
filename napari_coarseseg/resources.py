"""Will it fit? Memory and disk space, checked before work starts.

A run that cannot fit should be refused in one line before it allocates or
writes anything, not killed by the kernel after a minute or stopped by a full
disk at its first checkpoint. The estimates here are upper bounds of what a
step or an output needs; what is free is

    free memory = min(MemAvailable, cgroup limit - cgroup usage, address-space limit - address space in use)

on a Linux CPU (each term where the system reports it: ``/proc/meminfo``,
``/sys/fs/cgroup/memory.max``, ``ulimit -v``), the CUDA allocator's free memory
on a GPU, and unknown elsewhere (macOS, Windows, Apple MPS), where nothing is
refused; free disk space is :func:`shutil.disk_usage`.
"""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

__all__ = ["ResourceError", "free_memory", "check_memory", "check_free_space", "gigabytes"]


class ResourceError(ValueError):
    """A run that would not fit in the memory or on the disk there is; the message says what to change."""


def gigabytes(n_bytes: float) -> str:
    """``"1.5 GB"``, ``"320 MB"``, ``"12 kB"``: a size for a message.

    Examples
    --------
    >>> gigabytes(1.5e9), gigabytes(3.2e8), gigabytes(12e3)
    ('1.5 GB', '320 MB', '12 kB')
    """
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.1f} GB"
    return f"{n_bytes / 1e6:.0f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.0f} kB"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_left() -> int | None:
    """What ``ulimit -v`` (RLIMIT_AS) leaves to this process, or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return None
    return max(soft - used, 0)


def free_memory(device=None) -> int | None:
    """Bytes this process can still allocate on ``device`` (a torch device or its name; default the CPU), or None
    where the system does not say."""
    kind = getattr(device, "type", str(device or "cpu")).split(":")[0]
    if kind == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if kind != "cpu":
        return None
    limits = [_meminfo("MemAvailable"), _address_space_left()]
    # cgroup v2 (containers, systemd slices); v1 keeps its limit elsewhere.
    cgroup_limit = _read_int("/sys/fs/cgroup/memory.max")
    if cgroup_limit is None:
        cgroup_limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        usage = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    else:
        usage = _read_int("/sys/fs/cgroup/memory.current")
    if cgroup_limit is not None and usage is not None and cgroup_limit < 2**60:
        limits.append(max(cgroup_limit - usage, 0))
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def check_memory(needed: float, device, what: str, advice: str) -> None:
    """Refuse, in one line, work that needs ``needed`` bytes on ``device`` when less is free.

    ``what`` says what needs the memory (and why that much), ``advice`` what to
    change; nothing is refused where :func:`free_memory` does not know.

    Examples
    --------
    >>> check_memory(1, "cpu", "a test", "nothing")  # one byte is always free
    >>> check_memory(1e18, "cpu", "an exabyte", "ask for less")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    napari_coarseseg.resources.ResourceError: an exabyte needs about 1000000000.0 GB of memory ...
    """
    free = free_memory(device)
    if free is not None and needed > free:
        raise ResourceError(f"{what} needs about {gigabytes(needed)} of memory but {gigabytes(free)} is free "
                            f"on {getattr(device, 'type', device)}; {advice}")


def check_free_space(folder, needed: float, what: str) -> None:
    """Refuse, in one line, writing ``needed`` bytes (``what``) into ``folder`` when its disk has less free.

    Examples
    --------
    >>> import tempfile
    >>> check_free_space(tempfile.gettempdir(), 1, "one byte")
    """
    folder = Path(folder)
    while not folder.exists():  # a folder still to be made is on its nearest parent's disk
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ResourceError(f"{what}: about {gigabytes(needed)} to write on the disk of {str(folder)!r}, but "
                            f"{gigabytes(free)} is free; free some space or write elsewhere")
