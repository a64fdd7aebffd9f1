"""The prepare job on a hub dataset it cannot reach."""


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path):
    """Offline (as a user sets it, before datasets is imported): the prepare job names the dataset, the
    cache and the local alternative, and exits 2 without a traceback."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, env

    e = {**env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "trainer.jobs.prepare", "--run-dir", str(tmp_path / "run"),
                           "data.source=hf", "data.hf_name=no-such-user/no-such-corpus"], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'no-such-user/no-such-corpus'" in proc.stderr and "local Hugging Face cache" in proc.stderr
    assert "data.paths" in proc.stderr and "Traceback" not in proc.stderr
    assert os.path.isdir(tmp_path / "run")  # the config was written; no data
