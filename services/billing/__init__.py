"""billing: tenants, customers, products, subscriptions and invoices."""
