"""Feishu (Lark) chat bots: the open API client, the bots with their sealed secrets, and the receiver that answers
their message events through the gateway."""
