"""Money as integer units of 10^-12 dollars: amounts and prices as entered, their rounding, dollars back, fees and
billing months."""

from __future__ import annotations

from decimal import Decimal

import pytest

from orchestrator.domain.money import CREDIT, MAX_USD, UNIT, BadAmount, fee, month_of, per_token, units, usd


def test_a_dollar_is_ten_to_the_twelve_units_and_a_credit_a_millionth_of_it() -> None:
    assert UNIT == 10**12
    assert CREDIT == 10**6
    assert MAX_USD == 1_000_000


@pytest.mark.parametrize(
    ("entered", "expected"),
    [
        (1, 10**12),
        (0, 0),
        ("0.5", 5 * 10**11),
        (0.1, 10**11),  # a float is read as it prints, not as its binary value
        (Decimal("12.34"), 12_340_000_000_000),
        ("1e-12", 1),
        ("1e6", 10**18),  # the largest amount there is
        (1_000_000, 10**18),
        ("-0", 0),
    ],
)
def test_units_of_an_amount_as_entered(entered: float | int | str | Decimal, expected: int) -> None:
    assert units(entered) == expected


@pytest.mark.parametrize(
    ("entered", "expected"),
    [
        ("0.0000000000005", 0),  # half a unit: to the even neighbour
        ("0.0000000000015", 2),
        ("0.0000000000025", 2),
        ("0.00000000000051", 1),
        ("0.0000000000001", 0),
    ],
)
def test_fractions_of_a_unit_round_half_to_even(entered: str, expected: int) -> None:
    assert units(entered) == expected


@pytest.mark.parametrize(
    ("entered", "message"),
    [
        ("abc", "is not a number"),
        ("", "is not a number"),
        (True, "is not a number"),  # str(True) is no amount
        ("NaN", "is not a finite number"),
        ("Infinity", "is not a finite number"),
        (float("inf"), "is not a finite number"),
        (-1, "must not be negative"),
        ("-0.01", "must not be negative"),
        ("1000000.000001", "must be at most 1000000"),
        (1_000_001, "must be at most 1000000"),
    ],
)
def test_what_is_not_an_amount_is_refused_saying_why(entered: object, message: str) -> None:
    with pytest.raises(BadAmount) as raised:
        units(entered)  # type: ignore[arg-type]  # what a JSON body may carry
    assert str(raised.value) == message


def test_bad_amount_is_a_value_error() -> None:
    assert issubclass(BadAmount, ValueError)


@pytest.mark.parametrize(
    ("per_million", "per_token_units"),
    [
        (1, 10**6),
        (3, 3 * 10**6),
        ("0.000001", 1),  # the smallest price per million tokens that is exact
        ("0.0000005", 0),  # half a unit per token: to the even neighbour
        ("0.0000015", 2),
        ("0.0000025", 2),
        ("2.5", 2_500_000),
        (0, 0),
    ],
)
def test_a_price_per_million_tokens_is_kept_per_token(per_million: str | int, per_token_units: int) -> None:
    assert per_token(per_million) == per_token_units


def test_a_price_is_refused_as_an_amount_is() -> None:
    with pytest.raises(BadAmount, match="must not be negative"):
        per_token(-1)
    with pytest.raises(BadAmount, match="is not a number"):
        per_token("free")


@pytest.mark.parametrize(
    ("amount", "dollars"),
    [(UNIT, 1.0), (0, 0.0), (1, 1e-12), (12_340_000_000_000, 12.34), (-UNIT // 2, -0.5), (10**18, 1e6)],
)
def test_units_back_to_dollars(amount: int, dollars: float) -> None:
    assert usd(amount) == dollars


def test_dollars_round_trip_through_units() -> None:
    for entered in ["0.01", "12.34", "999999.999999", "0.000000000001"]:
        assert usd(units(entered)) == float(entered)


def test_a_fee_is_each_side_at_its_own_price_exactly() -> None:
    assert fee(10, 20, 3, 5) == 10 * 3 + 20 * 5
    assert fee(0, 0, 7, 9) == 0
    assert fee(1_000_000, 1_000_000, per_token(1), per_token(3)) == 4 * UNIT  # $1 + $3 per million
    assert fee(7, 0, per_token("0.000001"), 10**9) == 7  # no rounding: units in, units out


@pytest.mark.parametrize(
    ("at", "month"),
    [
        (0, 197001),
        (1704067199, 202312),  # 2023-12-31 23:59:59 UTC
        (1704067200, 202401),  # 2024-01-01 00:00:00 UTC
        (1709251199.9, 202402),  # the last instant of a leap February
        (1709251200, 202403),
    ],
)
def test_the_billing_month_of_a_moment_is_its_utc_month(at: float, month: int) -> None:
    assert month_of(at) == month
