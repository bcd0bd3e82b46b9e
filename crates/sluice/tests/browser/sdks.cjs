// analytics.js in a real browser, unchanged and pointed at sluice (tests/sdks.rs): Debian's
// Chromium driven by playwright-core, on pages served by this script from another origin than
// sluice's, so every call is a cross-origin request with a write-scoped key.
//
// Usage: node sdks.cjs SLUICE_URL KEY PREFIX
// Runs four pages, one after the other:
//   segment        @segment/analytics-next, one request per call (/v1/i, /v1/t, /v1/p, ...)
//   segment-batch  the same with its batching delivery strategy (/v1/b)
//   rudder         @rudderstack/analytics-js, one request per call (/v1/identify, ...)
//   rudder-batch   the same with its batch queue option (/v1/batch)
// Each page sends identify (with an email trait), track, page, group and alias for its own user,
// and waits until sluice has answered 200 for all five. Prints one JSON line: per page, the user,
// the answers sluice gave, console and page errors; `error` if something failed.
"use strict";
const fs = require("fs");
const http = require("http");
const path = require("path");
const { chromium } = require("playwright-core");

const [sluiceUrl, key, prefix] = process.argv.slice(2);
const sluice = new URL(sluiceUrl).origin;
const modules = (process.env.NODE_PATH || "").split(path.delimiter).filter(Boolean);

function bundle(relative) {
  for (const dir of modules) {
    const file = path.join(dir, relative);
    if (fs.existsSync(file)) return file;
  }
  throw new Error(`${relative} not found under NODE_PATH (run ./scripts/test, it installs the SDKs)`);
}

const files = {
  "/analytics-next.js": bundle("@segment/analytics-next/dist/umd/index.js"),
  "/rudder-analytics.js": bundle("@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js"),
};

// What each page runs once its SDK is loaded: the five calls for `user`.
const pages = {
  segment: { sdk: "/analytics-next.js", run: segment, batch: false },
  "segment-batch": { sdk: "/analytics-next.js", run: segment, batch: true },
  rudder: { sdk: "/rudder-analytics.js", run: rudder, batch: false },
  "rudder-batch": { sdk: "/rudder-analytics.js", run: rudder, batch: true },
};

async function segment({ key, sluice, user, batch }) {
  const settings = { apiKey: key, apiHost: `${new URL(sluice).host}/v1`, protocol: "http" };
  if (batch) settings.deliveryStrategy = { strategy: "batching", config: { size: 5, timeout: 300 } };
  const [analytics] = await window.AnalyticsNext.AnalyticsBrowser.load(
    { writeKey: key, cdnSettings: { integrations: { "Segment.io": settings } } },
    { disableClientPersistence: true },
  );
  // Each promise settles once the call went through the plugins (and, one call per request,
  // once sluice answered); in order, as a page's calls are.
  await analytics.identify(user, { email: `${user}@Example.com`, plan: "pro" });
  await analytics.track("Order Completed", { total: 12.5 }, { context: { campaign: { name: "spring" } } });
  await analytics.page("Docs", "Home", { path: "/docs" });
  await analytics.group("g-1", { name: "Acme" });
  await analytics.alias(user, `${user}-old`);
}

async function rudder({ key, sluice, user, batch }) {
  // The npm bundle exports the class (the CDN snippet would make the instance).
  const ra = new window.rudderanalytics.RudderAnalytics();
  const options = {
    logLevel: "ERROR",
    getSourceConfig: () => ({
      source: { id: "sdk-test", name: "sdk test", workspaceId: "w", enabled: true, config: {}, destinations: [] },
    }),
    plugins: ["XhrQueue"],
  };
  if (batch) options.queueOptions = { batch: { enabled: true, maxItems: 5, flushInterval: 300 } };
  await new Promise((resolve) => {
    ra.load(key, sluice, options);
    ra.ready(resolve);
  });
  ra.identify(user, { email: `${user}@Example.com`, plan: "pro" });
  ra.track("Order Completed", { total: 12.5 });
  ra.page("Docs", "Home", { path: "/docs" });
  ra.group("g-1", { name: "Acme" });
  ra.alias(user, `${user}-old`);
}

function serve() {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://page");
    if (files[url.pathname]) {
      res.writeHead(200, { "content-type": "text/javascript" });
      fs.createReadStream(files[url.pathname]).pipe(res);
    } else if (url.pathname === "/page.html") {
      const sdk = url.searchParams.get("sdk");
      res.writeHead(200, { "content-type": "text/html" });
      res.end(`<!doctype html><title>sdk</title><script src="${sdk}"></script>`);
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

(async () => {
  const server = await serve();
  const origin = `http://127.0.0.1:${server.address().port}`;
  if (origin === sluice) throw new Error("the page must be on another origin than sluice");
  const browser = await chromium.launch({
    executablePath: process.env.SLUICE_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const report = {};
  try {
    for (const [name, spec] of Object.entries(pages)) {
      const context = await browser.newContext();
      const page = await context.newPage();
      const seen = { user: `${prefix}-${name}`, answers: [], console: [], page: [] };
      let delivered = 0;
      page.on("console", (m) => { if (m.type() === "error") seen.console.push(m.text()); });
      page.on("pageerror", (e) => seen.page.push(String(e)));
      page.on("requestfailed", (r) => seen.answers.push({ url: r.url(), failed: r.failure() && r.failure().errorText }));
      page.on("response", async (r) => {
        const request = r.request();
        if (!r.url().startsWith(sluice) || request.method() !== "POST") return;
        let calls = 1;
        try {
          const body = JSON.parse(request.postData() || "{}");
          if (Array.isArray(body.batch)) calls = body.batch.length;
        } catch (e) { /* counted as one */ }
        seen.answers.push({ path: new URL(r.url()).pathname, status: r.status(), calls });
        if (r.status() === 200) delivered += calls;
      });
      const loaded = await page.goto(`${origin}/page.html?sdk=${encodeURIComponent(spec.sdk)}`);
      if (!loaded || loaded.status() !== 200) throw new Error(`${name}: the page answered ${loaded && loaded.status()}`);
      await page.evaluate(spec.run, { key, sluice, user: seen.user, batch: spec.batch });
      const deadline = Date.now() + 30000;
      while (delivered < 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      seen.delivered = delivered;
      report[name] = seen;
      await context.close();
    }
  } catch (e) {
    report.error = String(e && e.stack || e);
  }
  console.log(JSON.stringify(report));
  await browser.close();
  server.close();
  process.exit(0);
})().catch((e) => {
  console.log(JSON.stringify({ error: String(e && e.stack || e) }));
  process.exit(1);
});
