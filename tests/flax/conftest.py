"""Fixtures shared by the Flax front-end tests."""

import pytest

from jaxqat import core


@pytest.fixture
def qat_op_calls(monkeypatch):
  """The ``compute`` of every ``jaxqat.core.qat_op`` call the front ends make (cleared by the test)."""
  calls = []
  orig = core.qat_op
  monkeypatch.setattr(core, "qat_op", lambda op, *a, **kw: calls.append(kw["compute"]) or orig(
      op, *a, **kw))
  return calls
