"""Backends as contexts (refgpt.backend): what runs inside and outside a ``with``, nesting,
a kernel that declines a call, options, and the instrument hook."""

import numpy as np
import pytest

from refgpt.backend import Backend, array_module, current, kernel
from refgpt.nn.attention import attention_forward
from refgpt.nn.block import residual
from refgpt.nn.params import zero_fill


def test_the_references_run_outside_any_backend_and_the_context_nests():
    seen = []

    def spy(name, fn):
        def call(*args, **kwargs):
            seen.append((name, fn.__module__))
            return fn(*args, **kwargs)
        return call
    a, b = np.ones(3), np.arange(3.0)
    assert current() is None
    np.testing.assert_array_equal(residual(a, b), a + b)
    numba, numpy = Backend("numba", instrument=spy), Backend("numpy", instrument=spy)
    with numba:
        residual(a, b)
        with numpy:                                   # an inner backend, then the outer again
            assert current() is numpy
            residual(a, b)
        residual(a, b)
    assert current() is None and array_module() is np
    seen = [s for s in seen if s[0] == "residual"]    # (the reference's casts are kernels too)
    assert len(seen) == 3
    assert seen[0] == seen[2] != seen[1]               # numba's, numpy's (the reference), numba's
    assert seen[0] == ("residual", "refgpt.kernels.numba_cpu")
    assert numpy.implementation(residual) is None


def test_a_declined_call_runs_the_reference():
    @kernel(numba="numba_cpu")
    def sum_rows(rows, lo, hi, out):                  # numba_cpu's declines strided outputs
        out[...] = rows[:, lo:hi].sum(axis=0)
    rows, out = np.arange(12.0).reshape(3, 4), np.zeros(8)
    with Backend("numba"):
        sum_rows(rows, 1, 3, out[::4])
    np.testing.assert_array_equal(out[::4], rows[:, 1:3].sum(axis=0))


def test_options_and_bad_names():
    with pytest.raises(ValueError, match="--backend must be one of"):
        Backend("tpu")
    with pytest.raises(ValueError, match="unknown backends"):
        kernel(fortran="x")
    gpu, blocked = Backend("cupy"), Backend("cupy", fused_attention=False)   # cupy not imported
    assert gpu.replaces(attention_forward) and not blocked.replaces(attention_forward)
    assert blocked.replaces(zero_fill) is False and gpu.replaces(zero_fill) is False
