"""The stop-and-copy live migration, declared once.

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
RESUME_SOURCE = Compensation(
    "resume_source", role="source", side="source", timeout_s=180, retry=QUICK
)
STOP_DESTINATION = Compensation(
    "stop_destination", role="destination", side="destination", timeout_s=60, retry=QUICK
)

STOP_AND_COPY = SagaDefinition(
    name="stop-and-copy",
    steps=(
        # Both hosts alive, CRIU works on both, the container runs where the placement says.
        Step("preflight", role="source", side="source", timeout_s=30, retry=QUICK),
        # Layer present, network namespace built (link down), page server listening.
        Step(
            "prepare_destination",
            role="destination",
            side="destination",
            timeout_s=120,
            retry=QUICK,
            compensation=DISCARD_DESTINATION,
        ),
        # Freeze; pages go to the destination's page server; the source copy stops.
        # Not retried: a second dump of a container that may already be gone is unsafe.
        Step(
            "dump",
            role="source",
            side="source",
            timeout_s=300,
            retry=NO_RETRY,
            compensation=RESUME_SOURCE,
        ),
        # Small images, bundle config and the overlay's upper dir, sha256-checked.
        Step("transfer", role="transfer", side="source", timeout_s=300, retry=QUICK),
        # Restore behind a closed network: no client can reach it yet.
        Step(
            "restore",
            role="destination",
            side="destination",
            timeout_s=300,
            retry=NO_RETRY,
            compensation=STOP_DESTINATION,
        ),
        # Process alive and its listening ports back, checked from inside.
        Step("verify", role="destination", side="destination", timeout_s=30, retry=QUICK),
        # Placement moves to the destination by compare-and-set. Point of no return.
        Step("commit", role="destination", side="destination", timeout_s=30, retry=QUICK),
        # Network opens, neighbours learn the new location.
        Step(
            "open_network",
            role="destination",
            side="destination",
            timeout_s=30,
            retry=RetryPolicy(max_attempts=5, backoff_s=(0.5, 1.0, 2.0, 5.0)),
        ),
        # Nothing of the container is left on the source.
        Step(
            "clean_source",
            role="cleanup",
            side="source",
            timeout_s=120,
            retry=RetryPolicy(max_attempts=5, backoff_s=(1.0, 2.0, 5.0, 10.0)),
        ),
    ),
    commit_after="commit",
)

DEFINITIONS = {STOP_AND_COPY.name: STOP_AND_COPY}
