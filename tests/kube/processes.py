"""Real ``prefetcher`` processes for end-to-end tests: started, watched, stopped, killed.

A :class:`Process` runs a console-script command in its own session with its output in a
log file; :meth:`Process.stop` sends SIGTERM and waits (then SIGKILL), :meth:`Process.kill`
is ``kill -9``. ``PREFETCHER_TEST_SHOW_LOGS=1`` prints each log when the process is stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

PREFETCHER = str(Path(sys.executable).with_name("prefetcher"))


class Process:
    """One running command and its log."""

    def __init__(self, args: Sequence[str], log: Path, env: Mapping[str, str]) -> None:
        self.args = list(args)
        self.log = log
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.returncode = None
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_output(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if not self.running():
                raise AssertionError(f"{self.args[1:3]} exited:\n{self.output()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output()[-4000:]}")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then wait; SIGKILL after ``timeout``. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.returncode = self.process.returncode
        if os.environ.get("PREFETCHER_TEST_SHOW_LOGS"):
            print(f"===== {' '.join(self.args[1:3])} =====\n{self.output()}")
        return self.returncode

    def kill(self) -> None:
        """``kill -9`` the whole process group."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.returncode = self.process.returncode


def wait_until(predicate: Callable[[], object], timeout: float = 20, interval: float = 0.1,
               message: str = "") -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message}; last={last!r}")
