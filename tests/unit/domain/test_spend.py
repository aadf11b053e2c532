"""The spend rule of an account: a fee comes out of the month's quota first and out of the balance for the rest; a
new month starts at zero; an unmetered key's fees all count against the month and never touch its balance."""

from __future__ import annotations

import pytest

from orchestrator.domain.spend import CONNECTOR, Account

MAY, JUNE = 202405, 202406


def metered(quota: int, balance: int, used: int = 0, month: int = MAY) -> Account:
    return Account(month_quota=quota, balance=balance, month_fee=used, fee_month=month, metered=True)


def test_a_fee_within_the_quota_leaves_the_balance_alone() -> None:
    assert metered(100, 50).after(30, MAY) == (30, 50)
    assert metered(100, 50, used=30).after(70, MAY) == (100, 50)  # exactly the rest of the quota


def test_past_the_quota_the_rest_comes_off_the_balance() -> None:
    assert metered(100, 50, used=80).after(30, MAY) == (100, 40)
    assert metered(100, 50, used=100).after(30, MAY) == (100, 20)


def test_the_balance_may_go_below_zero() -> None:
    assert metered(0, 10).after(25, MAY) == (0, -15)


def test_a_quota_already_overspent_takes_nothing_more() -> None:
    # month_fee above the quota (the quota was lowered since): nothing comes from it, all from the balance.
    assert metered(100, 50, used=150).after(10, MAY) == (150, 40)


def test_a_new_month_starts_at_zero() -> None:
    spent = metered(100, 50, used=100, month=MAY)
    assert spent.after(30, JUNE) == (30, 50)
    assert spent.after(130, JUNE) == (100, 20)
    assert spent.after(0, JUNE) == (0, 50)


def test_a_month_that_is_not_the_accounts_starts_at_zero_whichever_way_it_lies() -> None:
    # The rule compares months for equality only: an earlier month is "another month" too.
    assert metered(100, 50, used=100, month=JUNE).after(10, MAY) == (10, 50)


def test_a_zero_fee_changes_nothing_in_the_same_month() -> None:
    assert metered(100, 50, used=40).after(0, MAY) == (40, 50)


def test_an_unmetered_key_counts_every_fee_against_the_month_and_never_its_balance() -> None:
    toolkit = Account(month_quota=0, balance=0, month_fee=5, fee_month=MAY, metered=False)
    assert toolkit.after(1000, MAY) == (1005, 0)
    assert toolkit.after(1000, JUNE) == (1000, 0)
    rich = Account(month_quota=10, balance=500, month_fee=0, fee_month=MAY, metered=False)
    assert rich.after(30, MAY) == (30, 500)  # past its quota, still off the month only


def test_charged_is_after_applied_and_moves_the_account_to_the_month() -> None:
    account = metered(100, 50, used=90, month=MAY)
    charged = account.charged(30, MAY)
    assert charged == Account(month_quota=100, balance=30, month_fee=100, fee_month=MAY, metered=True)
    assert account.month_fee == 90  # the account itself is left as it was (frozen)
    june = account.charged(30, JUNE)
    assert (june.month_fee, june.balance, june.fee_month) == (30, 50, JUNE)


def test_charges_in_a_row_are_one_charge_of_their_sum() -> None:
    account = metered(100, 50, used=20)
    for fees in [(10, 20, 30), (70, 40), (5, 200, 1)]:
        one_by_one = account
        for f in fees:
            one_by_one = one_by_one.charged(f, MAY)
        assert one_by_one == account.charged(sum(fees), MAY)


def test_an_account_is_immutable() -> None:
    with pytest.raises(AttributeError):
        metered(1, 1).balance = 2  # type: ignore[misc]


def test_the_connector_names_its_keys_kind() -> None:
    assert CONNECTOR == "connector"
