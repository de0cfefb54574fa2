"""The benchmark scripts' argument checks (the benchmarks themselves run on a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import token_rows

ROOT = Path(__file__).resolve().parents[1]


def test_token_counts_are_whole_rows():
    assert token_rows(16384, 4096) == 4 and token_rows(4096, 4096) == 1
    for tokens in (0, -4096, 1024, 6000):  # no row, or rows cut: a smaller problem than the table would say
        with pytest.raises(ValueError, match=f"positive multiples of the row length 4096, got {tokens}"):
            token_rows(tokens, 4096)


@pytest.mark.parametrize("script, flags, flag", [("medusa_loss.py", ["--quick", "--sizes", "256,100"], "--sizes"),
                                                 ("trace_medusa_loss.py", ["--tokens", "6000"], "--tokens")])
def test_token_counts_that_are_not_whole_rows_are_refused(script, flags, flag):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *flags], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"error: {flag}: token counts must be positive multiples of the row length" in result.stderr
