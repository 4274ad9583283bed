"""Tenants, API keys and customers."""

from __future__ import annotations

from services.billing.domain.fields import check_text
from services.billing.store import BillingStore, CustomerRecord
from services.common.auth import Principal, hash_secret, new_secret
from services.common.errors import InvalidArgument, NotFound


class Accounts:
    def __init__(self, store: BillingStore) -> None:
        self._store = store

    async def create_tenant(self, name: str) -> str:
        check_text("name", name, required=True)
        return await self._store.create_tenant(name)

    async def create_api_key(self, tenant_id: str, description: str) -> tuple[str, str]:
        """Returns (key id, secret); only the secret's hash is stored."""
        check_text("description", description, required=False)
        if not tenant_id:
            raise InvalidArgument("tenant_id: required")
        if not await self._store.tenant_exists(tenant_id):
            raise NotFound(f"tenant_id: no tenant {tenant_id!r}")
        secret = new_secret()
        key_id = await self._store.create_api_key(tenant_id, hash_secret(secret), description)
        return key_id, secret

    async def resolve(self, secret: str) -> Principal | None:
        key = await self._store.key_by_hash(hash_secret(secret))
        return Principal(tenant_id=key.tenant_id, api_key_id=key.id) if key else None

    async def tenant_exists(self, tenant_id: str) -> bool:
        """Billing's own answer (its table): a service token may act only for
        a tenant found here. Not cached: tenants are created here, and ingest
        and meter cache what they ask (services/common/auth_client.py)."""
        return await self._store.tenant_exists(tenant_id)

    async def create_customer(
        self, tenant_id: str, external_id: str, name: str, email: str
    ) -> CustomerRecord:
        check_text("external_id", external_id, required=True)
        check_text("name", name, required=False)
        check_text("email", email, required=False)
        if email and "@" not in email:
            raise InvalidArgument(f"email: {email!r} is not an e-mail address")
        return await self._store.create_customer(tenant_id, external_id, name, email)
