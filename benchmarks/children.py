"""Each benchmark measures a configuration in a child process of its own: ``run_child`` gives its exit
code, wall seconds, peak RSS and output; ``result`` reads the one ``RESULT {json}`` line it prints."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(cmd: list[str], env: dict, timeout: float | None = None) -> tuple[int, float, float, str]:
    """(exit code, wall s, peak RSS MB, stdout+stderr) of ``cmd`` run in the repository root with ``env``;
    killed after ``timeout`` seconds. ``os.wait4`` reaps the child and gives its own peak RSS."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        return proc.returncode, wall, usage.ru_maxrss / 1024, out.read()


def result(text: str) -> dict | None:
    """The JSON of the child's ``RESULT {...}`` line, or None when it printed none."""
    m = re.search(r"^RESULT (.*)$", text, re.M)
    return json.loads(m.group(1)) if m else None
