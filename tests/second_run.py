"""Two real `owlvid` runs on one output: the second must give up at once, naming the first (the output lock)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def assert_second_run_refused(args: list[str], env: dict, written: Path, lines: int, shown: Path, *,
                              pause: bool = False) -> None:
    """Start `owlvid *args`; once `written` holds `lines` lines (then stopped with SIGSTOP if `pause`), the same
    command again must exit at once with one line naming the first run's PID and `shown`, writing nothing. The
    first run is then killed with SIGKILL (its lock file stays behind: the caller checks the next run)."""
    first = subprocess.Popen([sys.executable, "-m", "owlvid", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (written.exists() and written.read_bytes().count(b"\n") >= lines):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        if pause:
            first.send_signal(signal.SIGSTOP)
        before = written.read_bytes()
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "owlvid", *args], env=env, capture_output=True, text=True,
                                timeout=180)
        elapsed = time.monotonic() - t0
        assert first.poll() is None, "the first run ended before the second was refused"
        err = second.stderr.strip().splitlines()
        assert second.returncode != 0 and len(err) == 1, second.stderr
        assert f"PID {first.pid}" in err[0] and str(shown) in err[0], err[0]
        assert elapsed < 45, f"the second run took {elapsed:.1f} s to give up"  # no waiting for the first
        assert written.read_bytes() == before
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
