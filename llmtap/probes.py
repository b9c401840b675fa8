"""Is the broker ready for llmtap, and if not, why: asked by `llmtap up` before it
starts the rest, by each process that waits for the broker, and by tests.

A broker that is still starting is waited on; one that refuses llmtap (its TLS, its
SASL credentials) is waited on too, since an operator may fix it while llmtap waits, but
the reason is said each time rather than a bare "waiting".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from llmtap import topics
from llmtap.kafka import Kafka

log = logging.getLogger(__name__)

# After a TLS handshake, how long to wait for the broker to close it: a TLS 1.3 server
# that wanted a client certificate says so only after the client's side is done.
_TLS_ALERT_WAIT_S = 0.5


async def topics_ready(kafka: Kafka, partitions: int, replicas: int = 1) -> bool:
    """Whether the broker answers and llmtap's topics exist (made if missing)."""
    return not await broker_problem(kafka, partitions, replicas)


async def broker_problem(kafka: Kafka, partitions: int, replicas: int = 1) -> str:
    """Why the broker is not ready for llmtap ("" when it answers and llmtap's topics
    exist, made if missing): nothing listening yet, a TLS handshake refused (by it or
    by us), SASL credentials refused, or what the Kafka client said. A broker that
    refuses to make the topics raises :class:`topics.TopicsRefused`: that is for good."""
    if not await listening(kafka.bootstrap):
        return f"nothing accepts a connection at {kafka.bootstrap} yet"
    try:
        await topics.ensure_topics(kafka, partitions, replicas)
    except topics.TopicsRefused:
        raise
    except Exception as exc:  # still starting, or refusing us: said, and asked again
        log.debug("broker not ready: %r", exc)
        if kafka.tls and (refused := await tls_refusal(kafka)):
            return refused
        if _scram_refused(kafka, exc):
            # aiokafka reads SCRAM's server-final message for its proof ("v="); a
            # broker that refused the client's proof sent an error ("e=") instead.
            return (
                f"SASL {kafka.sasl_mechanism} authentication failed: the broker answered "
                f"with an error, not its proof (is the password of {kafka.sasl_username!r} "
                "right?)"
            )
        return f"{type(exc).__name__}: {exc}"
    return ""


def _scram_refused(kafka: Kafka, exc: Exception) -> bool:
    """aiokafka (0.14) reading a SCRAM refusal: the server-final message's proof
    (``params["v"]``) is missing."""
    return (
        kafka.sasl
        and (kafka.sasl_mechanism or "").startswith("SCRAM")
        and isinstance(exc, KeyError)
        and exc.args == ("v",)
    )


async def tls_refusal(kafka: Kafka) -> str:
    """Why a TLS session with the first broker fails, or "" if it does not."""
    host, port = _host_port(kafka.bootstrap)
    writer = None
    try:
        connecting = asyncio.open_connection(host, port, ssl=kafka.ssl_context)
        reader, writer = await asyncio.wait_for(connecting, 5)
        try:
            closed = await asyncio.wait_for(reader.read(1), _TLS_ALERT_WAIT_S) == b""
        except TimeoutError:
            closed = False  # a broker says nothing until asked: the session holds
        if closed:
            hint = "" if kafka.ssl_certfile else " (set kafka_ssl_certfile and kafka_ssl_keyfile?)"
            return (
                f"TLS with {host}:{port}: the broker closed the session after the handshake, "
                f"as one that requires a client certificate does{hint}"
            )
    except ssl.SSLCertVerificationError as exc:
        return f"TLS with {host}:{port} failed: {exc.reason}: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"TLS with {host}:{port} failed: {exc.reason or exc}"
    except (OSError, TimeoutError, ValueError):
        return ""
    finally:
        if writer is not None:
            # Nothing to flush; a graceful TLS close would wait for the peer's answer
            # (up to 30 s from a broker that hangs).
            writer.transport.abort()
    return ""


async def listening(bootstrap: str) -> bool:
    """Whether a broker of ``bootstrap`` accepts a TCP connection (any: the client
    bootstraps from whichever answers)."""
    for address in bootstrap.split(","):
        try:
            host, port = _host_port(address)
            connecting = asyncio.open_connection(host, port)
            _, writer = await asyncio.wait_for(connecting, 2)
        except (OSError, TimeoutError, ValueError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


def _first(bootstrap: str) -> str:
    return bootstrap.split(",")[0].strip()


def _host_port(address: str) -> tuple[str, int]:
    """Host and port of a ``host:port`` (the first of a bootstrap list)."""
    host, _, port = _first(address).rpartition(":")
    return host.strip("[]"), int(port)
