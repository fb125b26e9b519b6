"""Example budgets of the property-based fuzz tests (hypothesis, schemathesis).

``make test`` runs each fuzz test with its small CI budget, derandomized (the same
examples every run, so the suite's time and outcome are reproducible) and without an
example database. ``make fuzz`` sets ``PDSERVE_FUZZ=long``: every budget is multiplied by
``LONG_FACTOR``, examples are random (a new seed each run) and failures are saved in
``.hypothesis/`` so the next run tries them first.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG_FACTOR = 25
LONG = os.environ.get("PDSERVE_FUZZ", "") == "long"

settings.register_profile(
    "pdserve-ci",
    deadline=None,  # a busy 2-core machine: timing is not what these tests check
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "pdserve-long",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("pdserve-long" if LONG else "pdserve-ci")


def examples(ci: int) -> int:
    """The example count of a test whose ``make test`` budget is ``ci``."""
    return ci * LONG_FACTOR if LONG else ci


def budget(ci: int, **kw) -> settings:
    """``@budget(50)``: hypothesis settings with ``examples(50)`` examples."""
    return settings(max_examples=examples(ci), **kw)
