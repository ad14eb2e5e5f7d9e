"""Pre-copy (iterative), declared once. Needs soft-dirty memory tracking on the source.

While the container runs, the source pre-dumps its memory into the destination's page
server, again and again, each round sending only what was dirtied since the last, until
what is left fits the request's downtime budget (QEMU's rule: remaining dirty bytes <=
measured bandwidth x budget) or the round cap hits; then the final dump sends the rest.
The convergence rule lives in workflows/precopy.py.
"""

from __future__ import annotations

from workflows.saga import NO_RETRY, SagaDefinition, Step
from workflows.stop_and_copy import (
    CLEAN_SOURCE,
    COMMIT,
    DUMP,
    OPEN_NETWORK,
    PREFLIGHT,
    PREPARE_DESTINATION,
    PRESYNC_FILES,
    RESTORE,
    TRANSFER,
    VERIFY,
)

# Rounds of pre-dumps while the container runs. Not retried: a round that broke leaves
# CRIU's parasite behind on kernels without soft-dirty; the source is checked by resume.
PRECOPY_ROUNDS = Step("precopy_rounds", role="source", side="source", timeout_s=900, retry=NO_RETRY)

PRE_COPY = SagaDefinition(
    name="pre-copy",
    steps=(
        PREFLIGHT,
        PREPARE_DESTINATION,
        PRESYNC_FILES,
        PRECOPY_ROUNDS,
        DUMP,
        TRANSFER,
        RESTORE,
        VERIFY,
        COMMIT,
        OPEN_NETWORK,
        CLEAN_SOURCE,
    ),
    commit_after="commit",
)
