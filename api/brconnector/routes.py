"""The Bedrock connector's surface as three routers: `/admin` for admins, `/user` for any valid key, and the
bots' event receivers, which Feishu calls without a key."""

from __future__ import annotations

from litestar import Router

from api.brconnector.admin import GroupController, KeyController, ModelController, PaymentController, statistics
from api.brconnector.bots import BotConnectors, FeishuBots, feishu_event
from api.brconnector.envelope import HANDLERS, admin_key, any_key
from api.brconnector.records import AdminRecords, UserRecords
from api.deps import SERVICES


def connector_routers() -> list[Router]:
    common = {"dependencies": SERVICES, "exception_handlers": dict(HANDLERS)}
    admin = [
        KeyController,
        PaymentController,
        ModelController,
        GroupController,
        statistics,
        AdminRecords,
        FeishuBots,
        BotConnectors,
    ]
    return [
        Router(path="/", route_handlers=admin, guards=[admin_key], **common),  # type: ignore[arg-type]
        Router(path="/", route_handlers=[UserRecords], guards=[any_key], **common),  # type: ignore[arg-type]
        Router(path="/", route_handlers=[feishu_event], **common),  # type: ignore[arg-type]
    ]
