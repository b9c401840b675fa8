"""An append-only on-disk spool of Kafka records, for when the broker is away.

Layout: numbered segment files (``00000000000000000001.seg``, ...) in one directory,
read in number order. A segment is a run of records, each framed as::

    header: length (u32, big-endian) · crc32 of the payload (u32)
    payload: topic length (u16) · key length (u32) · topic · key · value

A value of no bytes is a tombstone (a null value: a key deleted from a compacted topic,
as a stopping ingress deletes its entry on the reservations topic). No event is empty
(each is JSON), so none is taken for one, and the frame needs no flag for it.

A reader stops at the first frame that is short or whose CRC does not match: that is
a torn last write (a crash mid-append), and what precedes it is kept. After a restart
appends never go to an old segment, so only the tail of a segment can be torn.

What survives what (``append`` writes each batch with one unbuffered ``write``, then
fsyncs the file, and fsyncs the directory when it creates a segment):

- a process crash or ``kill -9``: every batch whose ``append`` returned; a batch cut
  short mid-write is a torn tail, skipped (the records before it are intact);
- power loss or a kernel crash: the same, since ``append`` returns only after fsync;
- an ``ack`` (a segment deleted once all of it was delivered) lost to a crash: the
  segment is replayed again. Delivery is at least once; every stage downstream is
  idempotent on ``event_id``;
- a ``mark`` (a note beside a segment, ``<number>.done``: how many of its first records
  were delivered, written as its replay goes and when a stop cuts it short, fsynced and
  renamed into place; ``oldest`` leaves them out): lost, what it would have left out
  since the note before it (or all of the segment) is replayed again. ``ack``
  deletes the note before the segment, and an open deletes a note whose segment is
  gone, so a note never applies to a later segment given the same number.

A segment that cannot be read at all (``OSError``: permission denied, an I/O error)
is never deleted: ``oldest`` raises, sets it aside and passes over it until
``read_again``; ``unreadable`` counts such segments.
A segment whose file is gone (deleted from outside llmtap) can never be read: ``oldest``
forgets it (logged at ERROR once, with its path and size: its events are lost) and
reads the next.

The byte limit (``max_bytes``, the sum of the segment files): ``append`` takes records
in order while they fit and refuses the rest, returning how many it refused. Nothing
already spooled is ever evicted to make room: when the spool is full it is the new
events that are refused, and the caller drops them, counts them and logs at ERROR (the
ingress publisher first lets them wait in its memory queue, then drops the newest once
that is full too). A disk error while appending refuses the whole batch the same way
(the part a failed write took is cut off: none of it is replayed).
The one exception to the limit is ``fill``: a place reserved in line (for a batch that
was in flight when spooling began) is always written, because its events are older
than ones already spooled; the limit can be overshot by that one batch.

Blocking: opening and every method but ``reserve`` and ``release`` do file I/O; call
them from a worker thread (``asyncio.to_thread``), never on the event loop. A lock
makes them safe to call from more than one thread, though the publisher calls them one
at a time. One open ``Spool`` owns a directory (an exclusive ``flock`` on its ``LOCK``
file, released by ``close`` or by the process ending); a second one raises
``SpoolBusy``. To look at a spool that is open elsewhere, ``decode`` its files.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from llmtap.batches import MAX_RECORD_BYTES

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")  # payload length, crc32(payload)
_FIELDS = struct.Struct(">HI")  # topic length, key length
_SUFFIX = ".seg"
_NOTE = ".done"  # beside a segment: how many of its first records were delivered
DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024
# The frame of the largest event: a Kafka record of MAX_RECORD_BYTES (key and value) to
# a topic of Kafka's longest name (249 characters).
LARGEST_FRAME = _HEADER.size + _FIELDS.size + 249 + MAX_RECORD_BYTES


Delivered = Callable[[int, int], None]  # told the partition and offset a record went to


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka message: where it goes, its partition key, its bytes (None: a
    tombstone); and, in memory only (never spooled), who to tell where it went once
    delivered, and the partition it must go to (None: its key's). A record spooled goes
    to its key's partition when replayed."""

    topic: str
    key: bytes
    value: bytes | None
    delivered: Delivered | None = field(default=None, compare=False)
    partition: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Segment:
    """A sealed segment's readable records not yet delivered, oldest first."""

    number: int
    records: list[Record]
    delivered: int = 0  # the records before these, delivered in an earlier run (``mark``)


def encode(record: Record) -> bytes:
    topic = record.topic.encode()
    value = record.value or b""  # None: a tombstone, framed as no bytes
    payload = b"".join((_FIELDS.pack(len(topic), len(record.key)), topic, record.key, value))
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes) -> tuple[list[Record], int]:
    """The records framed in ``data``, and how many bytes they span (the rest is torn)."""
    records: list[Record] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if end > len(data) or length < _FIELDS.size:
            break
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            break
        topic_len, key_len = _FIELDS.unpack_from(payload)
        topic_end = _FIELDS.size + topic_len
        if topic_end + key_len > length:
            break
        records.append(
            Record(
                topic=payload[_FIELDS.size : topic_end].decode(errors="replace"),
                key=payload[topic_end : topic_end + key_len],
                value=payload[topic_end + key_len :] or None,  # empty: a tombstone
            )
        )
        offset = end
    return records, offset


class SpoolBusy(OSError):
    """Another open spool (this process or another) owns the directory."""


def _claim(directory: Path) -> BinaryIO:
    """One owner per directory: two writers would number and delete each other's files."""
    owner: BinaryIO = (directory / "LOCK").open("ab")
    try:
        fcntl.flock(owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner.close()
        raise SpoolBusy(f"spool {directory} is already open elsewhere") from None
    return owner


class Spool:
    """Segment files under ``directory``; appends go to the newest, reads start at the oldest."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self._owner = _claim(directory)
        self._sizes: dict[int, int] = {}  # every segment file, by number
        for path in directory.glob(f"*{_SUFFIX}"):
            # Its own names only: not "²" (int() refuses it), nor "7.seg" (the spool
            # would read and delete 00000000000000000007.seg, not that file).
            if path.stem.isascii() and path.stem.isdigit() and path == self._path(int(path.stem)):
                self._sizes[int(path.stem)] = path.stat().st_size
        for path in directory.glob(f"*{_NOTE}*"):  # notes of segments gone (an ack cut
            # short), and notes half-written (a crash before their rename)
            number = path.name.split(".")[0]
            if number.isascii() and number.isdigit() and len(number) == 20:
                if path.name == f"{number}{_NOTE}.tmp" or (
                    path.name == f"{number}{_NOTE}" and int(number) not in self._sizes
                ):
                    path.unlink(missing_ok=True)
        self._next = max(self._sizes, default=0) + 1
        self._reserved: set[int] = set()
        self._unreadable: set[int] = set()  # segments oldest() could not read, left on disk
        self._aside: set[int] = set()  # of those, the ones oldest() passes over
        self._last_reserved = 0
        self._active: tuple[int, BinaryIO] | None = None  # never one from a previous run

    @property
    def size(self) -> int:
        """Bytes on disk: what ``max_bytes`` limits."""
        return sum(self._sizes.values())

    @property
    def empty(self) -> bool:
        """No segment to replay now (reservations not yet filled, and segments set
        aside as unreadable, aside)."""
        return self._sizes.keys() <= self._aside

    @property
    def unreadable(self) -> int:
        """Segments whose last read failed (left on disk)."""
        return len(self._unreadable)

    def read_again(self) -> None:
        """Let ``oldest`` try the segments set aside as unreadable again."""
        with self._lock:
            self._aside.clear()

    @property
    def segments(self) -> int:
        return len(self._sizes)

    def append(self, records: Sequence[Record]) -> int:
        """Write records behind everything spooled; return how many were refused.

        Records are taken in order while they fit under ``max_bytes``; from the first
        that does not, the rest are refused (so what is kept has no gaps). A disk error
        refuses the whole batch. Flushed and fsynced before returning.
        """
        with self._lock:
            frames: list[bytes] = []
            room = self.max_bytes - self.size
            for record in records:
                frame = encode(record)
                if len(frame) > room:
                    break
                frames.append(frame)
                room -= len(frame)
            if frames and not self._write_active(b"".join(frames)):
                return len(records)
            return len(records) - len(frames)

    def reserve(self) -> int:
        """A place in line before any later ``append``, for records whose fate is unknown.

        No I/O: appends simply move on to a segment numbered after the reservation.
        """
        with self._lock:
            number = self._take_number()
            self._reserved.add(number)
            self._last_reserved = number
            return number

    def fill(self, number: int, records: Sequence[Record]) -> int:
        """Write a reserved segment, whole and fsynced; return how many were refused.

        Exempt from ``max_bytes`` (these records are older than ones already spooled);
        a disk error refuses them all.
        """
        with self._lock:
            self._reserved.remove(number)
            if not records:
                return 0
            data = b"".join(encode(r) for r in records)
            path = self._path(number)
            try:
                with path.open("wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                self._sync_directory()
            except OSError:
                log.exception("spool: cannot write reserved segment %d; refused", number)
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
                return len(records)
            self._sizes[number] = len(data)
            return 0

    def release(self, number: int) -> None:
        """Give back a reservation that turned out not to be needed."""
        with self._lock:
            self._reserved.discard(number)

    def oldest(self) -> Segment | None:
        """The oldest segment not set aside, sealed first if appends were still going to
        it. One that cannot be read (``OSError``: permission denied, an I/O error) is set
        aside, left on disk, and the error raised; ``read_again`` tries it again. One
        whose file is gone (deleted from outside) is forgotten, logged at ERROR once:
        its events are lost; the next one is read."""
        with self._lock:
            while True:
                readable = self._sizes.keys() - self._aside
                if not readable:
                    return None
                number = min(readable)
                if self._reserved and min(self._reserved) < number:
                    raise RuntimeError(f"segment {min(self._reserved)} is reserved and not filled")
                if self._active is not None and self._active[0] == number:
                    self._seal()
                try:
                    records = self._read(number)
                except FileNotFoundError:  # deleted from outside: never readable again
                    self._forget(number)
                    continue
                except OSError as exc:
                    self._unreadable.add(number)
                    self._aside.add(number)
                    if exc.filename is None:  # a read's error, not the open's: name the file
                        exc.filename = str(self._path(number))
                    raise
                self._unreadable.discard(number)
                delivered = self._delivered(number, len(records))
                return Segment(number, records[delivered:], delivered)

    def mark(self, number: int, delivered: int) -> None:
        """The first ``delivered`` records of segment ``number`` were delivered: note it
        beside the segment (written whole, fsynced, then renamed into place), so that
        ``oldest`` in a later run leaves them out. A note lost (a crash before it, a
        disk error) only means they are replayed again."""
        with self._lock:
            if number not in self._sizes:
                return
            note = self._note(number)
            written = note.with_name(note.name + ".tmp")
            try:
                with written.open("w") as file:
                    file.write(f"{delivered}\n")
                    file.flush()
                    os.fsync(file.fileno())
                written.replace(note)
                self._sync_directory()
            except OSError:
                log.warning("spool: cannot note segment %d's progress", number, exc_info=True)

    def ack(self, number: int) -> None:
        """Every record of segment ``number`` was delivered: delete it."""
        with self._lock:
            if self._active is not None and self._active[0] == number:
                self._seal()
            self._note(number).unlink(missing_ok=True)  # first: a note never outlives it
            self._path(number).unlink(missing_ok=True)
            self._sizes.pop(number, None)
            self._unreadable.discard(number)
            self._aside.discard(number)

    def __iter__(self) -> Iterator[Record]:
        """Every readable record, oldest first (a snapshot per segment; no acks)."""
        with self._lock:
            numbers = sorted(self._sizes)
        for number in numbers:
            with self._lock:
                records = self._read(number) if number in self._sizes else []
            yield from records

    def close(self) -> None:
        """Close the segment being appended to, and let another owner open the spool."""
        with self._lock:
            self._seal()
            self._owner.close()

    def _write_active(self, data: bytes) -> bool:
        if self._active is not None and (
            self._sizes[self._active[0]] >= self._segment_bytes
            or self._active[0] < self._last_reserved  # keep behind the reserved place
        ):
            self._seal()
        if self._active is None:
            number = self._take_number()
            try:
                # Unbuffered: what a failed write leaves unwritten is not kept to be
                # flushed by the truncate that cuts the write off (failing it again).
                created: BinaryIO = self._path(number).open("ab", buffering=0)
            except OSError:
                log.exception("spool: cannot create segment %d in %s", number, self.directory)
                return False
            self._active = (number, created)
            self._sizes[number] = 0
        number, file = self._active
        before = self._sizes[number]
        try:
            written = 0
            while written < len(data):  # unbuffered: a write may take part of it
                written += file.write(data[written:])
            os.fsync(file.fileno())
            if before == 0:
                self._sync_directory()  # the new file's name survives a power loss too
        except OSError:
            log.exception("spool: write to segment %d failed; batch refused", number)
            with contextlib.suppress(OSError):  # cut the partial write off, if possible
                file.truncate(before)  # (if not, readers skip it as a torn tail)
            with contextlib.suppress(OSError):
                self._sizes[number] = self._path(number).stat().st_size
            self._seal()  # the next append starts a clean segment
            return False
        self._sizes[number] = before + len(data)
        return True

    def _read(self, number: int) -> list[Record]:
        data = self._path(number).read_bytes()
        records, good = decode(data)
        if good < len(data):
            log.warning(
                "spool: segment %d has %d unreadable bytes at offset %d (a torn write); "
                "skipped, %d records before it kept",
                number,
                len(data) - good,
                good,
                len(records),
            )
        return records

    def _forget(self, number: int) -> None:
        """A segment whose file is gone (deleted from outside llmtap): out of the index,
        its note deleted, logged at ERROR once. How many events it held is not known."""
        size = self._sizes.pop(number, 0)
        self._unreadable.discard(number)
        self._aside.discard(number)
        with contextlib.suppress(OSError):
            self._note(number).unlink(missing_ok=True)
        log.error(
            "spool: segment %s is gone (deleted outside llmtap): forgotten; the events "
            "it held (%d bytes) are lost",
            self._path(number),
            size,
        )

    def _delivered(self, number: int, records: int) -> int:
        """How many of the segment's first records its note says were delivered (0: no
        note, or one that cannot be right: all of it is replayed)."""
        try:
            delivered = int(self._note(number).read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError):
            log.warning("spool: segment %d's note cannot be read; replayed whole", number)
            return 0
        if not 0 <= delivered <= records:
            log.warning(
                "spool: segment %d's note says %d of its %d records were delivered; replayed whole",
                number,
                delivered,
                records,
            )
            return 0
        return delivered

    def _seal(self) -> None:
        if self._active is not None:
            file, self._active = self._active[1], None
            with contextlib.suppress(OSError):  # its data was fsynced, or its append refused
                file.close()

    def _take_number(self) -> int:
        number = self._next
        self._next += 1
        return number

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:020d}{_SUFFIX}"

    def _note(self, number: int) -> Path:
        return self.directory / f"{number:020d}{_NOTE}"

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
