"""Run one untrusted Python program (a model's completion plus its tests) in isolation.

Model-written code may loop forever, allocate without bound, fork-bomb, talk to the
network or overwrite the user's files. HumanEval's own `reliability_guard` only
monkey-patches Python and warns that it is no sandbox; here the operating system enforces
the limits. Each program gets:

- its own process, started through a small bootstrap (`_BOOTSTRAP` below) that moves into
  fresh network, PID, mount, IPC and UTS namespaces: the network namespace has only a
  downed loopback (no network at all, not even the host's 127.0.0.1), and when the PID
  namespace's first process exits or is killed, the kernel kills every process left in it;
- a uid of its own: as root, the program runs as an unused unprivileged uid (one per run,
  so concurrent runs cannot signal each other nor share a process budget). RLIMIT_NPROC
  is not enforced for root, so this is what makes the process limit stop a fork bomb.
  Without root, an unprivileged user namespace maps the caller's uid (where RLIMIT_NPROC
  applies) and a tmpfs hides $HOME;
- every file system remounted read-only inside its mount namespace (the user's files
  stay untouchable whatever their permissions), private tmpfs mounts over /tmp, /var/tmp
  and /dev/shm (hiding what lies there), and a fresh working directory in that tmpfs,
  owned by the program's uid: the only place it can write;
- rlimits: address space (memory), CPU seconds, file size, open files, processes, no
  core dumps; stdin closed; stdout/stderr captured up to `max_output_bytes`;
- a wall-clock timeout after which the whole process group is killed (and the namespace
  with it, through the parent-death signal of the namespace's first process).

The interpreter's install prefix is bind-mounted read-only into the tmpfs, so programs
run with this same Python (and only its standard library: `-I -S`) even when it lives in
a directory the sandbox uid cannot enter. `probe()` checks once that this machine grants
all of the above; `run_program` refuses to run model code when it does not.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from draftlm.errors import DraftlmError

PASSED, FAILED, TIMEOUT, ERROR = "passed", "failed", "timeout", "error"

# The bootstrap runs as a separate `python -I -S -c`: namespaces and credentials must be
# set up in a fresh single-threaded process, never in the (threaded) evaluation process.
# argv[1] is a JSON object of settings. It reports setup failures on the pipe `report_fd`
# and exits 125 so the parent can tell "the sandbox broke" from "the program failed".
_BOOTSTRAP = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = (
    0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    0x1, 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000)
# Flags a read-only remount must repeat (in a user namespace they are locked).
KEEP = {"nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "noatime": 0x400, "nodiratime": 0x800,
        "relatime": 0x200000, "strictatime": 0x1000000}
PR_SET_PDEATHSIG = 1
report = os.fdopen(cfg["report_fd"], "w")

def fail(what):
    err = ctypes.get_errno()
    report.write(json.dumps({"error": f"{what}: {os.strerror(err)}"}))
    report.flush()
    os._exit(125)

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

uid, gid = os.getuid(), os.getgid()
for procs in cfg["cgroup_procs"]:  # before any fork: every descendant is counted with us
    try:
        write(procs, str(os.getpid()))
    except OSError:
        fail(f"join cgroup {procs}")
flags = NEWNET | NEWPID | NEWNS | NEWIPC | NEWUTS
if cfg["mode"] == "userns":
    flags |= NEWUSER
if libc.unshare(flags) != 0:
    fail("unshare")
if cfg["mode"] == "userns":
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"{uid} {uid} 1")
    write("/proc/self/gid_map", f"{gid} {gid} 1")
if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
    fail("mount --make-rprivate /")
# Every file system read-only in this namespace: whatever the permissions of the user's
# files, nothing outside the private tmpfs mounts below can be written.
with open("/proc/self/mountinfo") as f:
    mounts = [line.split() for line in f]
for fields in mounts:
    point = fields[4].encode().decode("unicode_escape")
    if point.split("/")[1] in ("proc", "sys", "dev"):
        continue  # kernel interfaces, guarded by ownership
    keep = sum(KEEP.get(opt, 0) for opt in fields[5].split(","))
    if libc.mount(None, point.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep, None):
        fail(f"remount {point} read-only")
with open(cfg["program"], "rb") as f:  # before /tmp, where it lies, is covered
    program = f.read()
for target in cfg["tmpfs"]:
    if os.path.isdir(target):
        opts = f"size={cfg['tmpfs_bytes']},mode=1777".encode()
        if libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
            fail(f"mount tmpfs on {target}")
# The interpreter may live where the sandbox uid can't reach (a pyenv under /root, a
# home hidden above): show its install prefix read-only at a fixed place in the new /tmp.
os.mkdir(cfg["python_mount"])
prefix = cfg["python_prefix"].encode()
if libc.mount(prefix, cfg["python_mount"].encode(), None, MS_BIND | MS_REC, None) != 0:
    fail("bind-mount the Python prefix")
ro = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
if libc.mount(None, cfg["python_mount"].encode(), None, ro, None) != 0:
    fail("remount the Python prefix read-only")
os.mkdir(cfg["workdir"], 0o700)
with open(os.path.join(cfg["workdir"], "program.py"), "wb") as f:
    f.write(program)
os.chown(cfg["workdir"], cfg["uid"], cfg["uid"])
os.chdir(cfg["workdir"])
child = os.fork()  # the first process of the new PID namespace
if child == 0:
    # A /proc of this PID namespace only: the host's processes (and their command lines,
    # which may hold secrets) are out of sight. Without it the run fails: never silently.
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        fail("mount a private /proc")
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if cfg["mode"] == "setuid":
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    # After the uid change (which clears it): die with the bootstrap, and with us every
    # process of the namespace.
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        fail("prctl")
    report.close()
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "program.py"], cfg["env"])
report.close()
signal.signal(signal.SIGALRM, lambda *_: os.kill(child, signal.SIGKILL))
signal.alarm(cfg["timeout_s"])
_, status = os.waitpid(child, 0)
if os.WIFSIGNALED(status):
    os._exit(128 + os.WTERMSIG(status))
os._exit(os.WEXITSTATUS(status))
"""


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. Defaults fit HumanEval (tests finish in well under 1 s)."""

    timeout_s: float = 10.0
    memory_bytes: int = 2 * 1024**3  # address space; CPython itself needs ~30 MB
    cpu_s: int = 10
    max_processes: int = 16
    file_size_bytes: int = 16 * 1024**2
    max_open_files: int = 64
    tmpfs_bytes: int = 16 * 1024**2
    max_output_bytes: int = 16 * 1024


@dataclass(frozen=True)
class SandboxResult:
    """`status` is passed | failed | timeout | error; `reason` says why in one line."""

    status: str
    reason: str
    returncode: int | None
    elapsed_s: float
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    """How programs are isolated on this machine (see `probe`)."""

    mode: str  # "setuid" (running as root) | "userns" (unprivileged user namespace)
    available: bool
    detail: str
    # How the memory limit binds the sandbox as a whole: "cgroup v1" / "cgroup v2" (one
    # limit for every process of a run), or "per process" (no cgroup to use: each process
    # gets memory_bytes / max_processes of address space, so the total stays bounded).
    memory_cap: str = "per process"


_CGROUP_ROOT = Path("/sys/fs/cgroup")


class _Cgroup:
    """A memory (and process-count) cgroup for one run, below this process's own cgroup,
    removed afterwards. `procs` are the files the bootstrap writes its pid to."""

    def __init__(self, limits: SandboxLimits) -> None:
        self.dirs: list[Path] = []
        name = f"draftlm-sandbox-{os.getpid()}-{next(_run_counter)}"
        kind, places = _cgroup_places()
        self.kind = kind
        try:
            for controller, parent in places.items():
                folder = parent / name
                folder.mkdir()
                self.dirs.append(folder)
                if controller == "memory" and kind == "cgroup v2":
                    (folder / "memory.max").write_text(str(limits.memory_bytes))
                    (folder / "memory.swap.max").write_text("0")
                    (folder / "pids.max").write_text(str(limits.max_processes))
                elif controller == "memory":
                    (folder / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
                elif controller == "pids":
                    (folder / "pids.max").write_text(str(limits.max_processes))
        except OSError:
            self.remove()
            raise

    @property
    def procs(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def remove(self) -> None:
        """Kill whatever is left in the cgroup, then delete it (the kernel frees it once
        its last process is gone, which takes a moment after SIGKILL)."""
        for folder in self.dirs:
            deadline = time.monotonic() + 5
            while True:
                try:
                    for pid in (folder / "cgroup.procs").read_text().split():
                        _kill(int(pid))
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
        self.dirs = []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _cgroup_places() -> tuple[str, dict[str, Path]]:
    """("cgroup v1" | "cgroup v2", controller -> this process's cgroup folder) where a
    memory cgroup can be made below it; raises OSError where none can."""
    lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    v1 = {c: _CGROUP_ROOT / c / path.lstrip("/")
          for hierarchy, controllers, path in lines if hierarchy != "0"
          for c in controllers.split(",") if c in ("memory", "pids")}
    if "memory" in v1 and os.access(v1["memory"], os.W_OK):
        return "cgroup v1", {c: d for c, d in v1.items() if os.access(d, os.W_OK)}
    for hierarchy, _, path in lines:
        if hierarchy == "0":
            own = _CGROUP_ROOT / path.lstrip("/")
            enabled = (own / "cgroup.subtree_control").read_text().split()
            if "memory" in enabled and "pids" in enabled and os.access(own, os.W_OK):
                return "cgroup v2", {"memory": own}
    raise OSError("no writable memory cgroup")


@cache
def cgroup_kind() -> str:
    """"cgroup v1" / "cgroup v2" when each run can get a memory cgroup, else "per process"."""
    try:
        _Cgroup(SandboxLimits()).remove()
        return _cgroup_places()[0]
    except OSError:
        return "per process"


@cache
def probe() -> Isolation:
    """Find out once which isolation this machine grants, by running a trivial program."""
    mode = "setuid" if os.geteuid() == 0 else "userns"
    try:
        result = _run(mode, "print('ok')", SandboxLimits(timeout_s=30.0, cpu_s=30))
    except OSError as err:
        return Isolation(mode, False, str(err))
    ok = result.status == PASSED and result.stdout.strip() == "ok"
    memory_cap = cgroup_kind()
    if ok and memory_cap == "per process":
        warnings.warn("no memory cgroup for the sandbox here: each sandboxed process gets "
                      "memory_bytes / max_processes of address space instead", stacklevel=2)
    return Isolation(mode, ok, "" if ok else result.reason, memory_cap)


def run_program(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `program` (Python source) isolated; it passes when it exits 0 in time.

    Raises `DraftlmError` when the machine cannot isolate it (no namespaces): running
    model-written code unconfined is never the silent fallback."""
    isolation = probe()
    if not isolation.available:
        raise DraftlmError(
            f"cannot sandbox generated programs here ({isolation.mode}: {isolation.detail}); "
            "run as root or enable unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1)"
        )
    return _run(isolation.mode, program, limits or SandboxLimits())


# Both inside the sandbox's private tmpfs on /tmp.
_PYTHON_MOUNT = "/tmp/.python"
_WORKDIR = "/tmp/work"


def _sandbox_python() -> str:
    """This interpreter's path as the sandbox sees it (below `_PYTHON_MOUNT`)."""
    real = Path(os.path.realpath(sys.executable))
    prefix = Path(os.path.realpath(sys.base_prefix))
    if not real.is_relative_to(prefix):
        raise DraftlmError(
            f"{real} is not inside its install prefix {prefix}; the sandbox needs a standard "
            "Python installation"
        )
    return str(Path(_PYTHON_MOUNT) / real.relative_to(prefix))


_run_counter = itertools.count()


def _sandbox_uid() -> int:
    """An unprivileged uid that no account uses, distinct per concurrently running sandbox."""
    return 2_000_000_000 + (os.getpid() % 100_000) * 10_000 + next(_run_counter) % 10_000


def _run(mode: str, program: str, limits: SandboxLimits) -> SandboxResult:
    workdir = Path(tempfile.mkdtemp(prefix="draftlm-sandbox-"))
    try:
        return _run_in(workdir, mode, program, limits)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_in(workdir: Path, mode: str, program: str, limits: SandboxLimits) -> SandboxResult:
    (workdir / "program.py").write_text(program, encoding="utf-8")
    uid = _sandbox_uid() if mode == "setuid" else os.getuid()
    cpu_s = max(1, int(limits.cpu_s))
    try:
        cgroup: _Cgroup | None = _Cgroup(limits)
    except OSError:
        cgroup = None
    # Without a cgroup the address-space limit is per process: share it out so that all
    # the processes a run may start cannot together take more than memory_bytes.
    memory = limits.memory_bytes if cgroup else limits.memory_bytes // limits.max_processes
    try:
        return _run_limited(workdir, mode, program, limits, uid, cpu_s, memory, cgroup)
    finally:
        if cgroup is not None:
            cgroup.remove()


def _run_limited(workdir: Path, mode: str, program: str, limits: SandboxLimits, uid: int,
                 cpu_s: int, memory: int, cgroup: _Cgroup | None) -> SandboxResult:
    program_path = workdir / "program.py"
    python = _sandbox_python()
    config = {
        "mode": mode,
        "uid": uid,
        "workdir": _WORKDIR,
        "program": str(program_path),
        "python": python,
        "python_prefix": sys.base_prefix,
        "python_mount": _PYTHON_MOUNT,
        "timeout_s": max(1, int(limits.timeout_s) + 2),  # the bootstrap's own backstop
        "tmpfs": ["/tmp", "/var/tmp", "/dev/shm"]
        + ([os.path.expanduser("~")] if mode == "userns" else []),
        "tmpfs_bytes": limits.tmpfs_bytes,
        "cgroup_procs": cgroup.procs if cgroup is not None else [],
        "env": {"PATH": "/usr/bin:/bin", "HOME": _WORKDIR, "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1"},
        "rlimits": {
            "RLIMIT_AS": memory,
            "RLIMIT_CPU": cpu_s,
            "RLIMIT_FSIZE": limits.file_size_bytes,
            "RLIMIT_NOFILE": limits.max_open_files,
            "RLIMIT_NPROC": limits.max_processes,
            "RLIMIT_CORE": 0,
        },
    }
    report_read, report_write = os.pipe()
    config["report_fd"] = report_write
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # Output goes to files, not pipes: a program printing without end can't block us,
        # and RLIMIT_FSIZE stops it at the file size limit.
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(config)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir,
            start_new_session=True, pass_fds=(report_write,), env={"PATH": "/usr/bin:/bin"},
        )
        os.close(report_write)
        timed_out = False
        try:
            returncode = proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            returncode = proc.wait()
        _kill_group(proc.pid)  # leftovers that escaped into the group
        elapsed = time.perf_counter() - start
        with os.fdopen(report_read, "rb") as report:
            setup = report.read()
        stdout = _read_limited(out, limits.max_output_bytes)
        stderr = _read_limited(err, limits.max_output_bytes)
    if setup:
        message = json.loads(setup.decode()).get("error", "setup failed")
        return SandboxResult(ERROR, f"sandbox setup: {message}", returncode, elapsed, stdout,
                             stderr)
    if timed_out or returncode == 128 + signal.SIGKILL and elapsed >= limits.timeout_s:
        return SandboxResult(TIMEOUT, f"timed out after {limits.timeout_s:g}s", None, elapsed,
                             stdout, stderr)
    if returncode == 0:
        return SandboxResult(PASSED, "", 0, elapsed, stdout, stderr)
    return SandboxResult(FAILED, _failure_reason(returncode, stderr), returncode, elapsed,
                         stdout, stderr)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_limited(file: object, limit: int) -> str:
    file.seek(0)  # type: ignore[attr-defined]
    data = file.read(limit + 1)  # type: ignore[attr-defined]
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n[output truncated]" if len(data) > limit else text


def _failure_reason(returncode: int, stderr: str) -> str:
    """The exception line of a traceback, or the signal that ended the program."""
    if returncode > 128:
        name = signal.Signals(returncode - 128).name if returncode - 128 < 65 else "?"
        if returncode - 128 == signal.SIGXCPU:
            return "CPU time limit exceeded (SIGXCPU)"
        return f"killed by {name}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else f"exit status {returncode}"
    return last[:200]
