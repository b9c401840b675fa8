"""llmtap/following.py without a broker: what one bad event does to the rest."""

from __future__ import annotations

from pydantic import BaseModel, field_validator

from llmtap.config import Settings
from llmtap.following import Follower


class Picky(BaseModel):
    x: int

    @field_validator("x")
    @classmethod
    def not_seven(cls, x: int) -> int:
        if x == 7:
            raise TypeError("a validator's bug")  # pydantic passes a TypeError through
        return x


def test_an_event_that_breaks_its_model_is_passed_over() -> None:
    seen: list[Picky] = []
    follower = Follower(Settings().kafka, "t", "test", Picky, seen.append)
    for raw in (b'{"x": 1}', b'{"x": 7}', b"", b'{"x": 2}'):
        follower._take(raw)  # raising here restarted run() before the batch's offsets
    assert [e.x for e in seen] == [1, 2]
