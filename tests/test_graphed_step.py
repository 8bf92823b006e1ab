"""GraphedStep: a training step captured as a CUDA graph gives the eager step's results (GPU tests run
only where CUDA is; on CPUs the step must simply run eagerly)."""

import warnings

import pytest
import torch

from builders.graphed_step import GraphedStep

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _training(device: str, seed: int = 0):
    """A small regression model, its SGD and a step function of (batch positions, noise) device tensors."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(64, 8, generator=g).to(device)
    target = torch.randn(64, 3, generator=g).to(device)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step(idx: torch.Tensor, noise: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = ((model(data[idx] + noise) - target[idx]) ** 2).mean()
        loss.backward()
        opt.step()

    return model, opt, step


def _inputs(steps: int, device: str, batch: int = 16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randperm(64, generator=g)[:batch].to(device), 0.1 * torch.randn(batch, 8, generator=g).to(device))
            for _ in range(steps)]


def _train(step_fn, inputs, opt=None, drop_at=None, graphed=None):
    for i, args in enumerate(inputs):
        if i == drop_at:
            for group in opt.param_groups:
                group["lr"] *= 0.1
            if graphed is not None:
                graphed.invalidate()
        step_fn(*args)


def _assert_same_parameters(model, plain_model):
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_disabled_runs_the_step_eagerly_every_call():
    model, opt, step = _training("cpu")
    plain_model, plain_opt, plain_step = _training("cpu")
    graphed = GraphedStep(step, enabled=False)
    inputs = _inputs(5, "cpu")
    _train(graphed, inputs)
    _train(plain_step, inputs)
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)
    assert graphed.mode == "eager" and not graphed.graphs


def test_warmup_must_be_at_least_one_call():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda: None, enabled=False, warmup=0)


class _FakeCapture:
    """torch.cuda's capture as it behaves when the captured step raises: ending the capture raises another error
    (the step's as its context) and the capture stream stays current. Stands in for CUDA on a CPU."""

    current = "default"

    def __init__(self, graph) -> None:
        pass

    def __enter__(self) -> None:
        _FakeCapture.current = "capture"

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and str(error).startswith("CUDA error"):  # it invalidated the capture: ending it fails
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        _FakeCapture.current = "default"  # the stream context is left only after a capture that ended


@pytest.mark.parametrize("message", ["CUDA error: operation not permitted when stream is capturing",
                                     "CUDA out of memory. Tried to allocate 2.00 GiB"], ids=["sync", "oom"])
def test_a_failed_capture_puts_the_current_stream_back_and_says_the_steps_own_error(monkeypatch, message):
    monkeypatch.setattr(_FakeCapture, "current", "default")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _FakeCapture.current)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: setattr(_FakeCapture, "current", stream))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def step(x: torch.Tensor) -> None:
        raise RuntimeError(message + "\nmore lines")

    graphed = GraphedStep(step, enabled=True)
    x = torch.zeros(3)
    with pytest.warns(UserWarning, match="could not be captured"):
        assert graphed._capture(((3,), x.dtype, x.device), (x,)) is None
    assert _FakeCapture.current == "default"
    assert graphed.failure == message and not graphed.graphs


@cuda
def test_replayed_steps_give_the_eager_steps_parameters_through_a_learning_rate_drop():
    model, opt, step = _training("cuda")
    plain_model, plain_opt, plain_step = _training("cuda")
    graphed = GraphedStep(step, enabled=True)
    inputs = _inputs(12, "cuda")
    _train(graphed, inputs, opt, drop_at=6, graphed=graphed)
    _train(plain_step, inputs, plain_opt, drop_at=6)
    assert graphed.mode == "graph" and graphed.replays == 12 - 2
    _assert_same_parameters(model, plain_model)


@cuda
def test_a_step_that_cannot_be_captured_runs_eagerly_with_a_warning():
    model, opt, step = _training("cuda")
    plain_model, plain_opt, plain_step = _training("cuda")

    def synchronising(idx, noise):
        if float(noise.sum()) != float("inf"):  # a host read: illegal while capturing
            step(idx, noise)

    graphed = GraphedStep(synchronising, enabled=True)
    inputs = _inputs(5, "cuda")
    stream = torch.cuda.current_stream()
    with pytest.warns(UserWarning, match="could not be captured"):
        _train(graphed, inputs)
    assert torch.cuda.current_stream() == stream  # not the capture's stream, left current by the failed capture
    _train(plain_step, inputs)
    assert graphed.mode == "eager" and graphed.failure and "previous error during capture" not in graphed.failure
    _assert_same_parameters(model, plain_model)


@cuda
def test_each_input_shape_is_warmed_up_and_captured_on_its_own():
    # epochs of 16 + 12 positions: the last batch of each epoch has another shape (warm-up, then its own graph)
    model, opt, step = _training("cuda")
    plain_model, plain_opt, plain_step = _training("cuda")
    graphed = GraphedStep(step, enabled=True, warmup=2)
    full, last = _inputs(6, "cuda", batch=16), _inputs(6, "cuda", batch=12)
    inputs = [args for pair in zip(full, last) for args in pair]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn
        _train(graphed, inputs)
    _train(plain_step, inputs)
    torch.cuda.synchronize()
    assert sorted(graphed.eager_calls.values()) == [2, 2] and len(graphed.graphs) == 2 and graphed.replays == 8
    _assert_same_parameters(model, plain_model)
