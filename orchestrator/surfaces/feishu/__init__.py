"""Feishu (Lark) chat bots: the open API client, the bots with their sealed secrets."""
