"""The real Tansu broker behind a front that sees what clients send: Kafka over TLS in
the tests, and the bytes llmtap's clients put on the wire.

The bundled Tansu cannot serve TLS itself (its ``--cert`` and ``--key`` options refuse
each other), so the front terminates TLS, as a load balancer or stunnel would, and
passes the bytes on to Tansu's plaintext listener. Tansu advertises the front's address,
so every connection a client makes, bootstrap and broker alike, crosses the front. The
certificates come from a test CA (trustme). Without certificates, the front is plain
TCP. Without ``auto_create``, it makes Tansu a Kafka of ``auto.create.topics.enable=
false`` (as docker-compose.yml's): each Metadata request reaches it asking that no
topic be made for it (Tansu, as Kafka, makes one a client names unless asked not to).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import trustme
from aiokafka.protocol import admin

from llmtap.kafka import Kafka
from llmtap.probes import topics_ready
from llmtap.supervisor import broker_argv
from tests.fake_provider import free_port

HOST = "127.0.0.1"


@dataclass
class Certificates:
    """A CA, and a client certificate it signed, as files; the broker side's context
    (its certificate, signed by the same CA, and a client certificate required)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    server: ssl.SSLContext

    @classmethod
    def issue(cls, directory: Path) -> Certificates:
        ca = trustme.CA()
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(HOST).configure_cert(server)
        ca.configure_trust(server)
        server.verify_mode = ssl.CERT_REQUIRED
        client = ca.issue_cert("llmtap-client.example")
        directory.mkdir(parents=True, exist_ok=True)
        made = cls(directory / "ca.pem", directory / "client.pem", directory / "client.key", server)
        ca.cert_pem.write_to_path(str(made.cafile))
        client.cert_chain_pems[0].write_to_path(str(made.certfile))
        client.private_key_pem.write_to_path(str(made.keyfile))
        return made


@dataclass
class Front:
    """What crossed the front: sessions (over TLS, each with the client certificate's
    subject) and the bytes clients sent (decrypted)."""

    port: int
    subjects: list[str] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)
    delay_s: float = 0.0  # held back before each read of the broker's answers is passed on
    auto_create: bool = True  # False: Metadata requests reach the broker making no topic
    metadata_versions: set[int] = field(default_factory=set)  # of those passed on so
    # Error codes the front answers the next CreateTopics requests with, one a request,
    # each topic's (a broker whose controller moved: NOT_CONTROLLER), not passing them on.
    create_topics_errors: list[int] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    seen: bytearray | None,
    front: Front | None = None,
) -> None:
    try:
        while data := await reader.read(65536):
            if seen is not None:
                seen.extend(data)
            if front is not None and front.delay_s:
                await asyncio.sleep(front.delay_s)  # a broker that is slow to answer
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


METADATA = 3  # the Metadata request's API key
# Its versions whose last field is allow_auto_topic_creation (v8 adds two after it,
# v9 is of the flexible encoding); aiokafka asks v0 to v5.
AUTO_CREATE_LAST = range(4, 8)


CREATE_TOPICS = 19  # the CreateTopics request's API key (aiokafka asks v0 to v3)


def _create_topics_answer(frame: bytes, version: int, code: int) -> bytes:
    """A CreateTopics response to the request ``frame``, ``code`` for each topic."""
    (correlation_id,) = struct.unpack_from(">i", frame, 8)
    (client_id_size,) = struct.unpack_from(">h", frame, 12)
    body = BytesIO(frame[14 + max(client_id_size, 0) :])
    request = getattr(admin, f"CreateTopicsRequest_v{version}").decode(body)
    names = [topic[0] for topic in request.create_topic_requests]
    answer = getattr(admin, f"CreateTopicsResponse_v{version}")
    if version == 0:
        response = answer(topic_errors=[(name, code) for name in names])
    elif version == 1:
        response = answer(topic_errors=[(name, code, "from the test front") for name in names])
    else:
        errors = [(name, code, "from the test front") for name in names]
        response = answer(throttle_time_ms=0, topic_errors=errors)
    payload: bytes = struct.pack(">i", correlation_id) + response.encode()
    return struct.pack(">i", len(payload)) + payload


async def _pipe_requests(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    front: Front,
    client: asyncio.StreamWriter,
) -> None:
    """Pass a client's requests on, frame by frame (a 4-byte size, then the request:
    API key, version...); without ``front.auto_create``, each Metadata request with
    allow_auto_topic_creation false; a CreateTopics request answered to ``client``
    with the next of ``front.create_topics_errors``, when there is one."""
    held = bytearray()
    try:
        while data := await reader.read(65536):
            front.sent.extend(data)
            held.extend(data)
            while len(held) >= 4 and len(held) >= 4 + (size := struct.unpack_from(">i", held)[0]):
                frame, held[:] = bytearray(held[: 4 + size]), held[4 + size :]
                api_key, version = struct.unpack_from(">hh", frame, 4)
                if api_key == CREATE_TOPICS and front.create_topics_errors:
                    code = front.create_topics_errors.pop(0)
                    client.write(_create_topics_answer(bytes(frame), version, code))
                    continue
                if api_key == METADATA and not front.auto_create:
                    front.metadata_versions.add(version)
                    if version in AUTO_CREATE_LAST:
                        frame[-1] = 0
                writer.write(frame)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def front_of(
    target_port: int, server: ssl.SSLContext | None, auto_create: bool = True
) -> AsyncIterator[Front]:
    """A listener (TLS with ``server``) on a free port passing each session on to
    ``target_port``; without ``auto_create``, each Metadata request asking that no
    topic be made."""
    front = Front(free_port(), auto_create=auto_create)
    open_writers: set[asyncio.StreamWriter] = set()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.add(writer)
        peer = writer.get_extra_info("peercert") or {}
        front.subjects.append(
            next((v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"), "")
            or ",".join(v for _, v in peer.get("subjectAltName", ()))
        )
        try:
            broker_reader, broker_writer = await asyncio.open_connection(HOST, target_port)
        except OSError:
            writer.close()
            return
        open_writers.add(broker_writer)
        await asyncio.gather(
            _pipe_requests(reader, broker_writer, front, writer),
            _pipe(broker_reader, writer, None, front),
        )

    listener = await asyncio.start_server(session, HOST, front.port, ssl=server)
    try:
        yield front
    finally:
        listener.close()
        for writer in open_writers:  # clients still connected: their sessions end
            writer.close()
        await listener.wait_closed()


@dataclass
class FrontedBroker:
    front: Front
    process: asyncio.subprocess.Process
    output: list[bytes] = field(default_factory=list)  # Tansu's log lines


@contextlib.asynccontextmanager
async def tansu_behind_front(
    certificates: Certificates | None,
    *options: str,
    make_topics: bool = True,
    auto_create: bool = True,
) -> AsyncIterator[FrontedBroker]:
    """Tansu on a plaintext port only the front knows, advertising the front (over
    mutual TLS given ``certificates``; making no topic a client names, without
    ``auto_create``). Entered once llmtap's topics are made through the front, or
    without ``make_topics`` (a broker that wants credentials, one whose topics are left
    to llmtap), once it says it is ready."""
    plain = free_port()
    server = certificates.server if certificates is not None else None
    async with front_of(plain, server, auto_create) as front:
        process = await asyncio.create_subprocess_exec(
            *broker_argv(f"{HOST}:{plain}", advertised=front.bootstrap),
            *options,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        broker = FrontedBroker(front, process)
        said_ready = asyncio.Event()

        async def drain() -> None:  # read all of it, or Tansu blocks on a full pipe
            assert process.stdout is not None
            async for line in process.stdout:
                broker.output.append(line)
                if b"ready in" in line:
                    said_ready.set()

        drainer = asyncio.create_task(drain())
        try:
            async with asyncio.timeout(30):
                if not make_topics:
                    await said_ready.wait()
                else:
                    while not await topics_ready(client_of(front, certificates), 2):
                        await asyncio.sleep(0.1)
            yield broker
        finally:
            if process.returncode is None:
                process.terminate()
            await process.wait()
            await drainer


def client_of(front: Front, certificates: Certificates | None) -> Kafka:
    """How a client reaches the front: TLS, trusting the test CA, with its certificate;
    without certificates, in plaintext."""
    if certificates is None:
        return Kafka(front.bootstrap)
    return Kafka(
        front.bootstrap,
        "SSL",
        ssl_cafile=certificates.cafile,
        ssl_certfile=certificates.certfile,
        ssl_keyfile=certificates.keyfile,
    )
