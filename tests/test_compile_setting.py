"""params.compile's one home (builders.compile_setting): when a computation compiles, the warning for
networks that cannot, and "auto"'s fallback after a failed compilation."""

import warnings

import pytest

from builders.compile_setting import CompileSetting
from builders.errors import CompileError
from builders.networks import build_network

PLAIN = build_network("ConvNetW32", 1, 10, (8, 8), seed=0)  # compilable: instance norm, no batch statistics
BATCHNORM = build_network("ConvNetBN", 1, 10, (8, 8), seed=0)


def _computation(fails_compiled: bool):
    """A computation recording each ``compiled`` it was asked for; compiled, it fails as a compilation would."""
    calls: list[bool] = []

    def compute(compiled: bool) -> str:
        calls.append(compiled)
        if compiled and fails_compiled:
            raise CompileError("params.compile: torch.compile could not compile the network (no compiler). Install "
                               "a C++ compiler, or set params.compile: false.")
        return "compiled" if compiled else "plain"

    return compute, calls


@pytest.mark.parametrize("setting, auto, net, compiles", [
    (True, False, PLAIN, True),
    (True, True, PLAIN, True),
    ("auto", True, PLAIN, True),
    ("auto", False, PLAIN, False),  # the method decided this build does not compile
    ("auto", True, BATCHNORM, False),  # silently: auto does what it can
    (False, True, PLAIN, False),
    (False, False, BATCHNORM, False),
])
def test_a_computation_compiles_as_the_setting_and_the_network_say(setting, auto, net, compiles):
    choice = CompileSetting(setting, auto, "ConvNetW32")
    compute, calls = _computation(fails_compiled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these warns
        assert choice.run(net, compute) == ("compiled" if compiles else "plain")
    assert calls == [compiles]


def test_compile_true_warns_once_per_build_for_a_network_that_cannot_and_computes_uncompiled():
    choice = CompileSetting(True, False, "ConvNetBN")
    compute, calls = _computation(fails_compiled=False)
    with pytest.warns(UserWarning, match="params.compile: model 'ConvNetBN' is not a ConvNet without BatchNorm"):
        assert choice.run(BATCHNORM, compute) == "plain"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choice.run(BATCHNORM, compute) == "plain"  # no second warning
    assert calls == [False, False]


def test_compile_auto_falls_back_once_and_the_rest_of_the_build_runs_uncompiled():
    choice = CompileSetting("auto", True, "ConvNetW32")
    compute, calls = _computation(fails_compiled=True)
    with pytest.warns(UserWarning, match=r"\(no compiler\)\. .* This build runs uncompiled"):
        assert choice.run(PLAIN, compute) == "plain"
    assert choice.failed and not choice.compiles(PLAIN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choice.run(PLAIN, compute) == "plain"  # no second try, no second warning
    assert calls == [True, False, False]
    assert choice.describe() == {"compiled": False, "compile_fell_back": True}


def test_compile_true_stops_at_a_failed_compilation():
    choice = CompileSetting(True, False, "ConvNetW32")
    compute, calls = _computation(fails_compiled=True)
    with pytest.raises(CompileError, match="could not compile"):
        choice.run(PLAIN, compute)
    assert calls == [True] and not choice.failed


@pytest.mark.parametrize("setting", ["yes", 1, None, "true"])
def test_a_setting_outside_the_choices_is_refused(setting):
    with pytest.raises(ValueError, match="params.compile"):
        CompileSetting(setting, True, "ConvNetW32")


def test_the_build_metadata_says_whether_a_computation_ran_compiled():
    compiled = CompileSetting(True, False, "ConvNetW32")
    assert compiled.describe() == {"compiled": False}  # nothing computed yet
    compiled.run(PLAIN, _computation(fails_compiled=False)[0])
    assert compiled.describe() == {"compiled": True}
    plain = CompileSetting("auto", False, "ConvNetW32")  # the method decided this build does not compile
    plain.run(PLAIN, _computation(fails_compiled=False)[0])
    assert plain.describe() == {"compiled": False}


def test_an_evaluations_setting_names_its_own_key():
    choice = CompileSetting("auto", True, "ConvNetW32", key="eval.compile")
    compute, _ = _computation(fails_compiled=True)
    with pytest.warns(UserWarning, match=r"^eval\.compile: torch.compile could not compile .* This evaluation runs "
                                         "uncompiled"):
        assert choice.run(PLAIN, compute) == "plain"
    strict = CompileSetting(True, False, "ConvNetBN", key="eval.compile")
    with pytest.raises(CompileError, match=r"^eval\.compile: torch.compile could not compile"):
        strict.run(PLAIN, _computation(fails_compiled=True)[0])
    with pytest.warns(UserWarning, match="eval.compile: model 'ConvNetBN' .* Set eval.compile: false"):
        assert not strict.compiles(BATCHNORM)
