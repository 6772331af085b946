"""amgfx.memory: with the mmap threshold pinned, large temporaries freed between small live objects go back to the
OS; without it glibc keeps them (each case in its own process: the setting is process-wide and final)."""
import subprocess
import sys

import pytest

CHURN = r"""
import sys, torch
from amgfx.memory import pin_mmap_threshold, rss_mb
if sys.argv[1] == "pin":
    pin_mmap_threshold()
x = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
del x                                  # glibc raises its own threshold to 16 MB on this free
base = rss_mb()
keep, tmp = [], []
for _ in range(100):                   # 2 MB temporaries, each followed by a small object that stays
    tmp.append(torch.empty(2 << 20, dtype=torch.uint8).fill_(1))
    keep.append(torch.ones(64))
del tmp
print(rss_mb() - base)
"""


def _kept_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=120, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_pinned_threshold_hands_freed_temporaries_back_where_glibc_alone_keeps_them():
    pinned, dynamic = _kept_mb("pin"), _kept_mb("dynamic")
    assert pinned < 40, pinned               # 200 MB were allocated and freed
    assert dynamic > 150, dynamic            # the mechanism the pin exists for
