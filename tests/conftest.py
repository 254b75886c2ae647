import socket

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_rotation(dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=dtype))
    return q


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
