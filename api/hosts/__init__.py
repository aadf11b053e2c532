"""The admin API of registered GPU servers (the `hosts` backend), `/api/v1/hosts`, in the toolkit's error shapes."""
