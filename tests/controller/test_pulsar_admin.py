"""The Pulsar admin client against kmock answering as Pulsar's documented /admin/v2 API."""

from __future__ import annotations

import pytest
from kubemock.fixtures import PulsarAdminHandle

from recsys_operator.pulsar_admin import (
    PartitionsDecreased,
    PulsarAdmin,
    PulsarAdminError,
    RetryPolicy,
)
from recsys_operator.render.topics import TopicPlan, TopicPolicy

FAST = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.05, timeout=5)
PLAN = TopicPlan(
    "acme",
    "feed",
    (TopicPolicy("interactions", 4, 60, 100, 50), TopicPolicy("dead-letter", 1, -1, -1, 10)),
)


async def test_ensure_plan_creates_everything_then_is_quiet(
    pulsar_admin: PulsarAdminHandle,
) -> None:
    async with PulsarAdmin(pulsar_admin.url, retry=FAST) as admin:
        changes = await admin.ensure_plan(PLAN)
        assert "tenant acme created" in changes and "namespace acme/feed created" in changes
        topic = pulsar_admin.emulator.topics["persistent://acme/feed/interactions"]
        assert topic.partitions == 4
        assert topic.retention == {"retentionTimeInMinutes": 60, "retentionSizeInMB": 100}
        assert topic.backlog_quotas["destination_storage"]["limitSize"] == 50 * 2**20

        mark = pulsar_admin.emulator.mark()
        assert await admin.ensure_plan(PLAN) == []
        writes = [r for r in pulsar_admin.emulator.requests_since(mark) if r.method.value != "GET"]
        assert writes == []


async def test_partitions_grow_but_never_shrink(pulsar_admin: PulsarAdminHandle) -> None:
    async with PulsarAdmin(pulsar_admin.url, retry=FAST) as admin:
        await admin.ensure_plan(PLAN)
        bigger = TopicPlan("acme", "feed", (TopicPolicy("interactions", 8, 60, 100, 50),))
        assert await admin.ensure_plan(bigger) == ["interactions: partitions 4 -> 8"]
        smaller = TopicPlan("acme", "feed", (TopicPolicy("interactions", 2, 60, 100, 50),))
        with pytest.raises(PartitionsDecreased, match="cannot reduce"):
            await admin.ensure_plan(smaller)


async def test_server_errors_are_retried_then_succeed(pulsar_admin: PulsarAdminHandle) -> None:
    pulsar_admin.emulator.fail_next(2, method="GET", path="/admin/v2/tenants/acme", status=503)
    async with PulsarAdmin(pulsar_admin.url, retry=FAST) as admin:
        await admin.ensure_plan(PLAN)
    assert (
        len(pulsar_admin.emulator.requests_since(0, path="/admin/v2/tenants/acme", method="GET"))
        == 3
    )


async def test_persistent_server_errors_give_up_with_the_reason(
    pulsar_admin: PulsarAdminHandle,
) -> None:
    pulsar_admin.emulator.fail_next(10, path="/admin/v2/tenants/acme", status=500)
    async with PulsarAdmin(pulsar_admin.url, retry=FAST) as admin:
        with pytest.raises(PulsarAdminError, match=r"HTTP 500.*after 3 attempts"):
            await admin.ensure_plan(PLAN)


@pytest.mark.parametrize(
    ("token", "status", "hint"),
    [(None, 401, "authentication failed"), ("reader", 403, "lacks admin permission")],
)
async def test_auth_failures_are_final_and_explained(
    pulsar_admin: PulsarAdminHandle, token: str | None, status: int, hint: str
) -> None:
    pulsar_admin.emulator.token, pulsar_admin.emulator.forbidden_token = "admin", "reader"
    async with PulsarAdmin(pulsar_admin.url, token=token, retry=FAST) as admin:
        with pytest.raises(PulsarAdminError) as info:
            await admin.ensure_plan(PLAN)
    assert info.value.status == status and hint in str(info.value)
    assert len(pulsar_admin.emulator.requests_since(0)) == 1  # not retried


async def test_bearer_token_is_sent(pulsar_admin: PulsarAdminHandle) -> None:
    pulsar_admin.emulator.token = "admin"
    async with PulsarAdmin(pulsar_admin.url, token="admin", retry=FAST) as admin:
        await admin.ensure_plan(PLAN)
    assert len(pulsar_admin.emulator.topics) == 2


async def test_unreachable_admin_is_an_error_after_retries() -> None:
    async with PulsarAdmin("http://127.0.0.1:9", retry=FAST) as admin:
        with pytest.raises(PulsarAdminError, match="no answer"):
            await admin.ensure_plan(PLAN)


async def test_delete_plan_is_idempotent(pulsar_admin: PulsarAdminHandle) -> None:
    async with PulsarAdmin(pulsar_admin.url, retry=FAST) as admin:
        await admin.ensure_plan(PLAN)
        assert await admin.delete_plan(PLAN) == ["interactions", "dead-letter"]
        assert await admin.delete_plan(PLAN) == []
    assert pulsar_admin.emulator.topics == {}


async def test_an_unusable_url_is_a_pulsar_admin_error_not_a_client_crash() -> None:
    """A URL the HTTP client cannot build a request from fails at once, as every other
    Pulsar failure does (the reconcile turns it into a condition; the finalizer gives up)."""
    async with PulsarAdmin("http://pulsar:99999", retry=FAST) as admin:
        with pytest.raises(PulsarAdminError, match="invalid URL") as info:
            await admin.ensure_plan(PLAN)
    assert info.value.status is None
