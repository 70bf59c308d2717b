import os

import torch
from hypothesis import HealthCheck, settings

# "ci" is the default: derandomized (the same examples on every run, so the suite cannot be flaky)
# and sized so that `make test` fits its time budget; "thorough" for long runs, "dev" for random
# exploration (HYPOTHESIS_PROFILE=thorough / dev).
settings.register_profile(
    "ci", max_examples=15, deadline=None, derandomize=True, print_blob=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# `make test` runs two pytest-xdist workers on the two cores: one thread each
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))
