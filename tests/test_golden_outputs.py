"""Tiny-model outputs stay what they were when pinned (see ``tests/helpers/golden.py``).

On the platform the fixture was recorded on (same torch build and CPU kernels) every tensor
must be bit-identical; elsewhere floating-point kernels may round differently, so floats
are compared to a tight tolerance and integer outputs exactly, except the detectors'
eval-mode detections, whose ranking and NMS are discontinuous in rounding (random weights
give many near-tied scores); their losses are still compared."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import golden


@pytest.fixture(scope="module")
def pinned():
    return torch.load(golden.FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def current():
    return golden.compute()


def test_every_pinned_output_is_reproduced(pinned, current):
    exact = pinned["platform"] == golden.platform_key()
    expected = pinned["outputs"]
    assert sorted(current) == sorted(expected)
    for model, outputs in expected.items():
        assert sorted(current[model]) == sorted(outputs), model
        for key, want in outputs.items():
            got = current[model][key]
            where = f"{model}.{key}"
            assert (got["dtype"], got["shape"]) == (want["dtype"], want["shape"]), where
            if exact:
                assert got["sha256"] == want["sha256"], f"{where} changed"
            elif key.startswith("eval"):
                continue
            elif not want["sample"].is_floating_point():
                assert torch.equal(got["sample"], want["sample"]), f"{where} changed"
            else:
                torch.testing.assert_close(got["sample"], want["sample"], rtol=1e-4, atol=1e-5,
                                           msg=where)
