"""The ledger: what a key may still spend, from its account as last written plus what is pending (fees, credits)
and held (the worst cases of calls in flight), and what a write of the pending charges leaves."""

from __future__ import annotations

from orchestrator.billing.ledger import Ledger
from orchestrator.domain.spend import Account

MAY, JUNE = 202405, 202406
KEY, OTHER, UNKNOWN, TOOLKIT = 1, 2, 99, 3


def metered(quota: int, balance: int, used: int = 0, month: int = MAY) -> Account:
    return Account(month_quota=quota, balance=balance, month_fee=used, fee_month=month, metered=True)


def unmetered() -> Account:
    return Account(month_quota=0, balance=0, month_fee=0, fee_month=MAY, metered=False)


def ledger(**accounts: Account) -> Ledger:
    ids = {"key": KEY, "other": OTHER, "toolkit": TOOLKIT}
    led = Ledger()
    led.replace({ids[name]: account for name, account in accounts.items()})
    return led


# -- may_spend -------------------------------------------------------------------------------------


def test_a_key_with_quota_or_balance_left_may_spend() -> None:
    assert ledger(key=metered(100, 0)).may_spend(KEY, MAY)
    assert ledger(key=metered(0, 1)).may_spend(KEY, MAY)
    assert ledger(key=metered(100, 0, used=99)).may_spend(KEY, MAY)


def test_a_key_with_its_quota_used_and_no_balance_may_not() -> None:
    assert not ledger(key=metered(100, 0, used=100)).may_spend(KEY, MAY)
    assert not ledger(key=metered(0, 0)).may_spend(KEY, MAY)
    assert not ledger(key=metered(0, -5)).may_spend(KEY, MAY)


def test_a_new_month_gives_the_quota_back() -> None:
    led = ledger(key=metered(100, 0, used=100, month=MAY))
    assert not led.may_spend(KEY, MAY)
    assert led.may_spend(KEY, JUNE)


def test_pending_fees_and_holds_count_as_spent() -> None:
    led = ledger(key=metered(100, 0))
    led.charge(KEY, 60)
    assert led.may_spend(KEY, MAY)
    assert led.reserve(KEY, 40, MAY) == 40
    assert not led.may_spend(KEY, MAY)  # 60 pending + 40 held: the quota is used
    led.unreserve(KEY, 40)
    assert led.may_spend(KEY, MAY)


def test_credits_spent_come_off_the_balance_only() -> None:
    led = ledger(key=metered(0, 10))
    led.charge(KEY, 10, on_balance=True)
    assert not led.may_spend(KEY, MAY)
    # With quota left, credits spent from the balance do not stop the key.
    led = ledger(key=metered(100, 10))
    led.charge(KEY, 10, on_balance=True)
    assert led.may_spend(KEY, MAY)


def test_unknown_and_unmetered_keys_may_always_spend() -> None:
    led = ledger(toolkit=unmetered())
    led.charge(TOOLKIT, 10**6)
    assert led.may_spend(TOOLKIT, MAY)
    assert led.may_spend(UNKNOWN, MAY)


# -- reserve / unreserve ---------------------------------------------------------------------------


def test_a_hold_that_fits_in_quota_and_balance_together_is_taken() -> None:
    led = ledger(key=metered(100, 50, used=40))
    assert led.reserve(KEY, 110, MAY) == 110  # 60 of quota + 50 of balance: exactly what is left
    assert led.reserve(KEY, 1, MAY) is None  # nothing is left for another


def test_a_hold_that_does_not_fit_is_refused_and_holds_nothing() -> None:
    led = ledger(key=metered(100, 50, used=40))
    assert led.reserve(KEY, 111, MAY) is None
    assert led.reserve(KEY, 110, MAY) == 110  # the refused one took nothing


def test_holds_add_up_and_each_is_given_back() -> None:
    led = ledger(key=metered(100, 0))
    assert led.reserve(KEY, 30, MAY) == 30
    assert led.reserve(KEY, 30, MAY) == 30
    assert led.reserve(KEY, 50, MAY) is None  # 40 left
    led.unreserve(KEY, 30)
    assert led.reserve(KEY, 70, MAY) == 70
    assert led.balance(KEY, MAY) == 0  # holds were all inside the quota
    led.unreserve(KEY, 30)
    led.unreserve(KEY, 70)
    assert led.reserve(KEY, 100, MAY) == 100  # everything given back: the whole quota again


def test_pending_fees_and_credits_shrink_what_a_hold_may_take() -> None:
    led = ledger(key=metered(100, 50))
    led.charge(KEY, 80)  # 20 of quota left, balance 50
    led.charge(KEY, 20, on_balance=True)  # balance 30
    assert led.reserve(KEY, 51, MAY) is None
    assert led.reserve(KEY, 50, MAY) == 50


def test_a_call_that_costs_nothing_fits_even_an_overdrawn_key() -> None:
    led = ledger(key=metered(0, -100))
    assert led.reserve(KEY, 0, MAY) == 0
    assert led.reserve(KEY, 1, MAY) is None
    led.unreserve(KEY, 0)  # giving back nothing is allowed
    assert led.reserve(KEY, 0, MAY) == 0


def test_unknown_and_unmetered_keys_hold_nothing_and_are_never_refused() -> None:
    led = ledger(toolkit=unmetered())
    assert led.reserve(TOOLKIT, 10**9, MAY) == 0
    assert led.reserve(UNKNOWN, 10**9, MAY) == 0


def test_a_hold_of_one_key_leaves_another_alone() -> None:
    led = ledger(key=metered(10, 0), other=metered(10, 0))
    assert led.reserve(KEY, 10, MAY) == 10
    assert led.reserve(OTHER, 10, MAY) == 10


def test_last_months_spending_does_not_shrink_this_months_hold() -> None:
    led = ledger(key=metered(100, 0, used=100, month=MAY))
    assert led.reserve(KEY, 1, MAY) is None
    assert led.reserve(KEY, 100, JUNE) == 100


# -- charge and balance ----------------------------------------------------------------------------


def test_the_balance_is_what_is_left_after_the_quota_and_the_credits() -> None:
    led = ledger(key=metered(100, 50))
    assert led.balance(KEY, MAY) == 50
    led.charge(KEY, 120)  # 100 from the quota, 20 from the balance
    assert led.balance(KEY, MAY) == 30
    led.charge(KEY, 5, on_balance=True)
    assert led.balance(KEY, MAY) == 25


def test_credits_taken_back_with_a_negative_charge_cancel_out() -> None:
    led = ledger(key=metered(0, 50))
    led.charge(KEY, 20, on_balance=True)
    assert led.balance(KEY, MAY) == 30
    led.charge(KEY, -20, on_balance=True)  # a reservation of credits given back
    assert led.balance(KEY, MAY) == 50
    assert led.may_spend(KEY, MAY)


def test_holds_count_in_the_balance_too() -> None:
    led = ledger(key=metered(0, 50))
    assert led.reserve(KEY, 20, MAY) == 20
    assert led.balance(KEY, MAY) == 30


def test_a_zero_charge_changes_nothing() -> None:
    led = ledger(key=metered(0, 50))
    led.charge(KEY, 0)
    led.charge(KEY, 0, on_balance=True)
    assert led.balance(KEY, MAY) == 50
    assert led.account(KEY, MAY) == metered(0, 50)


def test_an_unknown_key_has_no_balance() -> None:
    led = Ledger()
    led.charge(UNKNOWN, 10)
    assert led.balance(UNKNOWN, MAY) == 0


# -- account ---------------------------------------------------------------------------------------


def test_the_account_as_of_now_has_the_pending_fees_applied() -> None:
    led = ledger(key=metered(100, 50, used=10))
    led.charge(KEY, 120)
    assert led.account(KEY, MAY) == metered(100, 20, used=100)  # 90 from the quota, 30 from the balance
    assert led.account(KEY, JUNE) == Account(100, 30, 100, JUNE, True)  # the pending 120 in a new month
    assert led.account(UNKNOWN, MAY) is None


def test_the_account_leaves_holds_and_credits_out() -> None:
    # What a key has as of now, as the account reports it: only fees charged count, not calls in flight, and not
    # credits (those are read with `balance`).
    led = ledger(key=metered(100, 50))
    assert led.reserve(KEY, 70, MAY) == 70
    led.charge(KEY, 30, on_balance=True)
    assert led.account(KEY, MAY) == metered(100, 50)
    assert led.balance(KEY, MAY) == 20


# -- replace and settle ----------------------------------------------------------------------------


def test_settling_a_write_moves_the_fee_from_pending_into_the_account() -> None:
    led = ledger(key=metered(100, 50))
    led.charge(KEY, 120)
    led.settle([(KEY, 120, False)], {KEY: metered(100, 30, used=100)})
    assert led.account(KEY, MAY) == metered(100, 30, used=100)
    assert led.balance(KEY, MAY) == 30  # counted once: from the account, no longer pending


def test_a_fee_charged_while_the_write_ran_stays_pending() -> None:
    led = ledger(key=metered(100, 50))
    led.charge(KEY, 40)
    led.charge(KEY, 25)  # after the batch of 40 was taken for the write
    led.settle([(KEY, 40, False)], {KEY: metered(100, 50, used=40)})
    assert led.account(KEY, MAY) == metered(100, 50, used=65)


def test_settling_credits_takes_them_off_the_debits() -> None:
    led = ledger(key=metered(0, 50))
    led.charge(KEY, 20, on_balance=True)
    led.settle([(KEY, 20, True)], {KEY: metered(0, 30)})
    assert led.balance(KEY, MAY) == 30
    assert led.may_spend(KEY, MAY)


def test_settling_names_which_pending_a_charge_was() -> None:
    led = ledger(key=metered(0, 50))
    led.charge(KEY, 10)
    led.charge(KEY, 5, on_balance=True)
    led.settle([(KEY, 10, False)], {KEY: metered(0, 40)})
    assert led.balance(KEY, MAY) == 35  # the credits are still pending
    led.settle([(KEY, 5, True)], {KEY: metered(0, 35)})
    assert led.balance(KEY, MAY) == 35
    assert led.reserve(KEY, 35, MAY) == 35


def test_settling_what_was_never_pending_changes_only_the_accounts() -> None:
    # A replayed call (written from the journal after a crash) was never pending here.
    led = ledger(key=metered(100, 50))
    led.settle([], {KEY: metered(100, 50, used=70), OTHER: metered(5, 5)})
    assert led.account(KEY, MAY) == metered(100, 50, used=70)
    assert led.account(OTHER, MAY) == metered(5, 5)


def test_settle_keeps_accounts_it_was_not_given_and_replace_drops_them() -> None:
    led = ledger(key=metered(100, 50), other=metered(10, 10))
    led.settle([], {KEY: metered(100, 40)})
    assert led.account(OTHER, MAY) == metered(10, 10)
    led.replace({KEY: metered(1, 1)})
    assert led.account(OTHER, MAY) is None
    assert led.account(KEY, MAY) == metered(1, 1)
