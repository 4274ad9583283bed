-- Reconciliation's ledger side (services/billing/credits.py _first_difference,
-- credits_store.py quantities_per_day): the quantity the ledger's draws hold
-- per account, meter and UTC day, so that comparing up to 35 days with meter's
-- reads a row per day instead of every minute's entries.
--
-- quantity: the sum of `quantity` over every revision of the DRAWN and OVERAGE
--           entries of the account and meter that take effect in
--           [day, day + 1 day) (date_bin to 2000-01-01 UTC, as the read did).
--
-- Kept by a trigger on the ledger, in the transaction of each entry's INSERT,
-- so that it holds for every writer, a replica of the version before this one
-- included (the ledger is append-only: no entry is updated in these columns or
-- deleted).
CREATE TABLE billing.credit_drawn_days (
    tenant_id      text        NOT NULL,
    customer_id    uuid        NOT NULL,
    credit_type_id uuid        NOT NULL,
    meter_id       text        NOT NULL,
    day            timestamptz NOT NULL,
    quantity       numeric     NOT NULL,
    PRIMARY KEY (tenant_id, customer_id, credit_type_id, meter_id, day)
);

CREATE FUNCTION billing.credit_drawn_days_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO billing.credit_drawn_days AS d
    VALUES (NEW.tenant_id, NEW.customer_id, NEW.credit_type_id, NEW.meter_id,
        date_bin('1 day', NEW.effective_at, '2000-01-01 00:00:00+00'), NEW.quantity)
    ON CONFLICT (tenant_id, customer_id, credit_type_id, meter_id, day)
    DO UPDATE SET quantity = d.quantity + EXCLUDED.quantity;
    RETURN NULL;
END
$$;

-- No entry may be written while the days already in the ledger are summed
-- (a replica still running the previous version waits for this migration).
LOCK TABLE billing.credit_ledger IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER credit_drawn_days AFTER INSERT ON billing.credit_ledger
    FOR EACH ROW WHEN (NEW.kind IN ('DRAWN', 'OVERAGE'))
    EXECUTE FUNCTION billing.credit_drawn_days_add();

INSERT INTO billing.credit_drawn_days
SELECT tenant_id, customer_id, credit_type_id, meter_id,
    date_bin('1 day', effective_at, '2000-01-01 00:00:00+00'), sum(quantity)
FROM billing.credit_ledger WHERE kind IN ('DRAWN', 'OVERAGE')
GROUP BY 1, 2, 3, 4, 5;
