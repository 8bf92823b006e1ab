"""builders.compiling.compile_static: inductor's caches serve CPU compilations only (loaded code ran 2-3x slower
on a GPU, benchmarks/results/compile_cache_cuda_2026-11-26.json)."""

import pytest
import torch
from torch._dynamo.utils import counters

from builders.compiling import compile_static


@pytest.fixture
def fresh_caches(tmp_path, monkeypatch):
    """An empty inductor cache of this test's own and zeroed counters; dynamo's compiled code reset after."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=True):  # on, whatever the environment says
        yield
    torch._dynamo.reset()


def _lookups() -> int:
    """FX-graph cache lookups so far (hits and misses; a bypass is not a lookup)."""
    return counters["inductor"]["fxgraph_cache_hit"] + counters["inductor"]["fxgraph_cache_miss"]


def _scaled_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * 3.0


@pytest.mark.parametrize("device, looked_up", [("cpu", True), ("cuda", False), (torch.device("cuda:1"), False)])
def test_compilations_off_the_cpu_bypass_the_fx_graph_cache(fresh_caches, device, looked_up):
    x = torch.linspace(-1.0, 1.0, 8)
    compiled = compile_static(_scaled_relu, device)  # the options, not the input's device, decide: x stays here
    torch.testing.assert_close(compiled(x), torch.relu(x) * 3.0)
    assert (_lookups() > 0) == looked_up
