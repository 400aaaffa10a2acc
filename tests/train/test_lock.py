"""One run per work directory: a live holder refuses a second run (naming it), a stale lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from unclip_jax.train import lock as lock_lib


def _write(workdir, **holder):
    with open(os.path.join(workdir, lock_lib.LOCK_FILE), "w") as f:
        json.dump(holder, f)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with lock_lib.WorkdirLock(tmp_path) as first:
        holder = lock_lib.read_holder(tmp_path)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(lock_lib.WorkdirLocked) as err:
            lock_lib.WorkdirLock(tmp_path).acquire()
        assert re.fullmatch(
            rf"{re.escape(str(tmp_path))} is in use by another run \(host {re.escape(socket.gethostname())}, "
            rf"pid {os.getpid()}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \S+\); wait for it to finish, stop it, or "
            rf"use another --workdir \(the lock is {re.escape(first.path)}\)",
            str(err.value),
        ), str(err.value)
        assert lock_lib.read_holder(tmp_path) == holder  # the refused one changed nothing
    assert not os.path.exists(os.path.join(tmp_path, lock_lib.LOCK_FILE))
    with lock_lib.WorkdirLock(tmp_path):  # free again
        pass


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    pid = _dead_pid()
    _write(tmp_path, host=socket.gethostname(), pid=pid, started=time.time() - 60, heartbeat=time.time())
    with caplog.at_level(logging.WARNING, logger="unclip_jax.train"), lock_lib.WorkdirLock(tmp_path):
        assert lock_lib.read_holder(tmp_path)["pid"] == os.getpid()
    (line,) = caplog.messages
    assert line.startswith("taking over the stale lock") and f"pid {pid}" in line


def test_another_hosts_lock_counts_while_its_heartbeat_is_fresh(tmp_path, caplog):
    _write(tmp_path, host="other-host", pid=12345, started=time.time() - 60, heartbeat=time.time() - 5)
    with pytest.raises(lock_lib.WorkdirLocked, match=r"\(host other-host, pid 12345, started "):
        lock_lib.WorkdirLock(tmp_path).acquire()
    _write(tmp_path, host="other-host", pid=12345, started=time.time() - 7200, heartbeat=time.time() - 3600)
    with caplog.at_level(logging.WARNING, logger="unclip_jax.train"), lock_lib.WorkdirLock(tmp_path):
        assert lock_lib.read_holder(tmp_path)["host"] == socket.gethostname()
    assert any("host other-host, pid 12345" in m for m in caplog.messages)


def test_the_heartbeat_is_rewritten_and_other_processes_of_a_run_do_not_lock(tmp_path):
    with lock_lib.WorkdirLock(tmp_path, heartbeat_seconds=0.05):
        first = lock_lib.read_holder(tmp_path)["heartbeat"]
        time.sleep(0.3)
        assert lock_lib.read_holder(tmp_path)["heartbeat"] > first
        with lock_lib.WorkdirLock(tmp_path, primary=False):  # process 1..n of a multi-host run
            pass
        assert lock_lib.read_holder(tmp_path)["pid"] == os.getpid()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    """kill -9 of a holder: the kernel drops its flock, so the next run takes over at once."""
    code = f"from unclip_jax.train import lock; lock.WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(lock_lib.WorkdirLocked, match=rf"pid {proc.pid},"):
        lock_lib.WorkdirLock(tmp_path).acquire()
    proc.kill()
    proc.wait()
    with lock_lib.WorkdirLock(tmp_path):
        assert lock_lib.read_holder(tmp_path)["pid"] == os.getpid()
