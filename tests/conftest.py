import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pw = nn.Conv2d(8, 12, 1)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.pw(torch.relu(self.conv2(x))))
        return self.head(x.mean(dim=(2, 3)))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16, padding_idx=0)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 50)

    def forward(self, ids):
        return self.out(torch.tanh(self.proj(self.embed(ids))))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return TinyLM().eval()


def randomize(model: nn.Module, std: float = 0.5) -> None:
    """Give every delta parameter a non-trivial value (B starts at zero, so outputs would not
    move)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


# fuzzing profiles (tests/test_fuzz.py): `ci` in `make test`, `fuzz` (1,000 cases per loader) in
# `make fuzz`
try:
    from hypothesis import HealthCheck, settings

    _FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                    HealthCheck.function_scoped_fixture]
    settings.register_profile(
        "ci",
        max_examples=25,
        deadline=20_000,
        database=None,
        derandomize=True,
        suppress_health_check=_FUZZ_HEALTH,
        print_blob=True,
    )
    settings.register_profile("fuzz", max_examples=1000, deadline=20_000, database=None,
                              suppress_health_check=_FUZZ_HEALTH, print_blob=True)
    settings.load_profile(
        os.environ.get("HYPOTHESIS_PROFILE")
        or ("fuzz" if os.environ.get("DELTATUNE_FUZZ") else "ci")
    )
except ImportError:  # hypothesis comes with the test extra
    pass


_RSS_LOG = os.environ.get("DT_RSS_LOG")
if _RSS_LOG:

    @pytest.fixture(autouse=True)
    def _log_rss(request):
        yield
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
        with open(_RSS_LOG, "a") as f:
            f.write(f"{rss:.2f} {request.node.nodeid}\n")
