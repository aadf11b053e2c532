"""The connector's admin routes (`/admin`, role admin): keys and payments, priced models, groups, model
bindings and the totals. Each route: parse -> call the domain -> the envelope."""

from __future__ import annotations

import json
from typing import Annotated, Any

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter, QueryParameter
from litestar.status_codes import HTTP_200_OK

from api.brconnector import schemas as s
from api.brconnector.envelope import ok, page
from orchestrator.billing.accounts import AccountService, KeyRef
from orchestrator.domain import money
from orchestrator.domain.errors import Conflict, InvalidInput
from orchestrator.fleet.models import ModelService

Limit = Annotated[int, QueryParameter(ge=1, le=1000)]
Offset = Annotated[int, QueryParameter(ge=0, le=s.MAX_ID)]
OptId = Annotated[int | None, QueryParameter(ge=0, le=s.MAX_ID)]
PathId = Annotated[int, PathParameter(ge=1, le=s.MAX_ID)]
Text = Annotated[str | None, QueryParameter(max_length=255, pattern=s.NO_NUL)]


def _ref(data: s.KeyRefIn) -> KeyRef:
    if data.id is None and not data.api_key:
        raise InvalidInput("id", "api_key or id is required")
    return KeyRef(data.id, data.api_key)


class KeyController(Controller):
    path = "/admin/api-key"
    tags = ["connector: keys"]

    @post("/apply", status_code=HTTP_200_OK)
    async def apply(self, accounts: NamedDependency[AccountService], data: JSONBody[s.ApplyKeyIn]) -> dict[str, Any]:
        key, plain = await accounts.apply(
            name=data.name,
            group_id=data.group_id or None,
            role=data.role,
            email=data.email or None,
            month_quota=s.units("month_quota", data.month_quota),
            balance=s.units("balance", data.balance),
            allowed_rpm=data.allowed_rpm,
            allowed_ips=",".join(data.allowed_ips),
        )
        return ok(s.key_out(key, api_key=plain))

    @post("/update", status_code=HTTP_200_OK)
    async def update(self, accounts: NamedDependency[AccountService], data: JSONBody[s.UpdateKeyIn]) -> dict[str, Any]:
        changes: dict[str, Any] = data.model_dump(exclude_unset=True, exclude={"id"}, exclude_none=True)
        if "group_id" in changes:
            changes["group_id"] = changes["group_id"] or None
        if "month_quota" in changes:
            changes["month_quota"] = s.units("month_quota", data.month_quota)
        if "allowed_ips" in changes:
            changes["allowed_ips"] = ",".join(changes["allowed_ips"])
        return ok(s.key_out(await accounts.update(data.id, changes)))

    @post("/recharge", status_code=HTTP_200_OK)
    async def recharge(self, accounts: NamedDependency[AccountService], data: JSONBody[s.RechargeIn]) -> dict[str, Any]:
        ref = _ref(data)
        if data.balance is None:
            raise InvalidInput("balance", "balance is required")
        amount = s.units("balance", data.balance)
        if amount <= 0:
            raise InvalidInput("balance", "balance must be greater than 0")
        return ok(s.key_out(await accounts.recharge(ref, amount)))

    @post("/reset-key", status_code=HTTP_200_OK)
    async def reset(self, accounts: NamedDependency[AccountService], data: JSONBody[s.KeyRefIn]) -> dict[str, Any]:
        key, plain = await accounts.reset(_ref(data))
        return ok(s.key_out(key, api_key=plain))

    @post("/delete", status_code=HTTP_200_OK)
    async def remove(self, accounts: NamedDependency[AccountService], data: JSONBody[s.KeyRefIn]) -> dict[str, Any]:
        await accounts.delete(_ref(data))
        return ok(True)

    @get("/list")
    async def listing(
        self,
        accounts: NamedDependency[AccountService],
        *,
        q: Text = None,
        name: Text = None,
        group_id: OptId = None,
        role: Text = None,
        limit: Limit = 20,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        p = await accounts.keys(q=q, name=name, group_id=group_id, role=role, limit=limit, offset=offset)
        return page(p, [s.key_out(k, group_name=g or "") for k, g in p.items])

    @get("/detail/{key_id:int}")
    async def detail(self, accounts: NamedDependency[AccountService], key_id: PathId) -> dict[str, Any]:
        return ok(s.key_out(await accounts.key(key_id)))

    @get("/list-model")
    async def models(
        self,
        accounts: NamedDependency[AccountService],
        *,
        key_id: OptId = None,
        q: Text = None,
        limit: Limit = 20,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        p = await accounts.key_models(key_id=key_id, q=q, limit=limit, offset=offset)
        return page(p, [s.binding_out(b, "key") for b in p.items])

    @post("/bind-or-unbind-model", status_code=HTTP_200_OK)
    async def bind(self, accounts: NamedDependency[AccountService], data: JSONBody[s.KeyBindIn]) -> dict[str, Any]:
        return ok(await accounts.toggle_key_model(data.key_id, data.model_id))


class PaymentController(Controller):
    path = "/admin/payment"
    tags = ["connector: keys"]

    @get("/list")
    async def listing(
        self, accounts: NamedDependency[AccountService], *, key_id: OptId = None, limit: Limit = 20, offset: Offset = 0
    ) -> dict[str, Any]:
        p = await accounts.payments(key_id=key_id or None, limit=limit, offset=offset)
        return page(p, [s.payment_out(x) for x in p.items])


class ModelController(Controller):
    """The orchestrator's own models: one saved here can get replicas through `/api/v1/models/{id}/replicas`."""

    path = "/admin/model"
    tags = ["connector: models"]

    @get("/list")
    async def listing(
        self,
        models: NamedDependency[ModelService],
        *,
        q: Text = None,
        provider: Text = None,
        limit: Limit = 20,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        p = await models.page(q=q, provider=provider, limit=limit, offset=offset)
        return page(p, [s.model_out(m) for m in p.items])

    @get("/detail/{model_id:int}")
    async def detail(self, models: NamedDependency[ModelService], model_id: PathId) -> dict[str, Any]:
        return ok(s.model_out(await models.by_id(model_id)))

    @post("/save", status_code=HTTP_200_OK)
    async def save(self, models: NamedDependency[ModelService], data: JSONBody[s.ModelSaveIn]) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if data.provider is not None:
            fields["provider"] = data.provider
        if data.multiple is not None:
            fields["multiple"] = data.multiple
        if data.config is not None:
            fields["config"] = json.dumps(s.json_object("config", data.config))
        if data.price_in is not None:
            fields["price_in"] = s.per_token("price_in", data.price_in)
        if data.price_out is not None:
            fields["price_out"] = s.per_token("price_out", data.price_out)
        try:
            if data.id is not None:
                if data.name:
                    fields["name"] = data.name
                model = await models.update(data.id, fields)
            else:
                if not data.name:
                    raise InvalidInput("name", "name is required")
                if not data.provider:
                    raise InvalidInput("provider", "provider is required")
                model = await models.create(data.name, **fields)
        except Conflict as e:
            raise Conflict(f"{data.name} already exists") from e
        return ok(s.model_out(model))

    @post("/delete", status_code=HTTP_200_OK)
    async def remove(self, models: NamedDependency[ModelService], data: JSONBody[s.IdIn]) -> dict[str, Any]:
        await models.delete(data.id)
        return ok(True)


class GroupController(Controller):
    path = "/admin/group"
    tags = ["connector: groups"]

    @get("/list")
    async def listing(
        self, accounts: NamedDependency[AccountService], *, q: Text = None, limit: Limit = 20, offset: Offset = 0
    ) -> dict[str, Any]:
        p = await accounts.groups(q=q, limit=limit, offset=offset)
        return page(p, [s.group_out(g) for g in p.items])

    @get("/detail/{group_id:int}")
    async def detail(self, accounts: NamedDependency[AccountService], group_id: PathId) -> dict[str, Any]:
        return ok(s.group_out(await accounts.group(group_id)))

    @post("/save", status_code=HTTP_200_OK)
    async def save(self, accounts: NamedDependency[AccountService], data: JSONBody[s.GroupSaveIn]) -> dict[str, Any]:
        return ok(s.group_out(await accounts.save_group(data.id, data.name, data.key)))

    @post("/delete", status_code=HTTP_200_OK)
    async def remove(self, accounts: NamedDependency[AccountService], data: JSONBody[s.IdIn]) -> dict[str, Any]:
        await accounts.delete_group(data.id)
        return ok(True)

    @get("/list-model")
    async def models(
        self,
        accounts: NamedDependency[AccountService],
        group_id: OptId = None,
        q: Text = None,
        limit: Limit = 20,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        p = await accounts.group_models(group_id=group_id, q=q, limit=limit, offset=offset)
        return page(p, [s.binding_out(b, "group") for b in p.items])

    @post("/bind-or-unbind-model", status_code=HTTP_200_OK)
    async def bind(self, accounts: NamedDependency[AccountService], data: JSONBody[s.GroupBindIn]) -> dict[str, Any]:
        return ok(await accounts.toggle_group_model(data.group_id, data.model_id))


@get("/admin/statistics/total", tags=["connector: keys"])
async def statistics(accounts: NamedDependency[AccountService]) -> dict[str, Any]:
    t = await accounts.totals()
    return ok(
        {
            "count_key": t.count_key,
            "active_key": t.active_key,
            "active_key_this_month": t.active_key_this_month,
            "total_fee": money.usd(t.total_fee),
            "total_month_fee": money.usd(t.total_month_fee),
        }
    )
