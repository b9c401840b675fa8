"""Standard Webhooks signing (https://www.standardwebhooks.com), by its own library.

``webhook-signature`` is ``v1,`` + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"))
where the secret is the base64 part of ``whsec_...``; with several secrets (one being
rotated out), one such signature each, space-separated, as the standard lets a receiver
accept any. ``webhook-id`` is the alert id, the
same on every attempt, so a receiver drops duplicates by it; ``webhook-timestamp`` is the
attempt's time (receivers refuse one more than five minutes off).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks import Webhook


def headers(
    secrets: str | Sequence[str], msg_id: str, body: bytes, at: datetime | None = None
) -> dict[str, str]:
    """The three signature headers for ``body`` (UTF-8), sent with id ``msg_id`` at
    ``at``, signed with each of ``secrets``, in order."""
    seconds = math.floor((at or datetime.now(UTC)).timestamp())
    when = datetime.fromtimestamp(seconds, UTC)
    text = body.decode()
    signature = " ".join(
        Webhook(secret).sign(msg_id, when, text)
        for secret in ([secrets] if isinstance(secrets, str) else secrets)
    )
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(seconds),
        "webhook-signature": signature,
    }
