"""Launch a script under ``accelerate launch`` with 2 CPU processes (gloo), for the multi-process tests.

One such launch in CI once hung after its first step until a 600 s timeout; 27 reruns of the same launch here (on
an idle and on a loaded machine) never hung. So a launch that hangs is stopped with every worker's Python stacks,
which are reported (as a warning when a second try passes, in the failure otherwise), instead of a bare timeout.
"""

import os
import signal
import subprocess
import sys
import warnings

LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def abort_with_stacks(proc: subprocess.Popen, grace_s: float = 15.0):
    """Stop a hung launch and return its ``(stdout, stderr)``, with every worker's Python stacks in stderr.

    torch's elastic agent starts each worker in its own session, so killing the launcher's process group would
    leave them running: each descendant gets SIGABRT, which ``faulthandler`` (``PYTHONFAULTHANDLER=1``) answers by
    printing the stacks of all its threads; whatever is still alive after ``grace_s`` seconds is killed.
    """
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGABRT)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()
    return proc.communicate()


def launch_two_processes(script_args, *, cwd, env=None, prepare=lambda: None, timeout=240, attempts=2, check=True):
    """Run ``accelerate launch`` (2 processes) on ``script_args`` (the script, then its flags).

    Args:
        prepare: called before every try, to start it from a clean state (e.g. empty its output folder).
        timeout: seconds one try may take (a try takes ~20-40 s on 2 cores).
        attempts: tries allowed when a try hangs; a try that exits (with any code) is never repeated.
        check: raise AssertionError, with the end of stderr, when the exit code is not 0.

    Returns:
        ``subprocess.CompletedProcess`` (text stdout / stderr).

    Raises:
        AssertionError: every try hung (with the stacks of each), or ``check`` and a non-zero exit.
    """
    cmd = [*LAUNCH_2, *map(str, script_args)]
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    hangs = []
    for _ in range(attempts):
        prepare()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _, err = abort_with_stacks(proc)
            hangs.append(f"--- a launch hung for {timeout} s; its stacks and the end of its stderr:\n{err[-15000:]}")
            continue
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nSTDERR:\n{err[-6000:]}")
        if hangs:
            warnings.warn("A 2-process launch hung, then passed on its next try:\n" + "\n".join(hangs))
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    raise AssertionError(f"A 2-process launch hung {attempts} times:\n" + "\n".join(hangs))
