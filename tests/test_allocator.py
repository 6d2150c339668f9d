"""The glibc allocator setting applies on Linux (the machines this project runs on) and is harmless to repeat."""

import platform
import sys

import pytest
import torch

from mgrq_runner.allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_applies_on_glibc() -> None:
    assert keep_freed_memory()
    assert keep_freed_memory()  # idempotent
    x = torch.randn(1 << 22)
    assert torch.equal(x * 2, x + x)  # allocation still works after the change
