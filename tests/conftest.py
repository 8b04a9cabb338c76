"""Fixtures shared by several test files. Plain helper functions live in tests/helpers.py."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a whole test file with one torch thread, restoring the count afterwards.

    Toy networks gain nothing from a second thread, and on a busy 2-core machine spinning
    OpenMP threads make each step many times slower. Module scope, so a file opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")` and files that only import from it
    (e.g. `from test_train import shards`) keep their own thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
