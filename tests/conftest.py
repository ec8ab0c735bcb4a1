"""Fixtures shared by several test files."""

import pytest


@pytest.fixture
def fresh_accelerate_state():
    """A clean accelerate singleton state before and after the test (each test builds its own Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
