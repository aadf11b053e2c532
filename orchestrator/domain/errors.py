"""Domain errors. The api package alone maps them to HTTP statuses and each surface's envelope.

DomainError
├── NotFound           a referenced row does not exist (or is deleted)
├── Conflict           the request clashes with current state (duplicate, already disabled)
├── InvalidInput       a value the schema accepted breaks a domain rule; names the field
├── InvalidTransition  a lifecycle move the transition table forbids (a bug, never user input)
└── Unavailable        the database cannot be reached now; the same request may succeed later
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""


class NotFound(DomainError):
    pass


class Conflict(DomainError):
    pass


class InvalidInput(DomainError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class InvalidTransition(DomainError):
    pass


class Unavailable(DomainError):
    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """How long a caller should wait before trying again (a database restart takes seconds)."""
