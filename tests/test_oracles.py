"""A missing test oracle skips locally and fails the run in CI (``CI=true``)."""

from __future__ import annotations

import numpy as np
import pytest

from oracles import require


def test_missing_oracle_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="salience_no_such_oracle"):
        require("salience_no_such_oracle")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="salience_no_such_oracle.*CI=true"):
        require("salience_no_such_oracle")
    assert require("numpy") is np  # a present oracle is returned, CI or not
