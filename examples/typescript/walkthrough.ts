// The README walkthrough over HTTP/JSON with fetch, no generated code: a COUNT
// meter on api.call; a USD monthly product at 0.02 per call with 1,000 calls
// free; customer cus_42, subscribed since 33 days ago; 2,500 calls in its first
// month (plain JSON metadata), 100 of them sent again; the billing cycle; the
// invoice (3000 minor units).
//
// Against `make run`: `npm install && npx tsx walkthrough.ts` (addresses and
// the admin token from ../../.run/env, or the environment).

import { existsSync, readFileSync } from "node:fs";

function settings(): Record<string, string> {
  const values: Record<string, string> = {};
  const envFile = new URL("../../.run/env", import.meta.url);
  if (existsSync(envFile)) {
    for (const line of readFileSync(envFile, "utf8").split("\n")) {
      const at = line.indexOf("=");
      if (at > 0) values[line.slice(0, at)] = line.slice(at + 1);
    }
  }
  for (const [key, value] of Object.entries(process.env)) {
    if (value !== undefined) values[key] = value;
  }
  return values;
}

const env = settings();
const urls: Record<string, string> = {
  billing: env.USAGEBILLING_BILLING_HTTP_URL ?? "http://127.0.0.1:8083",
  meter: env.USAGEBILLING_METER_HTTP_URL ?? "http://127.0.0.1:8082",
  ingest: env.USAGEBILLING_INGEST_HTTP_URL ?? "http://127.0.0.1:8081",
};

// One RPC: POST /<package.Service>/<Method> with the request as JSON (Connect).
async function call<T = any>(
  service: keyof typeof urls,
  rpc: string,
  body: unknown,
  token: string,
): Promise<T> {
  const answer = await fetch(`${urls[service]}/${rpc}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify(body),
  });
  const document = await answer.json();
  if (!answer.ok) {
    throw new Error(`${rpc}: HTTP ${answer.status} ${document.code}: ${document.message}`);
  }
  return document as T;
}

const billing = "usagebilling.billing.v1";

async function main(): Promise<void> {
  // 1. A tenant and its API key (admin token), then every call with that key.
  const admin = env.USAGEBILLING_ADMIN_TOKEN;
  if (!admin) throw new Error("USAGEBILLING_ADMIN_TOKEN is not set (and no .run/env)");
  const suffix = Math.random().toString(16).slice(2, 8);
  const tenant = await call("billing", `${billing}.TenantService/CreateTenant`, { name: `ts-${suffix}` }, admin);
  const key = (await call("billing", `${billing}.TenantService/CreateApiKey`, { tenantId: tenant.id }, admin)).secret;
  console.log(`tenant ${tenant.id}`);

  // 2. A meter: count the api.call events.
  const meter = await call(
    "meter",
    "usagebilling.meter.v1.MeterService/CreateMeter",
    { name: "api-calls", eventName: "api.call", aggregation: "AGGREGATION_COUNT" },
    key,
  );

  // 3. A product: 0.02 USD per call, the first 1,000 calls of each month free.
  const product = await call(
    "billing",
    `${billing}.ProductService/CreateProduct`,
    {
      name: "API",
      currency: "USD",
      billingInterval: "BILLING_INTERVAL_MONTH",
      usagePrices: [
        { meterId: meter.id, model: "PRICE_MODEL_PER_UNIT", unitPrice: "0.02", freeThreshold: "1000" },
      ],
    },
    key,
  );

  // 4. A customer, subscribed since 33 days ago: its first month has ended.
  const customer = await call(
    "billing",
    `${billing}.CustomerService/CreateCustomer`,
    { externalId: "cus_42", name: "Acme" },
    key,
  );
  const start = new Date(Date.now() - 33 * 86_400_000).toISOString();
  const subscription = await call(
    "billing",
    `${billing}.SubscriptionService/CreateSubscription`,
    { customerId: customer.id, productId: product.id, startTime: start },
    key,
  );
  const periodEnd = Date.parse(subscription.currentPeriodStart);

  // 5. 2,500 calls in that month, in batches of 500 (metadata is plain JSON);
  //    then 100 of them sent again (duplicates, not counted twice).
  const events = Array.from({ length: 2500 }, (_, i) => ({
    eventId: `call-${i}`,
    customerId: "cus_42",
    eventName: "api.call",
    timestamp: new Date(periodEnd - 86_400_000 - i * 1000).toISOString(),
    metadata: { endpoint: "/v1/search", tokens: 150 },
  }));
  for (let first = 0; first < 2500; first += 500) {
    const answer = await call(
      "ingest",
      "usagebilling.ingest.v1.IngestService/IngestEvents",
      { events: events.slice(first, first + 500) },
      key,
    );
    console.log(`batch ${first / 500 + 1}: accepted ${answer.acceptedCount ?? 0}`);
  }
  const again = await call(
    "ingest",
    "usagebilling.ingest.v1.IngestService/IngestEvents",
    { events: events.slice(0, 100) },
    key,
  );
  console.log(`resent 100: duplicates ${again.duplicateCount ?? 0}`);

  // 6. Usage is counted within moments of the acknowledgement.
  let value = "";
  for (let attempt = 0; attempt < 200 && value !== "2500"; attempt++) {
    const usage = await call(
      "meter",
      "usagebilling.meter.v1.MeterService/QueryUsage",
      {
        meterId: meter.id,
        customerId: "cus_42",
        startTime: subscription.startTime,
        endTime: subscription.currentPeriodStart,
      },
      key,
    );
    value = usage.rows?.[0]?.value ?? "";
    if (value !== "2500") await new Promise((resolve) => setTimeout(resolve, 100));
  }
  console.log(`usage of api-calls last month: ${value}`);

  // 7. The billing cycle builds and finalizes last month's invoice.
  const run = await call("billing", `${billing}.InvoiceService/RunBillingCycle`, {}, key);
  const invoice = await call("billing", `${billing}.InvoiceService/GetInvoice`, { id: run.invoiceIds[0] }, key);
  console.log(`invoice ${invoice.number} (${invoice.status}) for ${invoice.currency}:`);
  for (const line of invoice.lines) {
    console.log(`  ${line.description.padEnd(60)} ${String(line.amountMinor ?? "0").padStart(8)} minor units`);
  }
  // int64 fields are JSON strings (protobuf's canonical JSON).
  console.log(`  ${"total".padEnd(60)} ${invoice.totalMinor.padStart(8)} minor units`);
  console.log(JSON.stringify({ total_minor: invoice.totalMinor }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
