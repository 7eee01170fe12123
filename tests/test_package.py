"""Process-level settings the package makes when it is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import denseclip, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("0", "0")])
def test_huge_pages_for_large_cpu_tensors_unless_the_user_says_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected
