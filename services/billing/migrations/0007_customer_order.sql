-- The billing cycle pages through a tenant's subscriptions in the bytewise
-- order of the customer's external id (COLLATE "C", whatever the database's
-- locale), the order in which meter pages usage by customer: this index lets
-- each page start where the last one stopped instead of sorting the tenant.
CREATE INDEX customers_by_external_id_bytes
    ON billing.customers (tenant_id, external_id COLLATE "C");
