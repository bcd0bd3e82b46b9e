// Drives the dashboard in Debian's Chromium through playwright-core (tests/dashboard.rs).
//
// Usage: node dashboard.cjs URL SCREENSHOT [PASSWORD]
// (PASSWORD: answers the browser's login prompt with it, as a person with the admin token would.)
// Loads URL once (no reload after that) and, for each line read on stdin, prints one JSON line:
//   "look"          → what the page shows and what /stats says, read in the same tick, once the
//                     page has updated since the line came in;
//   "changed KEY V" → the same, once the element KEY no longer shows V (within 20 s);
//   "shoot"         → saves SCREENSHOT, then prints the console errors, page errors and
//                     requests to other origins seen since the page loaded, and exits.
"use strict";
const { chromium } = require("playwright-core");
const readline = require("readline");

const [url, screenshot, password] = process.argv.slice(2);
const origin = new URL(url).origin;
const ids = [
  "ingest-rate", "accepted-total", "ack-p50", "ack-p99", "dedup-drops", "events-indexed",
  "dead-letters-total", "spill-records", "spill-bytes", "status", "failure-error", "updated",
];

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.SLUICE_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const problems = { console: [], page: [], external: [] };
  const context = await browser.newContext({
    viewport: { width: 1280, height: 1000 },
    ...(password ? { httpCredentials: { username: "admin", password } } : {}),
  });
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") problems.console.push(m.text()); });
  page.on("pageerror", (e) => problems.page.push(String(e)));
  page.on("request", (r) => { if (!r.url().startsWith(origin) && !r.url().startsWith("data:")) problems.external.push(r.url()); });
  const loaded = await page.goto(url);
  if (!loaded || loaded.status() !== 200) throw new Error(`GET ${url} answered ${loaded && loaded.status()}`);

  const read = () => page.evaluate(async (ids) => {
    const shown = {};
    for (const id of ids) shown[id] = document.getElementById(id).textContent;
    shown.failure_visible = getComputedStyle(document.getElementById("failure")).display !== "none";
    shown.lag = [...document.querySelectorAll("[data-lag]")].map((e) => [Number(e.dataset.lag), e.textContent]);
    shown.backends = [...document.querySelectorAll("[data-backend]")].map((e) => e.textContent);
    shown.actions = [...document.querySelectorAll("#actions tr")].map((tr) => [...tr.children].map((td) => td.textContent));
    shown.dead_letters = [...document.querySelectorAll("#dead-letters-latest tr")].map((tr) => [...tr.children].map((td) => td.textContent));
    shown.chart_paths = [...document.querySelectorAll("#rate-chart path")].map((p) => p.getAttribute("d").length);
    const stats = await (await fetch("stats", { cache: "no-store" })).json();
    return { shown, stats };
  }, ids);
  // Waits until the page has rendered a /stats read newer than this moment.
  const fresh = async () => {
    const since = Date.now();
    await page.waitForFunction((since) => {
      const t = document.getElementById("updated").dataset.at;
      return t && Number(t) > since;
    }, since, { timeout: 10000 });
  };

  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [what, key, ...rest] = line.trim().split(" ");
    if (what === "look") {
      await fresh();
      console.log(JSON.stringify(await read()));
    } else if (what === "changed") {
      const was = rest.join(" ");
      await page.waitForFunction(([key, was]) => document.getElementById(key).textContent !== was, [key, was], { timeout: 20000 });
      await fresh();
      console.log(JSON.stringify(await read()));
    } else if (what === "shoot") {
      await page.screenshot({ path: screenshot, fullPage: true });
      console.log(JSON.stringify(problems));
      break;
    }
  }
  await browser.close();
  // stdin is still open (the test holds it): leave without waiting for its end.
  process.exit(0);
})().catch((e) => {
  console.log(JSON.stringify({ error: String(e && e.stack || e) }));
  process.exit(1);
});
