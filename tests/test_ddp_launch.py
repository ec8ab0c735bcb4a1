"""The multi-process tests' launcher (tests/ddp_launch.py) turns a hang into a failure that shows where it hung."""

import pytest
from ddp_launch import launch_two_processes

HANGS_ON_RANK_1 = '''
import os
import time


def wait_forever_on_rank_1():
    while True:
        time.sleep(0.5)


if os.environ["RANK"] == "1":
    wait_forever_on_rank_1()
'''


@pytest.mark.slow
def test_a_hung_launch_fails_with_the_stacks_of_its_workers(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANGS_ON_RANK_1)
    tries = []
    with pytest.raises(AssertionError, match="hung 2 times") as info:
        launch_two_processes([script], cwd=tmp_path, prepare=lambda: tries.append(1), timeout=20, attempts=2)
    assert len(tries) == 2
    message = str(info.value)
    assert message.count("wait_forever_on_rank_1") >= 2, message[-3000:]  # rank 1's stack, from each try


@pytest.mark.slow
def test_a_launch_that_exits_is_not_repeated(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.exit(7)\n")
    tries = []
    proc = launch_two_processes([script], cwd=tmp_path, prepare=lambda: tries.append(1), check=False)
    assert proc.returncode != 0 and len(tries) == 1
    with pytest.raises(AssertionError, match="exit"):
        launch_two_processes([script], cwd=tmp_path)
