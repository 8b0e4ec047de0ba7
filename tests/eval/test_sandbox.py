"""The sandbox stops hostile programs, reports them as failed, and the next program runs.

Each dangerous case has a control (the same action outside the sandbox, or a harmless
program inside it) so a test cannot pass merely because the program was broken."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from draftlm.eval.sandbox import FAILED, PASSED, TIMEOUT, SandboxLimits, probe, run_program

pytestmark = pytest.mark.skipif(
    not probe().available, reason=f"no sandbox on this machine: {probe().detail}"
)

LIMITS = SandboxLimits(timeout_s=3.0, cpu_s=3, max_processes=16)


def still_works() -> None:
    """Evaluation goes on: a correct program passes right after a hostile one."""
    result = run_program("assert sum(range(4)) == 6\nprint('fine')", LIMITS)
    assert result.status == PASSED and result.stdout == "fine\n"


def test_correct_and_wrong_programs() -> None:
    assert run_program("print(1 + 1)", LIMITS).stdout == "2\n"
    wrong = run_program("def f():\n    return 1\nassert f() == 2, 'f is wrong'", LIMITS)
    assert wrong.status == FAILED and wrong.reason == "AssertionError: f is wrong"
    syntax = run_program("def f(:\n", LIMITS)
    assert syntax.status == FAILED and "SyntaxError" in syntax.reason


def test_infinite_loop_times_out() -> None:
    result = run_program("while True:\n    pass", LIMITS)
    assert result.status == TIMEOUT and not result.passed
    assert result.elapsed_s < LIMITS.timeout_s + 2
    still_works()


def test_ten_gigabytes_are_refused() -> None:
    result = run_program("data = bytearray(10 * 1024**3)\nprint(len(data))", LIMITS)
    assert result.status == FAILED and result.reason == "MemoryError"
    still_works()


def test_process_limit_holds_as_root_too() -> None:
    # Children sleep so they all count at once; the program reports how many forks worked.
    program = textwrap.dedent("""
        import os, time
        started = 0
        for _ in range(100):
            try:
                if os.fork() == 0:
                    time.sleep(20)
                    os._exit(0)
                started += 1
            except OSError:
                break
        print(started)
    """)
    result = run_program(program, LIMITS)
    assert result.status == PASSED
    assert 0 < int(result.stdout) < LIMITS.max_processes
    still_works()


def test_fork_bomb_is_contained_and_cleaned_up() -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_program(bomb, LIMITS)
    assert result.status == TIMEOUT
    # Killing the PID namespace's first process took every forked child with it.
    deadline = time.monotonic() + 5
    while _sandboxed_processes() and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel reaps the killed namespace asynchronously
    assert _sandboxed_processes() == []
    still_works()


def test_no_network_not_even_loopback() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = run_program(program, LIMITS)
        assert result.status == FAILED and "Network is unreachable" in result.reason
        with pytest.raises(TimeoutError):
            server.accept()
        # Control: the same program outside the sandbox does reach the server.
        outside = subprocess.run([sys.executable, "-c", program], timeout=10)
        assert outside.returncode == 0
        server.accept()[0].close()
    still_works()


@pytest.fixture
def users_file() -> Path:
    """A world-writable file in a world-writable folder of the repository: only the
    read-only mounts, not file permissions, can keep the sandbox from changing it."""
    folder = Path(__file__).parent / f".sandbox-victim-{os.getpid()}"
    folder.mkdir()
    folder.chmod(0o777)
    target = folder / "data.txt"
    target.write_text("original")
    target.chmod(0o666)
    yield target
    target.unlink()
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.rmdir()


def test_cannot_write_outside_its_directory(users_file: Path) -> None:
    # A checkout under /tmp (CI clones there) lies beneath the sandbox's private tmpfs: the
    # program cannot even see the file. Anywhere else it sees it through read-only mounts.
    hidden = any(users_file.resolve().is_relative_to(p) for p in ("/tmp", "/var/tmp", "/dev/shm"))
    expected = "No such file or directory" if hidden else "Read-only file system"
    for action in (
        f"open({str(users_file)!r}, 'w').write('changed')",
        f"open({str(users_file.parent / 'new.txt')!r}, 'w').write('new')",
        f"import os\nos.remove({str(users_file)!r})",
    ):
        result = run_program(action, LIMITS)
        assert result.status == FAILED and expected in result.reason, action
    assert users_file.read_text() == "original"
    assert [p.name for p in users_file.parent.iterdir()] == ["data.txt"]
    # Its own directory is writable, and fresh for every run.
    own = run_program("import os\nassert os.listdir('.') == ['program.py']\n"
                      "open('scratch.txt', 'w').write('ok')", LIMITS)
    assert own.status == PASSED


def test_files_in_tmp_are_out_of_sight(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("keep")
    result = run_program(f"open({str(secret)!r}, 'w').write('gone')", LIMITS)
    assert result.status == FAILED and "FileNotFoundError" in result.reason
    assert secret.read_text() == "keep"


def test_stdin_closed_and_output_limited() -> None:
    result = run_program("import sys\nassert sys.stdin.read() == ''\nprint('x' * 10**6)",
                         LIMITS)
    assert result.status == PASSED
    assert result.stdout.endswith("[output truncated]")
    assert len(result.stdout) < LIMITS.max_output_bytes + 100


def _sandboxed_processes() -> list[int]:
    """Processes running as a sandbox uid (`_sandbox_uid` hands out 2e9 and up)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        if int(uid_line.split()[1]) >= 2_000_000_000:
            found.append(int(entry))
    return found


def test_host_processes_are_out_of_sight() -> None:
    """A private /proc: the program sees its own PID namespace, not the host's processes
    and their command lines (where a server's --api-key would be)."""
    program = textwrap.dedent("""
        import os
        pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
        print(len(pids), os.getpid(), os.path.exists(f'/proc/{PARENT}/cmdline'))
    """).replace("PARENT", str(os.getpid()))
    result = run_program(program, LIMITS)
    assert result.status == PASSED, result.reason
    count, own_pid, sees_parent = result.stdout.split()
    assert int(count) <= 3 and int(own_pid) <= 3 and sees_parent == "False"
    # Control: outside the sandbox the same listing shows this test's own process.
    outside = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert outside.stdout.split()[2] == "True"
    still_works()


FORK_AND_FILL = textwrap.dedent("""
    import os, time
    children = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                data = b'x' * SIZE
                time.sleep(1.5)
                os._exit(0)
            except MemoryError:
                os._exit(3)
        children.append(pid)
    ok = sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in children)
    print(ok)
""")


@pytest.mark.skipif(probe().memory_cap == "per process", reason="no memory cgroup here")
def test_memory_limit_holds_for_the_sandbox_as_a_whole() -> None:
    """Three children touching 250 MB each: all fit under a 2 GB sandbox, not under 600 MB
    (per process, each would have fitted)."""
    program = FORK_AND_FILL.replace("SIZE", str(250 * 1024**2))
    roomy = run_program(program, SandboxLimits(timeout_s=10.0, cpu_s=10))
    assert roomy.status == PASSED and roomy.stdout.strip() == "3", roomy.reason
    tight = run_program(program, SandboxLimits(timeout_s=10.0, cpu_s=10,
                                               memory_bytes=600 * 1024**2))
    assert int(tight.stdout.strip() or 0) < 3
    assert not list(Path("/sys/fs/cgroup").rglob("draftlm-sandbox-*"))
    still_works()


def test_without_a_cgroup_the_memory_limit_is_shared_out(monkeypatch) -> None:
    from draftlm.eval import sandbox

    def no_cgroup(limits):
        raise OSError("no cgroup")

    monkeypatch.setattr(sandbox, "_Cgroup", no_cgroup)
    limits = SandboxLimits(memory_bytes=1024**3, max_processes=8, timeout_s=5.0)
    result = run_program("import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0])",
                         limits)
    assert result.status == PASSED and int(result.stdout) == 1024**3 // 8
