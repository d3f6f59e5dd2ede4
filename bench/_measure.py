"""Peak memory of a command and of the processes it starts, read from /proc (shared by the benchmarks).

:func:`run_measured` starts a command (an ``rcat-ray`` subcommand, unchanged) as a subprocess and, every
``every`` seconds until it exits, reads ``VmHWM`` (the peak resident set size the kernel keeps for each
process) from ``/proc/<pid>/status`` for the command's process (the *driver*) and for every process that
descends from it: a local Ray instance started by the driver (``gcs_server``, ``raylet``, the dashboard and its
agents) and Ray's worker processes (children of the raylet) all do, while Ray instances of other programs on
the machine do not. Descent is decided by walking ``/proc/<pid>/stat``'s parent pids, once per process
(identified by pid and start time, so a reused pid is a new process). VmHWM only grows, so the last reading
before a process exits is its peak, up to one interval: a peak within the last ``every`` seconds of a
process's life can be missed.

Ray workers are told from Ray's own system processes by their command line: Ray sets a worker's process
title to ``ray::<actor class or task>`` (``ray::RayTrainWorker``, ``ray::MapWorker(...)``, ``ray::IDLE``
while it waits for work); the title a worker had when its peak was last raised is kept with the peak.

No third-party module is needed (psutil is not a dependency of the project).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20

#: command-line fragments of Ray's own processes (not workers that run user code)
SYSTEM_MARKERS = (
    "gcs_server",
    "/raylet",
    "dashboard/dashboard.py",
    "log_monitor.py",
    "monitor.py",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "dashboard/agent.py",
    "runtime_env/agent",
    "ray_client_server",
    "ray::JobSupervisor",
)


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, start time, CPU time used: user + system) of a process in clock ticks, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


def _hwm(pid: int) -> int | None:
    """VmHWM of a process in bytes (None when it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss(pid: int) -> int | None:
    """VmRSS of a process in bytes (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def short_title(title: str | None) -> str:
    """What a process is, in a word: Ray's process title (``ray::RayTrainWorker``), else the script it runs."""
    tokens = (title or "").split()
    if not tokens:
        return "-"
    if tokens[0].startswith("ray::"):
        return tokens[0]
    script = next((t for t in tokens if t.endswith(".py")), tokens[0])
    return Path(script).name


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_system(title: str) -> bool:
    return any(marker in title for marker in SYSTEM_MARKERS)


@dataclass
class Peak:
    pid: int
    title: str
    peak: int = 0  # bytes
    cpu_s: float = 0.0  # CPU seconds used, at the last reading

    @property
    def kind(self) -> str:
        return "system" if is_system(self.title) else "worker"


@dataclass
class Measured:
    """What :func:`run_measured` saw: exit status, wall time, the driver's peak and every descendant's."""

    cmd: list[str]
    returncode: int
    wall_s: float
    driver_peak: int
    processes: dict[int, Peak] = field(default_factory=dict)
    log: str = ""
    driver_cpu_s: float = 0.0
    driver_rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the start, VmRSS)

    def driver_peak_at(self) -> float | None:
        """Seconds after the start at which the driver's resident set was largest (of the readings)."""
        return round(max(self.driver_rss, key=lambda tr: tr[1])[0], 1) if self.driver_rss else None

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the driver and every process below it (to the last reading of each)."""
        return self.driver_cpu_s + sum(p.cpu_s for p in self.processes.values())

    @property
    def workers(self) -> list[Peak]:
        return [p for p in self.processes.values() if p.kind == "worker"]

    @property
    def system(self) -> list[Peak]:
        return [p for p in self.processes.values() if p.kind == "system"]

    def worker_peak(self, title: str | None = None) -> Peak | None:
        """The largest worker peak (of workers whose title holds ``title``, when given)."""
        found = [p for p in self.workers if title is None or title in p.title]
        return max(found, key=lambda p: p.peak, default=None)

    def peak_of(self, pid: int) -> int | None:
        p = self.processes.get(pid)
        return p.peak if p else None

    def summary(self) -> dict:
        worker = self.worker_peak()
        system = max(self.system, key=lambda p: p.peak, default=None)
        return {
            "returncode": self.returncode,
            "wall_s": round(self.wall_s, 2),
            "driver_peak": self.driver_peak,
            "worker_peak": worker.peak if worker else None,
            "worker_title": worker.title[:80] if worker else None,
            "workers_seen": len(self.workers),
            "system_peak": system.peak if system else None,
            "system_title": system.title[:80] if system else None,
            "cpu_s": round(self.cpu_s, 1),
            "driver_cpu_s": round(self.driver_cpu_s, 1),
            "driver_peak_at_s": self.driver_peak_at(),
        }


class TreeWatch(threading.Thread):
    """Polls the peaks of ``root`` and its descendants until :meth:`stop`."""

    def __init__(self, root: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.driver_peak = 0
        self.driver_cpu_s = 0.0
        self.driver_rss: list[tuple[float, int]] = []
        self._t0 = time.perf_counter()
        self.peaks: dict[int, Peak] = {}
        self._known: dict[tuple[int, int], bool] = {}  # (pid, start) -> descends from root
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.scan()
            if self._done.wait(self.every):
                break

    def stop(self) -> None:
        self._done.set()
        self.join()

    def _descends(self, pid: int, stats: dict[int, tuple[int, int, int]]) -> bool:
        chain: list[tuple[int, int]] = []
        verdict = False
        while True:
            st = stats.get(pid)
            if st is None:
                break
            key = (pid, st[1])
            if key in self._known:
                verdict = self._known[key]
                break
            if pid == self.root:
                verdict = True
                break
            chain.append(key)
            if pid <= 1:
                break
            pid = st[0]
        for key in chain:
            self._known[key] = verdict
        return verdict

    def scan(self) -> None:
        hwm, rss = _hwm(self.root), _rss(self.root)
        if hwm is not None:
            self.driver_peak = max(self.driver_peak, hwm)
        if rss is not None:
            self.driver_rss.append((time.perf_counter() - self._t0, rss))
        stats: dict[int, tuple[int, int, int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _stat(int(name))
                if st is not None:
                    stats[int(name)] = st
        if self.root in stats:
            self.driver_cpu_s = stats[self.root][2] / _TICKS
        for pid in stats:
            if pid == self.root or not self._descends(pid, stats):
                continue
            value = _hwm(pid)
            if value is None:
                continue
            title = _cmdline(pid)
            entry = self.peaks.setdefault(pid, Peak(pid, title))
            entry.peak = max(entry.peak, value)
            entry.cpu_s = stats[pid][2] / _TICKS
            # the last title that names work (ray::IDLE says nothing of what the worker did)
            if title and ("ray::IDLE" not in title or not entry.title):
                entry.title = title


def run_measured(
    cmd: list[str],
    *,
    cwd: str | Path | None = None,
    env: dict | None = None,
    log: str | Path | None = None,
    every: float = 0.2,
    timeout: float | None = None,
) -> Measured:
    """Run ``cmd`` to the end, polling the peaks of it and its descendants; stdout and stderr go to ``log``
    (a file, appended) when given, else are kept in :attr:`Measured.log`."""
    sink = open(log, "a") if log else subprocess.PIPE  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    watch = TreeWatch(proc.pid, every)
    watch.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate()
    finally:
        wall = time.perf_counter() - t0
        watch.stop()
        if log:
            sink.close()
    return Measured(
        cmd, proc.returncode, wall, watch.driver_peak, watch.peaks, out or "", watch.driver_cpu_s, watch.driver_rss
    )


def du(path: str | Path) -> int:
    """Bytes on disk of the files below ``path`` (allocated blocks, as ``du`` counts them)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def mib(value: int | float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def bench_env(extra: dict | None = None) -> dict:
    """The environment the benchmarks run commands in: the caller's, with Ray bound to loopback and no usage
    stats (what the tests set), and colours off."""
    env = dict(os.environ)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)  # every command starts its own local Ray
    env.update(extra or {})
    return env


def machine_line() -> str:
    """CPUs, memory and the load at the time of the call: what a reader needs to judge the wall times."""
    cpus = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            mem = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) * 1024
    except (OSError, StopIteration):
        mem = 0
    load = os.getloadavg()
    return f"{cpus} CPUs, {mem / 2**30:.0f} GiB memory, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"


# -- synthetic sources and models, shared by the benchmarks ------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _class_base(c: int, size: int):
    """A class's picture: a coloured gradient (HWC uint8-range ints) that a small model can learn to tell."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([(xx * (c % 7 + 1) + yy) % 256, (yy * 2 + 25 * c) % 256, (xx + yy * (c % 5)) % 256], -1)


def _write_jpegs(job: tuple[str, int, int, int, int, int]) -> int:
    import numpy as np
    from PIL import Image

    root, lo, hi, size, classes, seed = job
    rng = np.random.default_rng((seed, lo))
    bases: dict[int, np.ndarray] = {}
    for i in range(lo, hi):
        c = i % classes
        if c not in bases:
            bases[c] = _class_base(c, size).astype(np.int16)
        noise = rng.integers(-20, 21, size=bases[c].shape, dtype=np.int16)  # photos do not compress well
        pixels = np.clip(bases[c] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(f"{root}/class{c:03d}/img{i:06d}.JPEG", quality=85)
    return hi - lo


def write_image_folder(
    folder: Path, n: int, *, size: int, classes: int, seed: int = 0, processes: int | None = None
) -> None:
    """An ImageFolder of ``n`` JPEGs of ``size`` x ``size`` pixels in ``classes`` class folders (``class000``,
    ...; image ``i`` in class ``i mod classes``), written by a pool of ``processes`` (default: one a CPU)."""
    import multiprocessing as mp

    for c in range(classes):
        (folder / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    step = 250
    jobs = [(str(folder), lo, min(n, lo + step), size, classes, seed) for lo in range(0, n, step)]
    with mp.get_context("fork").Pool(processes) as pool:
        written = sum(pool.imap_unordered(_write_jpegs, jobs))
    if written != n:
        raise RuntimeError(f"wrote {written} images, not {n}")


def write_parents(
    folder: Path,
    arch: str,
    shape: tuple[int, int, int],
    classes: int,
    *,
    train_steps: tuple[int, int] = (0, 0),
    px: int = 256,
) -> tuple[Path, Path]:
    """Old and new models: ``arch`` checkpoints (torch seeds 0 and 1) written by the project's own
    ``save_checkpoint`` in a child process (the benchmark process does not import torch). With ``train_steps``
    (old, new), each is first trained for that many full-batch Adam steps on 20 synthetic images a class drawn
    as the image folders are (``px`` pixels, resized to 256 and cropped to 224 when ``shape`` is 224 px), so the
    two models classify some images and disagree on some: the attacks then have work to do and flips exist."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "parents",
        str(folder),
        arch,
        "x".join(map(str, shape)),
        str(classes),
        str(train_steps[0]),
        str(train_steps[1]),
        str(px),
    ]
    subprocess.run(cmd, check=True, cwd=REPO)
    return folder / "old.pt", folder / "new.pt"


def _parents_main(
    folder: str, arch: str, shape_text: str, classes: str, old_steps: str, new_steps: str, px: str
) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms

    from rcat_ray.core.models import build_architecture, save_checkpoint

    shape, k, size = tuple(int(s) for s in shape_text.split("x")), int(classes), int(px)
    torch.set_num_threads(1)
    x = y = None
    if int(old_steps) or int(new_steps):
        prep = (
            transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
            if shape[1] == 224
            else transforms.Resize(shape[1:])
        )
        rng = np.random.default_rng(1234)
        images, labels = [], []
        for c in range(k):
            base = _class_base(c, size).astype(np.int16)
            for _ in range(20):
                pixels = np.clip(base + rng.integers(-20, 21, size=base.shape), 0, 255).astype(np.uint8)
                images.append(np.asarray(prep(Image.fromarray(pixels))).transpose(2, 0, 1))
                labels.append(c)
        x = torch.from_numpy(np.stack(images)).float() / 255
        y = torch.tensor(labels)
    for name, seed, steps in (("old", 0, int(old_steps)), ("new", 1, int(new_steps))):
        torch.manual_seed(seed)
        m = build_architecture(arch, num_classes=k, input_shape=shape)
        if steps:
            opt = torch.optim.Adam(m.parameters(), lr=1e-2)
            for _ in range(steps):
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                acc = (m(x).argmax(1) == y).float().mean().item()
            print(f"{name}: {steps} steps, training accuracy {acc:.2f}", flush=True)
        save_checkpoint(f"{folder}/{name}.pt", m.eval(), arch=arch, num_classes=k, input_shape=shape)


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False)
    return out.stdout.strip() or "?"


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the markers ``<!-- name:begin -->`` and ``<!-- name:end -->`` of ``path`` (replacing
    what was there; appended, with its markers, when the file has none), leaving the rest of the file as it is."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)


def rcat_ray_command() -> str:
    """The ``rcat-ray`` console script of the Python running the benchmark (the project's venv), else the PATH's."""
    import shutil

    beside = Path(sys.executable).with_name("rcat-ray")
    found = str(beside) if beside.exists() else shutil.which("rcat-ray")
    if not found:
        raise SystemExit("rcat-ray is not installed beside this Python nor on the PATH: run `make install` first")
    return found


if __name__ == "__main__":
    if sys.argv[1:2] == ["parents"]:
        _parents_main(*sys.argv[2:])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} parents FOLDER ARCH CxHxW CLASSES OLD_STEPS NEW_STEPS PX")
