"""Preemption notices (e2_jax/training/preemption.py) in fresh processes: SIGTERM, SIGUSR1 and
SIGUSR2 are notices; with several processes, SIGUSR1/2 are forwarded as a SIGTERM to whoever
owns SIGTERM then (JAX's notifier after jax.distributed.initialize)."""

import signal
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent("""
    import os, signal, sys, time
    from e2_jax.training import preemption
    preemption.install()
    mode = sys.argv[1]
    if mode == "exit_at_once":
        print("ready", flush=True)
        with preemption.nothing_to_save("the test's window"):
            time.sleep(60)
    elif mode == "notice":
        os.kill(os.getpid(), signal.Signals[sys.argv[2]])
        time.sleep(0.2)
        print("requested", preemption.requested(), flush=True)
    elif mode == "shared":
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # stands in for JAX's notifier
        preemption.share_with_jax()
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 10
        while not got and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a loop would forward again
        print("forwarded", len(got), preemption.requested(), flush=True)
""")


def _python(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROGRAM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGUSR2"])
def test_each_notice_exits_at_once_where_nothing_is_unsaved(name):
    process = _python("exit_at_once")
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.Signals[name])
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and f"preempted ({name}) during the test's window: nothing new to save" in err


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGUSR2"])
def test_a_notice_outside_a_window_is_recorded_not_fatal(name):
    out, err = _python("notice", name).communicate(timeout=30)
    assert out.strip() == "requested True", err


def test_shared_with_jax_forwards_usr1_as_one_sigterm():
    out, err = _python("shared").communicate(timeout=30)
    assert out.strip() == "forwarded 1 True", err
