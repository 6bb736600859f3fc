"""Older stacks: what c2f says, in one line, where an installed release cannot run a feature."""
import numpy
import pytest
import triton

from c2f.kernels import launch


@pytest.fixture
def fresh_check():
    launch.check_interpreter.cache_clear()
    yield launch.check_interpreter
    launch.check_interpreter.cache_clear()


@pytest.mark.parametrize("triton_version, numpy_version, fails", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.10.1", "3.0.0", False),
    ("3.2.0", "2.4.0", True)])
def test_the_interpreter_check_names_numpy(fresh_check, monkeypatch, triton_version, numpy_version, fails):
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if fails:
        with pytest.raises(RuntimeError, match=rf"Triton {triton_version} interpreter needs numpy < 2.4 "
                                               rf"\(numpy {numpy_version} is installed\)"):
            fresh_check()
    else:
        fresh_check()


def test_this_stack_passes_the_check(fresh_check):
    fresh_check()   # the suite's own venvs (default and make test-compat) hold a numpy their Triton interprets with


@pytest.mark.parametrize("version, ok", [("3.4.0", False), ("3.5.1", False), ("3.6.0", True), ("3.9.0", True)])
def test_inspect_names_the_triton_it_needs(version, ok):
    from c2f.kernels import inspect as kinspect
    problem = kinspect.unsupported_triton(version)
    if ok:
        assert problem is None
    else:
        assert problem == (f"c2f.kernels.inspect needs Triton >= 3.6 (Triton {version} is installed): the offline "
                           "compile uses Triton's compiler internals as of that release")


def test_the_oldest_triton_is_the_packaged_floor():
    from tests.test_packaging import compat_pair
    assert ".".join(map(str, launch.MIN_TRITON)) == compat_pair()["triton"]
