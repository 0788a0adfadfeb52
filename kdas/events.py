"""Prefect events that kdas emits, for deployment triggers to act on (prefect.yaml):
`kdas.data.changed` when an import changes a dataset, `kdas.drift.detected` when
`kdas monitor` finds drift. Sent only where a Prefect API is configured (PREFECT_API_URL, or
the active Prefect profile): without one nothing is sent, and no temporary server started."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

HOW_TO = "set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) to send kdas's events"


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def emit(event: str, resource_id: str, payload: dict[str, Any], timeout: float = 30.0) -> bool:
    """Send `event` about `resource_id` and wait until it left (a command that exits right
    after must not lose it). False, saying how to turn it on, where no API is configured."""
    if api_url() is None:
        log.info("no Prefect API: event %s not sent (%s)", event, HOW_TO)
        return False
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    emit_event(event=event, resource={"prefect.resource.id": resource_id}, payload=payload)
    EventsWorker.drain_all(timeout=timeout)
    log.info("sent the Prefect event %s (%s)", event, resource_id)
    return True
