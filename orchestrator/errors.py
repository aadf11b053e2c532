"""Domain errors. The api package alone maps them to HTTP statuses and each surface's envelope.

DomainError
├── NotFound           a referenced row does not exist (or is deleted)
├── Conflict           the request clashes with current state (duplicate, already disabled)
├── InvalidInput       a value the schema accepted breaks a domain rule; names the field
└── InvalidTransition  a lifecycle move the transition table forbids (a bug, never user input)
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
