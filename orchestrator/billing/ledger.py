"""What each key may still spend, served from memory: the accounts as last written, plus the fees of calls
made since and not yet written (`pending`). The record writer settles both at once under `lock`, and the
catalog reloads the accounts under the same lock, so no fee is ever counted twice or not at all.

The rule each account follows is `orchestrator.domain.spend`; the ledger adds what is in flight to it.

LlmEndpoint's credits are a second kind of charge: taken from the balance alone, whatever the key's kind. A call's
credits are checked and reserved in one step before the call (`take_credits`), kept when it delivered, and given back
once otherwise (`give_credits`).

Reservations: a metered key's call holds its worst case (`reserve`: its prompt and its max_tokens at the model's
prices) from admission until it ends, when the hold is given back and the real fee charged. A call is admitted
only if its worst case fits in what is left after every other pending fee and hold, so concurrent calls can never
take a key below zero together. Everything here runs on the event loop, so a check and its hold are one step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from orchestrator.domain.spend import Account
from orchestrator.platform.redis_limits import Pool, SharedLimits


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

    async def reserve_async(self, key_id: int, worst: int, month: int) -> int | None:
        """`reserve`, for a caller on the event loop (a shared store's round trip does not block it)."""
        return self.reserve(key_id, worst, month)

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

    def take_credits(self, key_id: int, price: int, month: int) -> bool:
        """Reserve `price` credits off the key's balance if it has them: the check and the reservation are one step,
        so concurrent calls can never spend the same credits. Whether they were taken."""
        if self.balance(key_id, month) < price:
            return False
        Ledger.charge(self, key_id, price, on_balance=True)
        return True

    def give_credits(self, key_id: int, price: int) -> None:
        """Give back credits taken by `take_credits` (the call delivered nothing)."""
        Ledger.charge(self, key_id, -price, on_balance=True)

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
    case fits in what the key has left after those of every instance. LlmEndpoint's credits taken here are counted
    there too, so every instance's credits together never exceed the key's balance. Fees and credits written stay
    counted in the store until every instance has read the accounts that carry them (at its next catalog reload):
    until then an instance that wrote them counts them twice, which refuses a call that would just fit rather than
    let one take the key below zero. While the store is out of reach, the in-memory rule of `Ledger` applies, to
    this instance's calls alone.

    Every call of a key (each `reserve` until its `unreserve`, then its record until it is written) marks the key
    busy in the shared store, so that deleting it on another instance can see it in use (`busy_elsewhere`). A mark
    is set when the key's first call here starts and lifted after a records flush leaves it nothing in flight or
    unwritten here: a key in steady use costs no round trip per call.
    """

    def __init__(self, shared: SharedLimits, *, unwritten: Callable[[int], bool] | None = None) -> None:
        super().__init__()
        self._shared = shared
        self._unwritten = unwritten or (lambda _key_id: False)
        """Whether a call of the key waits to be written here (the records' buffer)."""
        self._held_shared: dict[int, int] = {}
        """What this instance holds in the shared store, per key: holds and fees not yet written."""
        self._fees_shared: dict[int, int] = {}
        """The part of `_held_shared` that is fees (in `_pending` too): left out of the budget sent along."""
        self._credits_shared: dict[int, int] = {}
        """The credits taken here and counted in the shared store (in `_debits` too), per key."""
        self._calls: dict[int, int] = {}
        """Calls in flight here per key (each `reserve` until its `unreserve`)."""
        self._marked: set[int] = set()
        """Keys marked busy in the shared store by this instance."""
        self._idle: set[int] = set()
        """Marked keys with no call in flight here: their marks are lifted once their records are written."""
        shared.counted_by(self._counted)  # what the store is told this instance holds, after an outage

    def _counted(self) -> dict[tuple[Pool, int], int]:
        """What this instance holds in the shared store, by pool and key: holds with unwritten fees, and credits."""
        counts: dict[tuple[Pool, int], int] = {("holds", k): n for k, n in self._held_shared.items()}
        counts.update((("credits", k), n) for k, n in self._credits_shared.items())
        return counts

    def reserve(self, key_id: int, worst: int, month: int) -> int | None:
        budget = self._budget(key_id, worst, month)
        fits = None if budget is None else self._shared.reserve(key_id, worst, budget)
        return self._reserved(key_id, worst, month, fits)

    async def reserve_async(self, key_id: int, worst: int, month: int) -> int | None:
        budget = self._budget(key_id, worst, month)
        fits = None if budget is None else await self._shared.reserve_async(key_id, worst, budget)
        return self._reserved(key_id, worst, month, fits)

    def _budget(self, key_id: int, worst: int, month: int) -> int | None:
        """What a metered key has left before any hold, fee or credits counted in the shared store (this instance's
        too); None when the shared store has no say (a key that is not metered, a call that costs nothing)."""
        account = self._accounts.get(key_id)
        if account is None or not account.metered or not worst:
            return None
        month_fee, balance = account.after(self._pending.get(key_id, 0) - self._fees_shared.get(key_id, 0), month)
        return max(account.month_quota - month_fee, 0) + balance - self._debits_unshared(key_id)

    def _reserved(self, key_id: int, worst: int, month: int, fits: bool | None) -> int | None:
        """The hold, from the shared store's answer (None: the in-memory rule decides)."""
        if fits is None:
            held = super().reserve(key_id, worst, month)
        elif fits:
            self._holds[key_id] = self._holds.get(key_id, 0) + worst
            _add(self._held_shared, key_id, worst)
            held = worst
        else:
            return None
        if held is not None:
            _add(self._calls, key_id, 1)
            self._idle.discard(key_id)
            if key_id not in self._marked and self._shared.mark_busy(key_id):
                self._marked.add(key_id)
        return held

    def unreserve(self, key_id: int, held: int) -> None:
        super().unreserve(key_id, held)
        _add(self._calls, key_id, -1)
        if key_id not in self._calls and key_id in self._marked:
            self._idle.add(key_id)
        self._give_back(key_id, min(held, self._held_shared.get(key_id, 0) - self._fees_shared.get(key_id, 0)))

    def take_credits(self, key_id: int, price: int, month: int) -> bool:
        account = self._accounts.get(key_id)
        if account is None or price <= 0:
            return super().take_credits(key_id, price, month)
        # The balance before anything counted in the shared store: this instance's own holds and fees are there.
        month_fee, balance = account.after(self._spent(key_id) - self._held_shared.get(key_id, 0), month)
        quota_left = max(account.month_quota - month_fee, 0) if account.metered else _UNBOUNDED
        taken = self._shared.take_credits(key_id, price, balance - self._debits_unshared(key_id), quota_left)
        if taken is None:
            return super().take_credits(key_id, price, month)
        if taken:
            Ledger.charge(self, key_id, price, on_balance=True)
            _add(self._credits_shared, key_id, price)
        return taken

    def give_credits(self, key_id: int, price: int) -> None:
        super().give_credits(key_id, price)
        shared = min(price, self._credits_shared.get(key_id, 0))
        if shared > 0:
            _add(self._credits_shared, key_id, -shared)
            self._shared.unreserve(key_id, shared, pool="credits")

    def charge(self, key_id: int, fee: int, *, on_balance: bool = False) -> None:
        super().charge(key_id, fee, on_balance=on_balance)
        account = self._accounts.get(key_id)
        metered = account is not None and account.metered
        # Until it is written, the fee is counted for every instance as a hold of this one, which always fits.
        if fee > 0 and not on_balance and metered:
            _add(self._held_shared, key_id, fee)  # counted here before it is sent (what a resync would set)
            _add(self._fees_shared, key_id, fee)
            self._shared.hold_fee(key_id, fee)

    def settle(self, written: Iterable[tuple[int, int, bool]], fresh: dict[int, Account]) -> None:
        written = list(written)
        super().settle(written, fresh)
        fees: dict[int, int] = {}
        credits: dict[int, int] = {}
        for key_id, fee, on_balance in written:
            counted = self._credits_shared if on_balance else self._fees_shared
            amount = min(fee, counted.get(key_id, 0))
            if amount > 0:
                _add(counted, key_id, -amount)
                if not on_balance:
                    _add(self._held_shared, key_id, -amount)
                _add(credits if on_balance else fees, key_id, amount)
        if fees:  # one round trip for the whole batch
            self._shared.written(fees)
        if credits:
            self._shared.written(credits, pool="credits")
        self._unmark_idle()

    def busy_elsewhere(self, key_id: int) -> bool | None:
        """Whether another instance has calls of the key in flight or not yet written, or None (not known now)."""
        return self._shared.busy_elsewhere(key_id)

    def _unmark_idle(self) -> None:
        """Lift the busy marks of the keys with nothing in flight or unwritten here (after a flush wrote a batch):
        only those whose calls ended are looked at, so a flush costs nothing for the keys in use."""
        idle = [k for k in self._idle if not self._unwritten(k)]
        if idle and self._shared.unmark_busy(idle):
            self._marked.difference_update(idle)
            self._idle.difference_update(idle)

    def _debits_unshared(self, key_id: int) -> int:
        """Credits taken here and not counted in the shared store (taken while it was out of reach)."""
        return self._debits.get(key_id, 0) - self._credits_shared.get(key_id, 0)

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
