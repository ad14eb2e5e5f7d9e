"""Every migration strategy's saga, by the name a record carries."""

from __future__ import annotations

from workflows.post_copy import POST_COPY
from workflows.pre_copy import PRE_COPY
from workflows.saga import SagaDefinition
from workflows.stop_and_copy import STOP_AND_COPY

DEFINITIONS: dict[str, SagaDefinition] = {d.name: d for d in (STOP_AND_COPY, POST_COPY, PRE_COPY)}
