import os

import pytest
import torch

# Tiny models gain little from a second thread, and on a busy 2-core machine two threads per
# process oversubscribe it badly: one thread per test process (SELFFLOW_TEST_THREADS to change).
torch.set_num_threads(int(os.environ.get("SELFFLOW_TEST_THREADS", "1")))


@pytest.fixture
def tiny_config():
    """A RunConfig small enough for a CPU unit test (digits 8×8, depth 2, width 64)."""
    from selfflow.config import config_from_dict
    from support import tiny_run

    def make(tmp_path, **sections):
        sections["train"] = {"log_every": 2, **sections.get("train", {})}
        return config_from_dict(tiny_run(tmp_path / "run", **sections))

    return make


# ---- fault-trial report (tests/test_faults.py) -----------------------------------------------
# The fault tests append one line per trial here; the summary prints them after the run, so the
# count of trials and failures shows in CI logs without `-s`.
_TRIAL_REPORT: list = []


@pytest.fixture(scope="session")
def trial_report():
    return _TRIAL_REPORT


def pytest_terminal_summary(terminalreporter):
    if _TRIAL_REPORT:
        terminalreporter.section("fault trials")
        for line in _TRIAL_REPORT:
            terminalreporter.write_line(line)
