"""The spend rule (the connector's), pure: a key whose month changed starts the month at zero; a fee is taken from
the month's quota first and from the balance for the rest; a metered key that has used its quota and has no balance
left is refused ("Please recharge."). Unmetered keys (the toolkit's) are charged but never refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

CONNECTOR = "connector"
"""The kind of key the connector surface issues (br-): bound models only, metered, the connector's messages."""


@dataclass(slots=True, frozen=True)
class Account:
    month_quota: int
    balance: int
    month_fee: int
    fee_month: int
    metered: bool

    def after(self, fee: int, month: int) -> tuple[int, int]:
        """(month_fee, balance) after `fee` in `month`: quota first, then balance (the store's SQL does the same)."""
        month_fee = self.month_fee if self.fee_month == month else 0
        from_quota = min(fee, max(self.month_quota - month_fee, 0)) if self.metered else fee
        return month_fee + from_quota, self.balance - (fee - from_quota)

    def charged(self, fee: int, month: int) -> Account:
        month_fee, balance = self.after(fee, month)
        return replace(self, month_fee=month_fee, balance=balance, fee_month=month)
