"""tools/chaos.py's process-tree kill, on a real parent and grandchild (the plan and the comparison:
tests/unit/test_chaos.py)."""
import subprocess
import sys
import time

from tools.chaos import kill_tree, process_tree


def test_kill_tree_reaches_grandchildren_in_their_own_session():
    # like torchrun: the parent starts its worker with start_new_session, so killpg would miss it
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while len(process_tree(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = process_tree(proc.pid)
    assert len(tree) == 2
    assert kill_tree(proc.pid) == 2
    proc.wait(timeout=10)
    grandchild = tree[1]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # reaped by init once its parent is gone
        try:
            state = open(f"/proc/{grandchild}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"process {grandchild} survived kill_tree")
