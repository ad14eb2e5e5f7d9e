"""The stop-and-copy live migration, declared once, and the steps other strategies share.

The container is frozen and dumped on the source while its memory pages stream straight
into a CRIU page server on the destination; the small images and the container's own
filesystem changes follow over the network; the destination restores it with its network
held closed and checks it. Only then does the placement move (the commit); only after the
commit does the network open and the source get cleaned.
"""

from __future__ import annotations

from workflows.saga import NO_RETRY, Compensation, RetryPolicy, SagaDefinition, Step

QUICK = RetryPolicy(max_attempts=3, backoff_s=(0.5, 2.0))

DISCARD_DESTINATION = Compensation(
    "discard_destination", role="destination", side="destination", timeout_s=60, retry=QUICK
)
# Bringing the source back may need its pages fetched back from the destination's transfer
# worker (an agent restarts a worker that keeps dying after up to 10 s, services/agent.py).
# Giving up would leave the container running nowhere, so the way back keeps trying, every
# 30 s in the end, until the migration's way-back deadline (options.way_back_deadline_s).
WAY_BACK = RetryPolicy(max_attempts=5, backoff_s=(0.5, 2.0, 5.0, 10.0, 30.0), keeps_trying=True)
RESUME_SOURCE = Compensation(
    "resume_source", role="source", side="source", timeout_s=180, retry=WAY_BACK
)
STOP_DESTINATION = Compensation(
    "stop_destination", role="destination", side="destination", timeout_s=60, retry=QUICK
)

# Both hosts alive, CRIU works on both, the container runs where the placement says.
PREFLIGHT = Step("preflight", role="source", side="source", timeout_s=30, retry=QUICK)
# Layer present, network namespace built (link down), page server listening (stop-and-copy).
PREPARE_DESTINATION = Step(
    "prepare_destination",
    role="destination",
    side="destination",
    timeout_s=120,
    retry=QUICK,
    compensation=DISCARD_DESTINATION,
)
# Undoes a pre-sync that no dump followed: the source's migration directory goes (after a
# dump, resuming the source removes it).
FORGET_PRESYNC = Compensation(
    "forget_presync", role="transfer", side="source", timeout_s=30, retry=QUICK
)
# While the container still runs: its filesystem changes go ahead of the freeze.
PRESYNC_FILES = Step(
    "presync_files",
    role="transfer",
    side="source",
    timeout_s=600,
    retry=QUICK,
    compensation=FORGET_PRESYNC,
)
# Freeze and dump. Not retried: a second dump of a container that may already be gone is
# unsafe. Its compensation brings the source back (thaw, SIGCONT or restore from images).
DUMP = Step(
    "dump",
    role="source",
    side="source",
    timeout_s=300,
    retry=NO_RETRY,
    compensation=RESUME_SOURCE,
)
# Small images, bundle config and what changed in the upper dir since the pre-sync.
TRANSFER = Step("transfer", role="transfer", side="source", timeout_s=300, retry=QUICK)
# Restore behind a closed network: no client can reach it yet.
RESTORE = Step(
    "restore",
    role="destination",
    side="destination",
    timeout_s=300,
    retry=NO_RETRY,
    compensation=STOP_DESTINATION,
)
# Process alive and its listening ports back, checked from inside.
VERIFY = Step("verify", role="destination", side="destination", timeout_s=30, retry=QUICK)
# Placement moves to the destination by compare-and-set. Point of no return.
COMMIT = Step("commit", role="destination", side="destination", timeout_s=30, retry=QUICK)
# Network opens, neighbours learn the new location.
OPEN_NETWORK = Step(
    "open_network",
    role="destination",
    side="destination",
    timeout_s=30,
    # After the commit the destination has the only copy: a closed network is an outage.
    retry=RetryPolicy(max_attempts=5, backoff_s=(0.5, 1.0, 2.0, 5.0, 30.0), keeps_trying=True),
)
# Nothing of the container is left on the source.
CLEAN_SOURCE = Step(
    "clean_source",
    role="cleanup",
    side="source",
    timeout_s=120,
    retry=RetryPolicy(max_attempts=5, backoff_s=(1.0, 2.0, 5.0, 10.0)),
)

STOP_AND_COPY = SagaDefinition(
    name="stop-and-copy",
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
        CLEAN_SOURCE,
    ),
    commit_after="commit",
)
