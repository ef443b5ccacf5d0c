import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mnv4.threads import sample_threads, torch_threads


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_torch_threads_restores_the_count_even_on_error(two_threads):
    with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with torch_threads(None):
        assert torch.get_num_threads() == 2


class _Report(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        with sample_threads():
            return torch.get_num_threads()


def test_sample_threads_is_one_thread_in_the_main_process_and_in_workers(two_threads):
    assert next(iter(DataLoader(_Report(), batch_size=None))) == 1
    assert torch.get_num_threads() == 2
    assert next(iter(DataLoader(_Report(), batch_size=None, num_workers=1))) == 1
