"""Post-copy (lazy pages), declared once.

Only the small images travel during the freeze; the destination restores at once and
fetches memory pages from the source as the process touches them, the rest in the
background. The source is not killed: CRIU leaves it stopped (leave-stopped), so until the
commit every failure can fall back to it with a SIGCONT. The commit comes once the
destination runs and is verified; its network opens right after, and the pages still
missing drain in. Only when every page has arrived does the stopped source go.
"""

from __future__ import annotations

from workflows.saga import Compensation, RetryPolicy, SagaDefinition, Step
from workflows.stop_and_copy import (
    CLEAN_SOURCE,
    COMMIT,
    DISCARD_DESTINATION,
    DUMP,
    OPEN_NETWORK,
    PREFLIGHT,
    PREPARE_DESTINATION,
    PRESYNC_FILES,
    RESTORE,
    RESUME_SOURCE,
    STOP_DESTINATION,
    TRANSFER,
    VERIFY,
    WAY_BACK,
)

# Fallback only: the placement moves back to the source by compare-and-set.
UNCOMMIT = Compensation(
    "uncommit", role="destination", side="destination", timeout_s=30, retry=WAY_BACK
)

# Every page is on the destination and its lazy-pages daemon exited 0. If pages were lost
# on the way (the daemon or the source died), the destination's memory has holes: it stops,
# and the container continues from the source's stopped copy — the state at the freeze.
DRAIN_PAGES = Step(
    "drain_pages",
    role="destination",
    side="destination",
    timeout_s=6 * 3600,  # a backstop only: it falls back when pages stop arriving
    retry=RetryPolicy(max_attempts=2, backoff_s=(1.0,)),
    fallback=(STOP_DESTINATION, UNCOMMIT, RESUME_SOURCE, DISCARD_DESTINATION),
)

POST_COPY = SagaDefinition(
    name="post-copy",
    steps=(
        PREFLIGHT,
        PREPARE_DESTINATION,
        PRESYNC_FILES,
        DUMP,
        TRANSFER,
        RESTORE,
        VERIFY,
        COMMIT,
        OPEN_NETWORK,
        DRAIN_PAGES,
        CLEAN_SOURCE,
    ),
    commit_after="commit",
)
