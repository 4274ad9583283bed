"""check_grant_times: a grant's whole-minute times from a request's, bounded
so that no minute arithmetic reaches the end of datetime's range."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.billing.domain.credits import MAX_AHEAD, MAX_LIFETIME, check_grant_times
from services.billing.domain.fields import check_name, shown
from services.common.errors import InvalidArgument

NOW = datetime(2026, 3, 1, 10, 0, 30, tzinfo=UTC)
END = datetime(9999, 12, 31, 23, 59, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("effective", "expires", "after", "want"),
    [
        (None, None, None, (datetime(2026, 3, 1, 10, 1, tzinfo=UTC), None)),
        (
            None,
            None,
            timedelta(minutes=90, seconds=30),
            (datetime(2026, 3, 1, 10, 1, tzinfo=UTC), datetime(2026, 3, 1, 11, 31, tzinfo=UTC)),
        ),
        (
            NOW + MAX_AHEAD,
            NOW + MAX_AHEAD + MAX_LIFETIME - timedelta(minutes=1),
            None,
            (
                datetime(2031, 3, 2, 10, 1, tzinfo=UTC),
                datetime(2041, 3, 9, 9, 59, tzinfo=UTC),
            ),
        ),
    ],
)
def test_grant_times_within_bounds(
    effective: datetime | None,
    expires: datetime | None,
    after: timedelta | None,
    want: tuple[datetime, datetime | None],
) -> None:
    assert check_grant_times(NOW, effective, expires, after) == want


@pytest.mark.parametrize(
    ("effective", "expires", "after", "words"),
    [
        (END, None, None, "effective_time: at most 1827 days"),
        (datetime(9999, 12, 31, 23, 58, tzinfo=UTC), None, timedelta(seconds=120), "effective"),
        (datetime(9000, 1, 1, tzinfo=UTC), None, None, "effective_time: at most"),
        (NOW + MAX_AHEAD + timedelta(seconds=1), None, None, "effective_time: at most"),
        (NOW - timedelta(seconds=6), None, None, "effective_time: must not be in the past"),
        (None, END, None, "expire_time: at most 3660 days"),
        (None, NOW + timedelta(minutes=1) + MAX_LIFETIME, None, "expire_time: at most"),
        (None, None, MAX_LIFETIME + timedelta(seconds=1), "expire_after: at most 3660 days"),
        (None, None, timedelta(seconds=59), "expire_after: at least one minute"),
        (None, NOW - timedelta(hours=1), None, "after now (effective_time's default)"),
        (NOW + timedelta(hours=1), NOW, None, "minute after effective_time,"),
        (None, NOW + timedelta(hours=1), timedelta(hours=1), "not both"),
    ],
)
def test_grant_times_out_of_bounds(
    effective: datetime | None, expires: datetime | None, after: timedelta | None, words: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_grant_times(NOW, effective, expires, after)
    assert words in str(caught.value)


@pytest.mark.parametrize("name", ["", " ", "\t\n", "\u3000"])
def test_blank_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^name: "):
        check_name("name", name)


def test_a_name_with_spaces_around_words_is_kept() -> None:
    check_name("name", " Tokens ")


def test_shown_quotes_at_most_a_prefix() -> None:
    assert shown("abc") == "'abc'"
    long = shown("z" * 10_000)
    assert len(long) < 100 and "10000 characters" in long
