"""What each key may still spend, served from memory: the accounts as last written, plus the fees of calls
made since and not yet written (`pending`). The record writer settles both at once under `lock`, and the
catalog reloads the accounts under the same lock, so no fee is ever counted twice or not at all.

The rule each account follows is `orchestrator.domain.spend`; the ledger adds what is in flight to it.

LlmEndpoint's credits are a second kind of charge: taken from the balance alone, whatever the key's kind, and
checked against it before the call (`balance`).

Reservations: a metered key's call holds its worst case (`reserve`: its prompt and its max_tokens at the model's
prices) from admission until it ends, when the hold is given back and the real fee charged. A call is admitted
only if its worst case fits in what is left after every other pending fee and hold, so concurrent calls can never
take a key below zero together. Everything here runs on the event loop, so a check and its hold are one step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from orchestrator.domain.spend import Account
from orchestrator.platform.redis_limits import SharedLimits


class Ledger:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self._accounts: dict[int, Account] = {}
        self._pending: dict[int, int] = {}
        self._debits: dict[int, int] = {}
        """Credits spent and not yet written: off the balance alone."""
        self._holds: dict[int, int] = {}
        """The worst cases of metered calls in flight."""

    def _spent(self, key_id: int) -> int:
        return self._pending.get(key_id, 0) + self._holds.get(key_id, 0)

    def may_spend(self, key_id: int, month: int) -> bool:
        account = self._accounts.get(key_id)
        if account is None or not account.metered:
            return True
        month_fee, balance = account.after(self._spent(key_id), month)  # the hot path: no Account is built
        return month_fee < account.month_quota or balance - self._debits.get(key_id, 0) > 0

    def reserve(self, key_id: int, worst: int, month: int) -> int | None:
        """Hold `worst` for a call of a metered key: the amount held (0 for a key that is not metered, which is
        never refused), or None when it does not fit in what the key has left."""
        account = self._accounts.get(key_id)
        if account is None or not account.metered:
            return 0
        month_fee, balance = account.after(self._spent(key_id), month)
        left = max(account.month_quota - month_fee, 0) + balance - self._debits.get(key_id, 0)
        if worst and worst > left:  # a call that costs nothing fits even an overdrawn key
            return None
        if worst:
            self._holds[key_id] = self._holds.get(key_id, 0) + worst
        return worst

    def unreserve(self, key_id: int, held: int) -> None:
        if held:
            left = self._holds.get(key_id, 0) - held
            if left:
                self._holds[key_id] = left
            else:
                del self._holds[key_id]

    def charge(self, key_id: int, fee: int, *, on_balance: bool = False) -> None:
        """A call's fee (or, `on_balance`, its credits: reserved before the call, negative to give them back), on the
        hot path: counted at once, written by the next flush."""
        if fee:
            pending = self._debits if on_balance else self._pending
            left = pending.get(key_id, 0) + fee
            if left:
                pending[key_id] = left
            else:  # a reservation given back
                del pending[key_id]

    def balance(self, key_id: int, month: int) -> int:
        """What is left on the key's balance as of now (what its credits are), or 0 for an unknown key."""
        account = self._accounts.get(key_id)
        if account is None:
            return 0
        return account.after(self._spent(key_id), month)[1] - self._debits.get(key_id, 0)

    def account(self, key_id: int, month: int) -> Account | None:
        """The account with what is pending applied: what the key has as of now."""
        account = self._accounts.get(key_id)
        return None if account is None else account.charged(self._pending.get(key_id, 0), month)

    def replace(self, accounts: dict[int, Account]) -> None:
        """All accounts as read from the store (hold `lock` across the read and this call)."""
        self._accounts = accounts

    def settle(self, written: Iterable[tuple[int, int, bool]], fresh: dict[int, Account]) -> None:
        """Charges written, as (key id, fee, on_balance), and the accounts they left (hold `lock` across the write
        and this)."""
        for key_id, fee, on_balance in written:
            pending = self._debits if on_balance else self._pending
            left = pending.get(key_id, 0) - fee
            if left:
                pending[key_id] = left
            else:
                pending.pop(key_id, None)
        self._accounts.update(fresh)


class SharedLedger(Ledger):
    """The ledger of one instance among several (`ORCH_REDIS_URL`): a metered key's holds, and the fees of its calls
    made here and not yet written, are also counted in the shared store, and a call is admitted only if its worst
    case fits in what the key has left after those of every instance. Fees written stay counted in the store until
    every instance has read the accounts that carry them (at its next catalog reload): until then an instance that
    wrote them counts them twice, which refuses a call that would just fit rather than let one take the key below
    zero. While the store is out of reach, the in-memory rule of `Ledger` applies, to this instance's calls alone.
    """

    def __init__(self, shared: SharedLimits) -> None:
        super().__init__()
        self._shared = shared
        self._held_shared: dict[int, int] = {}
        """What this instance holds in the shared store, per key: holds and fees not yet written."""
        self._fees_shared: dict[int, int] = {}
        """The part of `_held_shared` that is fees (in `_pending` too): left out of the budget sent along."""

    def reserve(self, key_id: int, worst: int, month: int) -> int | None:
        account = self._accounts.get(key_id)
        if account is None or not account.metered or not worst:
            return super().reserve(key_id, worst, month)
        # What the key has left before any hold or fee counted in the shared store (this instance's included).
        month_fee, balance = account.after(self._pending.get(key_id, 0) - self._fees_shared.get(key_id, 0), month)
        budget = max(account.month_quota - month_fee, 0) + balance - self._debits.get(key_id, 0)
        fits = self._shared.reserve(key_id, worst, budget)
        if fits is None:
            return super().reserve(key_id, worst, month)
        if not fits:
            return None
        self._holds[key_id] = self._holds.get(key_id, 0) + worst
        _add(self._held_shared, key_id, worst)
        return worst

    def unreserve(self, key_id: int, held: int) -> None:
        super().unreserve(key_id, held)
        self._give_back(key_id, min(held, self._held_shared.get(key_id, 0) - self._fees_shared.get(key_id, 0)))

    def charge(self, key_id: int, fee: int, *, on_balance: bool = False) -> None:
        super().charge(key_id, fee, on_balance=on_balance)
        account = self._accounts.get(key_id)
        metered = account is not None and account.metered
        # Until it is written, the fee is counted for every instance as a hold of this one, which always fits.
        if fee > 0 and not on_balance and metered and self._shared.reserve(key_id, fee, _UNBOUNDED):
            _add(self._held_shared, key_id, fee)
            _add(self._fees_shared, key_id, fee)

    def settle(self, written: Iterable[tuple[int, int, bool]], fresh: dict[int, Account]) -> None:
        written = list(written)
        super().settle(written, fresh)
        given: dict[int, int] = {}
        for key_id, fee, on_balance in written:
            fees = min(fee, self._fees_shared.get(key_id, 0)) if not on_balance else 0
            if fees > 0:
                _add(self._fees_shared, key_id, -fees)
                _add(self._held_shared, key_id, -fees)
                _add(given, key_id, fees)
        if given:  # one round trip for the whole batch
            self._shared.written(given)

    def _give_back(self, key_id: int, amount: int) -> None:
        if amount > 0:
            _add(self._held_shared, key_id, -amount)
            self._shared.unreserve(key_id, amount)


_UNBOUNDED = 2**62
"""A budget that always fits: what has been spent is counted whatever is left."""


def _add(counts: dict[int, int], key_id: int, amount: int) -> None:
    left = counts.get(key_id, 0) + amount
    if left:
        counts[key_id] = left
    else:
        counts.pop(key_id, None)
