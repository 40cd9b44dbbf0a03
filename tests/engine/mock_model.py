"""The mock model lives in jaxserve.testing.mock_model (scripts/bench_host.py uses it too); the
tests import it from here as before."""

from jaxserve.testing.mock_model import SumModel, next_tokens

__all__ = ["SumModel", "next_tokens"]
