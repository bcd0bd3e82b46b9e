// Sends every Segment call through @segment/analytics-node, unchanged and pointed at sluice
// (tests/sdks.rs), and prints what the SDK reported as one JSON line.
//
// Usage: node sdk_node.cjs URL KEY PREFIX
// The calls are batched to /v1/batch as the SDK does by default, then `closeAndFlush()`. An
// unknown key is then sent once: the SDK must report the delivery failure.
"use strict";
const { Analytics } = require("@segment/analytics-node");

const [url, key, prefix] = process.argv.slice(2);

(async () => {
  const errors = [];
  const analytics = new Analytics({ writeKey: key, host: url, flushInterval: 200, maxRetries: 2 });
  analytics.on("error", (e) => errors.push(String((e && e.reason) || e)));
  const user = `${prefix}-segment-node`;
  analytics.identify({ userId: user, traits: { email: `${user}@Example.com`, plan: "pro" } });
  analytics.track({
    userId: user,
    event: "Order Completed",
    properties: { total: 12.5 },
    context: { locale: "de-DE" },
    integrations: { All: true },
  });
  analytics.page({ userId: user, category: "Docs", name: "Home", properties: { path: "/docs" } });
  analytics.screen({ userId: user, name: "Main" });
  analytics.group({ userId: user, groupId: "g-1", traits: { name: "Acme" } });
  analytics.alias({ userId: user, previousId: `${user}-old` });
  await analytics.closeAndFlush({ timeout: 20000 });

  const refused = [];
  const bad = new Analytics({ writeKey: "no-such-key", host: url, maxRetries: 0, flushAt: 1 });
  bad.on("error", (e) => refused.push({ code: e && e.code, reason: String((e && e.reason) || e) }));
  bad.track({ userId: user, event: "Refused" });
  await bad.closeAndFlush({ timeout: 20000 });
  console.log(JSON.stringify({ user, errors, refused }));
})().catch((e) => {
  console.log(JSON.stringify({ error: String((e && e.stack) || e) }));
  process.exit(1);
});
