"""builders.transfer: host-to-GPU copies that do not wait for the GPU's queued work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from builders import transfer
from builders.networks import build_network
from builders.transfer import module_to_device, to_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_to_device_on_the_host_is_the_tensor_itself_or_its_conversion():
    x = torch.arange(6, dtype=torch.int64)
    assert to_device(x, "cpu") is x
    converted = to_device(x, torch.device("cpu"), torch.float64)
    assert converted.dtype == torch.float64
    assert torch.equal(converted, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    flags = to_device(torch.tensor([True, False]), "cpu", torch.float32)
    assert torch.equal(flags, torch.tensor([1.0, 0.0]))


def test_module_to_device_on_the_host_leaves_the_module_as_it_is():
    net = build_network("ConvNet", 1, 10, (28, 28), seed=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    assert module_to_device(net, "cpu") is net
    assert all(a is b for a, b in zip(params, net.parameters()))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_slice_with_gaps_is_made_dense_before_it_is_pinned(monkeypatch):
    # pin_memory keeps strides: a pinned slice with gaps would reach the GPU through a pageable temporary (a wait).
    # Pinning needs a GPU; here the staging path runs towards the host, with pin_memory recording what it got.
    pinned = []

    def pin_memory(tensor, *args, **kwargs):
        pinned.append(tensor)
        return tensor

    monkeypatch.setattr(transfer, "_pins", lambda tensor, device: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    orders = torch.arange(40).view(4, 10)
    batch = orders[:, 2:5]  # train_together's batch: every network's columns start:stop of its order
    assert torch.equal(to_device(batch, "cpu"), batch)
    transposed = torch.arange(12.0).view(3, 4).t()  # no gaps: pinned with its own layout
    assert torch.equal(to_device(transposed, "cpu"), transposed)
    assert pinned[0].is_contiguous() and pinned[1].stride() == transposed.stride()


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # one tensor under two names
        self.register_buffer("scratch", torch.ones(3), persistent=False)  # not in the state dict


def _orders_slice() -> torch.Tensor:
    """A batch of columns of 5 networks' orders: not contiguous, the slice train_together copies every step."""
    orders = torch.stack([torch.randperm(1000, generator=torch.Generator().manual_seed(s)) for s in range(5)])
    return orders[:, 256:512]


@cuda
@pytest.mark.parametrize("make", [lambda: torch.arange(1000, dtype=torch.float32), _orders_slice],
                         ids=["contiguous", "batch_of_columns"])
def test_to_device_queues_the_copy_behind_running_gpu_work(make):
    x = make()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # a kernel that spins for about a second
    busy = torch.cuda.Event()
    busy.record()
    y = to_device(x, "cuda")
    assert not busy.query(), "the host waited for the GPU's queued work"
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), x)


@cuda
def test_module_to_device_moves_every_tensor_keeps_parameters_and_does_not_wait():
    net = build_network("ConvNetBN", 3, 10, (32, 32), seed=5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    busy = torch.cuda.Event()
    busy.record()
    assert module_to_device(net, "cuda") is net
    assert not busy.query(), "the host waited for the GPU's queued work"
    torch.cuda.synchronize()
    for name, value in net.state_dict().items():
        assert value.device.type == "cuda" and torch.equal(value.cpu(), before[name]), name
    assert all(isinstance(p, nn.Parameter) and p.requires_grad and p.is_cuda for p in net.parameters())
    net(torch.zeros(2, 3, 32, 32, device="cuda")).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@cuda
def test_module_to_device_keeps_tied_weights_tied_and_moves_non_persistent_buffers():
    net = _Tied()
    module_to_device(net, "cuda")
    assert net.a.weight is net.b.weight and net.a.weight.is_cuda
    assert net.scratch.is_cuda and torch.equal(net.scratch.cpu(), torch.ones(3))


@cuda
def test_switch_off_copies_as_plain_to(monkeypatch):
    monkeypatch.setattr(transfer, "PIN_HOST_COPIES", False)
    x = torch.arange(4)
    assert torch.equal(to_device(x, "cuda").cpu(), x)
