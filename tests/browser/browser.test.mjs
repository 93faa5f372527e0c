// Real-browser tests of topichub: Debian's Chromium driven by playwright-core, against a real
// broker process, with real HTTP/2 gRPC, gRPC-Web, HTTP/JSON and SSE clients on the other side.
//
// Usage (normally through `cargo test --test browser`, which sets everything up):
//   TOPICHUB_BIN=target/debug/topichub node tests/browser/browser.test.mjs
// Environment:
//   TOPICHUB_BIN   broker binary; the test starts it on a free port and restarts it (step e).
//   TOPICHUB_URL   instead of TOPICHUB_BIN: an already running broker (the restart step is skipped).
//   ARTIFACTS_DIR  screenshots (one per step), console.log and broker.log
//                  (default: target/test-artifacts/browser).
//   CHROMIUM       browser executable (default: /usr/bin/chromium).
//   HEADED=1       show the browser window (needs a display).
// Prerequisites: scripts/deps-node.sh (Debian chromium + `npm ci` in web/).
//
// Steps:
//   a. `/` subscribes with EventSource and shows a message published with fetch (POST /publish);
//   b. the publish form of `/` publishes, and a gRPC (HTTP/2) subscriber in node receives it;
//   c. `/grpc-web.html` publishes over gRPC-Web and its server-streaming subscribe receives it;
//   d. Swagger UI loads the spec, "Try it out" on POST /publish succeeds, an SSE client gets it;
//   e. the broker restarts on the same port: the pages reconnect by themselves and receive again;
//   f. with authentication on, both pages (`/` and `/grpc-web.html`) use the token typed into
//      their field: refused without it, served with it.
//   g. the WebSocket mode of `/` holds several subscriptions on one socket and publishes with acks.
//   h. a deleted topic ends the page's subscription with the server's notice; in cluster mode
//      (a real `nats-server -js`, killed and restarted) both pages say when the node loses NATS
//      and when it is back, and delivery continues.
//
// Every wait is bounded (WAIT_MS), and the whole run is bounded (TOTAL_MS). Exit status 0 = pass.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import net from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

// Playwright and Connect resolve from web/node_modules, through this re-export.
import {
  chromium,
  createClient,
  createGrpcTransport,
  PubSub,
} from "../../web/src/test-deps.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const ARTIFACTS = resolve(process.env.ARTIFACTS_DIR || join(ROOT, "target/test-artifacts/browser"));
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
/** Upper bound for any single thing the test waits for. */
const WAIT_MS = 15_000;
/** Upper bound for the whole run (the Rust wrapper kills us at 180 s). */
const TOTAL_MS = 150_000;

const log = (...args) => console.log(`[browser-test ${new Date().toISOString().slice(11, 23)}]`, ...args);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// -----------------------------------------------------------------------------------------------
// Small utilities

/** Rejects with "timed out: what" unless `promise` settles within `ms`. */
function within(what, promise, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A port that was free a moment ago (the broker binds it right after). */
function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

/** POST /publish with a text payload; returns the `Published` answer. */
async function httpPublish(baseUrl, topic, payload) {
  const response = await within(`POST /publish ${topic}`, fetch(`${baseUrl}/publish`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ topic, payload }),
  }));
  const body = await response.json();
  assert.equal(response.status, 200, `POST /publish: ${JSON.stringify(body)}`);
  return body;
}

/**
 * A minimal SSE client over fetch (as a non-browser client would be): `next()` returns the next
 * event {event, id, data}; keep-alive comments are skipped.
 */
async function openSse(url) {
  const abort = new AbortController();
  const response = await within(`GET ${url}`, fetch(url, {
    headers: { accept: "text/event-stream" },
    signal: abort.signal,
  }));
  assert.equal(response.status, 200, `SSE status for ${url}`);
  assert.match(response.headers.get("content-type") ?? "", /^text\/event-stream/);
  const reader = response.body.getReader();
  let buffer = "";
  return {
    async next() {
      return within(`next SSE event of ${url}`, (async () => {
        for (;;) {
          const end = buffer.indexOf("\n\n");
          if (end >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const event = { event: "message", id: undefined, data: "" };
            for (const line of block.split("\n")) {
              if (line.startsWith(":")) continue; // keep-alive comment
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
              if (field === "event") event.event = value;
              else if (field === "id") event.id = value;
              else if (field === "data") event.data += value;
            }
            if (event.data) return event;
            continue;
          }
          const { done, value } = await reader.read();
          if (done) throw new Error(`SSE stream ${url} ended`);
          buffer += decoder.decode(value, { stream: true });
        }
      })());
    },
    close: () => abort.abort(),
  };
}

// -----------------------------------------------------------------------------------------------
// The broker as a child process, so that it can be restarted on the same port.

class Broker {
  constructor(bin, port, logFile, extraArgs = []) {
    this.bin = bin;
    this.extraArgs = extraArgs;
    this.port = port;
    this.url = `http://127.0.0.1:${port}`;
    this.log = createWriteStream(logFile, { flags: "a" });
    this.child = null;
    this.starts = 0;
  }

  /** Starts the binary and waits until /healthz answers. Retries a few times if the port is
   *  still held by the previous process (bounded). */
  async start() {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#startOnce();
      } catch (error) {
        if (attempt >= 5) throw error;
        log(`broker start attempt ${attempt} failed (${error.message}); retrying`);
        await new Promise((r) => setTimeout(r, 200 * attempt));
      }
    }
  }

  async #startOnce() {
    this.starts += 1;
    this.log.write(`\n===== start #${this.starts} on ${this.url} =====\n`);
    const child = spawn(this.bin, ["serve", "--listen", `127.0.0.1:${this.port}`, "--shutdown-grace", "2s", ...this.extraArgs], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info" },
    });
    this.child = child;
    child.stdout.pipe(this.log, { end: false });
    child.stderr.pipe(this.log, { end: false });
    const exited = new Promise((r) => child.once("exit", (code, signal) => r({ code, signal })));
    child.exited = exited;
    const died = exited.then(({ code, signal }) => {
      throw new Error(`broker exited during startup (code ${code}, signal ${signal}); see broker.log`);
    });
    const healthy = (async () => {
      for (;;) {
        try {
          const response = await fetch(`${this.url}/healthz`, { signal: AbortSignal.timeout(1000) });
          if (response.ok) return;
        } catch { /* not listening yet */ }
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    try {
      await within("broker /healthz", Promise.race([healthy, died]));
    } catch (error) {
      this.kill();
      throw error;
    }
    log(`broker up at ${this.url} (pid ${child.pid})`);
  }

  /** SIGTERM (graceful shutdown), then SIGKILL if it has not exited within the bound. */
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGTERM");
    try {
      const { code, signal } = await within("broker graceful exit", child.exited);
      log(`broker stopped (code ${code}, signal ${signal})`);
    } catch (error) {
      child.kill("SIGKILL");
      await child.exited;
      throw error;
    }
  }

  /** Synchronous last-resort kill (used on exit). */
  kill() {
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill("SIGKILL");
    }
  }
}

// -----------------------------------------------------------------------------------------------
// Steps, screenshots and cleanup

let browser = null;
let broker = null;
let authBroker = null; // step f
let clusterBroker = null; // step h
let nats = null; // step h: the nats-server child
const pages = new Set();
const pageErrors = [];
let shotIndex = 0;

/** Saves a full-page screenshot of `page` as NN-name.png in the artifacts dir. */
async function shot(page, name) {
  shotIndex += 1;
  const file = join(ARTIFACTS, `${String(shotIndex).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true, timeout: WAIT_MS });
  return file;
}

const results = [];

/** Runs one step; on failure saves a screenshot of every open page and rethrows. */
async function step(name, body) {
  const started = Date.now();
  log(`step ${name} ...`);
  try {
    await body();
  } catch (error) {
    for (const page of pages) {
      await shot(page, `FAILED-${name[0]}`).catch(() => {});
    }
    results.push({ name, ok: false, ms: Date.now() - started });
    error.message = `step ${name}: ${error.message}`;
    throw error;
  }
  const ms = Date.now() - started;
  results.push({ name, ok: true, ms });
  log(`step ${name} ok (${ms} ms)`);
}

async function newPage(context, consoleLog) {
  const page = await context.newPage();
  pages.add(page);
  page.setDefaultTimeout(WAIT_MS);
  page.on("console", (m) => consoleLog.write(`[${m.type()}] ${page.url()}: ${m.text()}\n`));
  page.on("pageerror", (e) => {
    pageErrors.push(`${page.url()}: ${e.message}`);
    consoleLog.write(`[pageerror] ${page.url()}: ${e.stack ?? e.message}\n`);
  });
  return page;
}

/** Waits until the text of `selector` is exactly `text`. */
async function waitForText(page, selector, text) {
  await page.locator(selector).filter({ hasText: new RegExp(`^(?:${text})$`) }).waitFor();
}

/** Waits for a message row of `list` (#messages / #gw-messages) with this topic and payload. */
async function waitForRow(page, list, topic, payload) {
  const row = page.locator(`${list} .msg[data-topic="${topic}"]`)
    .filter({ has: page.locator(".payload", { hasText: payload }) });
  await row.first().waitFor();
  return row.first();
}

// -----------------------------------------------------------------------------------------------

async function main() {
  rmSync(ARTIFACTS, { recursive: true, force: true });
  mkdirSync(ARTIFACTS, { recursive: true });
  const consoleLog = createWriteStream(join(ARTIFACTS, "console.log"));

  let baseUrl = process.env.TOPICHUB_URL?.replace(/\/$/, "");
  if (process.env.TOPICHUB_BIN) {
    broker = new Broker(process.env.TOPICHUB_BIN, await freePort(), join(ARTIFACTS, "broker.log"));
    await broker.start();
    baseUrl = broker.url;
  }
  assert.ok(baseUrl, "set TOPICHUB_BIN (a broker binary to run) or TOPICHUB_URL (a running broker)");
  // Unique payloads per run, so a reused external broker cannot satisfy a check by accident.
  const run = Date.now().toString(36);

  browser = await within("launch chromium", chromium.launch({
    executablePath: CHROMIUM,
    headless: !process.env.HEADED,
    args: process.env.HEADED ? CHROMIUM_ARGS.filter((a) => a !== "--headless") : CHROMIUM_ARGS,
  }), 30_000);
  log(`chromium ${browser.version()}`);
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });

  // The live page, subscribed to browser.test; it stays open for steps b and e.
  const live = await newPage(context, consoleLog);

  await step("a: EventSource page shows a message published by fetch", async () => {
    await live.goto(`${baseUrl}/?topic=browser.test`);
    await waitForText(live, "#status", "live");
    const payload = `hello from node ${run}`;
    const published = await httpPublish(baseUrl, "browser.test", payload);
    const row = await waitForRow(live, "#messages", "browser.test", payload);
    assert.equal(await row.getAttribute("data-seq"), String(published.seq));
    await shot(live, "a-sse-message");
  });

  await step("b: publish form reaches a gRPC (HTTP/2) subscriber", async () => {
    // A real gRPC client: HTTP/2 with prior knowledge (h2c), server-streaming Subscribe.
    const grpc = createClient(PubSub, createGrpcTransport({ baseUrl }));
    const abort = new AbortController();
    const events = grpc.subscribe(
      { topics: ["browser.*"], start: { position: { case: "latest", value: true } } },
      { signal: abort.signal },
    )[Symbol.asyncIterator]();
    try {
      const first = await within("gRPC subscribed event", events.next());
      assert.equal(first.value?.event.case, "subscribed", "first gRPC event");

      const payload = `from the form ${run}`;
      await live.fill("#pub-topic", "browser.test");
      await live.fill("#pub-payload", payload);
      await live.click("#pub-button");
      const result = live.locator("#pub-result");
      await result.filter({ hasText: /published seq \d+/ }).waitFor();
      const seq = (await result.textContent()).match(/seq (\d+)/)[1];

      // The gRPC subscriber gets it, with the same seq ...
      for (;;) {
        const { value, done } = await within("gRPC message from the form", events.next());
        assert.ok(!done, "gRPC stream ended early");
        if (value.event.case !== "message") continue;
        const message = value.event.value;
        assert.equal(message.topic, "browser.test");
        assert.equal(decoder.decode(message.payload), payload);
        assert.equal(String(message.cursor.seq), seq);
        break;
      }
      // ... and so does the page's own EventSource.
      await waitForRow(live, "#messages", "browser.test", payload);
      await shot(live, "b-form-published");
    } finally {
      abort.abort();
      await events.return?.().catch(() => {});
    }
  });

  // The gRPC-Web page, subscribed to gw.test; stays open for step e.
  const gw = await newPage(context, consoleLog);

  await step("c: gRPC-Web page publishes and its server stream receives", async () => {
    const grpcWebCalls = [];
    gw.on("request", (request) => {
      if (request.url().includes("/topichub.v1.PubSub/")) {
        grpcWebCalls.push(`${request.url().split("/").slice(-1)[0]} ${request.headers()["content-type"]}`);
      }
    });
    await gw.goto(`${baseUrl}/grpc-web.html?topic=gw.test`);
    await waitForText(gw, "#gw-status", "live");
    await shot(gw, "c-grpc-web-live");

    const payload = `hello over gRPC-Web ${run}`;
    await gw.fill("#gw-pub-topic", "gw.test");
    await gw.fill("#gw-pub-payload", payload);
    await gw.click("#gw-pub-button");
    const result = gw.locator("#gw-pub-result");
    await result.filter({ hasText: /seq \d+/ }).waitFor();
    const seq = (await result.textContent()).match(/seq (\d+)/)[1];
    const row = await waitForRow(gw, "#gw-messages", "gw.test", payload);
    assert.equal(await row.getAttribute("data-seq"), seq);

    // A message from another door (HTTP) shows up too.
    const other = `from HTTP to the gRPC-Web page ${run}`;
    await httpPublish(baseUrl, "gw.test", other);
    await waitForRow(gw, "#gw-messages", "gw.test", other);

    // It really was gRPC-Web: both calls went out as application/grpc-web(+proto).
    assert.ok(grpcWebCalls.some((c) => /^Subscribe application\/grpc-web/.test(c)), grpcWebCalls.join("; "));
    assert.ok(grpcWebCalls.some((c) => /^Publish application\/grpc-web/.test(c)), grpcWebCalls.join("; "));
    await shot(gw, "c-grpc-web-received");
  });

  await step("d: Swagger UI 'Try it out' on POST /publish", async () => {
    const topic = "swagger.test";
    const payload = `hello from Swagger UI ${run}`;
    // An SSE subscriber opened before the request, to see the message arrive live.
    const sse = await openSse(`${baseUrl}/subscribe?topic=${topic}`);
    try {
      assert.equal((await sse.next()).event, "subscribed");

      const docs = await newPage(context, consoleLog);
      await docs.goto(`${baseUrl}/swagger-ui/`);
      const op = docs.locator(".opblock.opblock-post", {
        has: docs.locator('.opblock-summary-path[data-path="/publish"]'),
      });
      await op.waitFor(); // the spec loaded and POST /publish is listed
      await shot(docs, "d-swagger-loaded");

      await op.locator(".opblock-summary").click();
      await op.locator("button.try-out__btn").click();
      const body = op.locator("textarea.body-param__text");
      await body.fill(JSON.stringify({ topic, payload }, null, 2));
      await op.locator("button.execute").click();
      // "Server response" table: the live answer's code and body.
      const response = op.locator(".live-responses-table tbody tr.response").first();
      await response.locator(".response-col_status").filter({ hasText: /^\s*200\s*$/ }).waitFor();
      const answer = JSON.parse(await response.locator(".response-col_description pre").first().textContent());
      assert.equal(answer.topic, topic);
      await shot(docs, "d-swagger-200");

      // The SSE subscriber got exactly that message.
      const event = await sse.next();
      assert.equal(event.event, "message");
      const message = JSON.parse(event.data);
      assert.equal(message.topic, topic);
      assert.equal(message.payload, payload);
      assert.equal(message.seq, answer.seq);
      await docs.close();
      pages.delete(docs);
    } finally {
      sse.close();
    }
  });

  await step("g: WebSocket mode: several subscriptions, publishes with acks", async () => {
    const page = await newPage(context, consoleLog);
    await page.goto(`${baseUrl}/`);
    await page.click("#ws-connect");
    await waitForText(page, "#ws-status", "open");
    for (const topics of ["ws.a", "ws.b.>"]) {
      await page.fill("#ws-sub-topics", topics);
      await page.click("#ws-sub-button");
      await page.locator("#ws-subs li", { hasText: topics }).waitFor();
    }
    // Messages published elsewhere arrive on one socket, tagged with their subscription.
    const a = `to ws.a ${run}`;
    const b = `to ws.b.x ${run}`;
    const publishedA = await httpPublish(baseUrl, "ws.a", a);
    await httpPublish(baseUrl, "ws.b.x", b);
    const rowA = await waitForRow(page, "#ws-messages", "ws.a", a);
    const rowB = await waitForRow(page, "#ws-messages", "ws.b.x", b);
    assert.equal(await rowA.getAttribute("data-seq"), String(publishedA.seq));
    assert.notEqual(await rowA.getAttribute("data-subscription"), await rowB.getAttribute("data-subscription"));
    // The page's publish is acknowledged with its seq, and delivered back to it.
    const own = `from the page ${run}`;
    await page.fill("#ws-pub-topic", "ws.b.y");
    await page.fill("#ws-pub-payload", own);
    await page.click("#ws-pub-button");
    await waitForText(page, "#ws-pub-result", "ack seq \\d+ \\(ws\\.b\\.y\\)");
    const ackSeq = (await page.textContent("#ws-pub-result")).match(/seq (\d+)/)[1];
    const ownRow = await waitForRow(page, "#ws-messages", "ws.b.y", own);
    assert.equal(await ownRow.getAttribute("data-seq"), ackSeq);
    const history = await (await fetch(`${baseUrl}/topics/ws.b.y/messages`)).json();
    assert.equal(String(history.messages.at(-1).seq), ackSeq);
    assert.equal(history.messages.at(-1).payload, own);
    await shot(page, "g-websocket");
    // Unsubscribing one leaves the other.
    await page.locator("#ws-subs li", { hasText: "ws.a" }).getByRole("button").click();
    await page.locator("#ws-subs li", { hasText: "ws.a" }).waitFor({ state: "detached" });
    assert.equal(await page.locator("#ws-subs li").count(), 1);
    await page.close();
    pages.delete(page);
  });

  if (!broker) {
    log("step e skipped: needs TOPICHUB_BIN to restart the broker");
  } else {
    await step("e: pages reconnect after a broker restart on the same port", async () => {
      await broker.stop();
      // Both pages notice the broken streams (the server's SSE `end` event / gRPC UNAVAILABLE).
      await waitForText(live, "#status", "reconnecting|connecting|closed");
      await waitForText(gw, "#gw-status", "reconnecting|connecting|closed");
      await shot(live, "e-broker-down");

      await broker.start(); // same port
      await waitForText(live, "#status", "live");
      await waitForText(gw, "#gw-status", "live");
      // The EventSource resumed with Last-Event-ID from the previous epoch: the new hub says
      // that the old history cannot be replayed.
      await live.locator("#messages .notice.gap").first().waitFor();

      const payload = `after the restart ${run}`;
      await httpPublish(broker.url, "browser.test", payload);
      await waitForRow(live, "#messages", "browser.test", payload);
      await shot(live, "e-sse-after-restart");

      const gwPayload = `gRPC-Web after the restart ${run}`;
      await httpPublish(broker.url, "gw.test", gwPayload);
      await waitForRow(gw, "#gw-messages", "gw.test", gwPayload);
      await shot(gw, "e-grpc-web-after-restart");
    });
  }

  if (!broker) {
    log("step f skipped: needs TOPICHUB_BIN to start a broker with authentication on");
  } else {
    await step("f: with authentication on, the pages use the token typed into their field", async () => {
      const secret = `browser-test secret ${run} padded to thirty-two bytes`;
      authBroker = new Broker(broker.bin, await freePort(), join(ARTIFACTS, "broker-auth.log"), ["--jwt-secret", secret]);
      await authBroker.start();
      const page = await newPage(context, consoleLog);
      await page.evaluate(() => localStorage.clear()).catch(() => {});
      await page.goto(`${authBroker.url}/?topic=auth.test`);
      // No token: the subscription is refused, and the page says why.
      await waitForText(page, "#status", "closed");
      await page.locator("#messages .notice.error", { hasText: "token" }).first().waitFor();
      const refused = await fetch(`${authBroker.url}/publish`, {
        method: "POST",
        body: JSON.stringify({ topic: "auth.test", payload: "x" }),
      });
      assert.equal(refused.status, 401);
      await shot(page, "f-no-token");

      await page.fill("#token", hs256(secret, { sub: "browser", exp: Math.floor(Date.now() / 1000) + 600,
        topichub: { publish: ["auth.>"], subscribe: ["auth.>"] } }));
      await page.dispatchEvent("#token", "change");
      await waitForText(page, "#status", "live");
      const payload = `with a token ${run}`;
      await page.fill("#pub-topic", "auth.test");
      await page.fill("#pub-payload", payload);
      await page.click("#pub-button");
      await waitForText(page, "#pub-result", ".*seq \\d+.*");
      await waitForRow(page, "#messages", "auth.test", payload);
      // A topic the token does not allow: the server's 403 message is shown.
      await page.fill("#pub-topic", "other.topic");
      await page.click("#pub-button");
      await waitForText(page, "#pub-result", ".*may not publish.*");
      await shot(page, "f-with-token");
      await page.close();

      // The gRPC-Web page has the same field: refused without a token, served with one.
      const gw = await newPage(context, consoleLog);
      await gw.goto(`${authBroker.url}/grpc-web.html?topic=auth.gw`);
      await gw.evaluate(() => localStorage.clear());
      await gw.reload();
      await waitForText(gw, "#gw-status", "closed");
      await gw.locator("#gw-messages .notice.error", { hasText: "Unauthenticated" }).first().waitFor();
      await gw.fill("#gw-pub-topic", "auth.gw");
      await gw.click("#gw-pub-button");
      await waitForText(gw, "#gw-pub-result", "Unauthenticated.*");
      await shot(gw, "f-grpc-web-no-token");

      await gw.fill("#token", hs256(secret, { sub: "browser", exp: Math.floor(Date.now() / 1000) + 600,
        topichub: { publish: ["auth.>"], subscribe: ["auth.>"] } }));
      await gw.dispatchEvent("#token", "change");
      await waitForText(gw, "#gw-status", "live");
      const gwPayload = `gRPC-Web with a token ${run}`;
      await gw.fill("#gw-pub-payload", gwPayload);
      await gw.click("#gw-pub-button");
      await waitForText(gw, "#gw-pub-result", ".*seq \\d+.*");
      await waitForRow(gw, "#gw-messages", "auth.gw", gwPayload);
      // Saved for the next visit, like the main page's.
      await gw.reload();
      await waitForText(gw, "#gw-status", "live");
      await shot(gw, "f-grpc-web-with-token");
      await authBroker.stop();
      authBroker = null;
    });
  }

  await step("h: a deleted topic ends the subscription; cluster mode shows NATS lost and back", async () => {
    const page = await newPage(context, consoleLog);
    await page.goto(`${baseUrl}/?topic=browser.deleted`);
    await waitForText(page, "#status", "live");
    const deleted = await fetch(`${baseUrl}/topics/browser.deleted`, { method: "DELETE" });
    assert.ok(deleted.ok || deleted.status === 404, `DELETE answered ${deleted.status}`);
    await page.locator("#messages .notice.error", { hasText: "Deleted" }).first().waitFor();
    await waitForText(page, "#status", "closed");
    await shot(page, "h-deleted");
    await page.close();
    pages.delete(page);

    if (!broker) {
      log("step h: cluster part skipped: needs TOPICHUB_BIN to start a broker in cluster mode");
      return;
    }
    assert.ok(existsSync(NATS_SERVER), `${NATS_SERVER} not found: run scripts/deps-nats.sh`);
    nats = new NatsServer(await freePort(), join(ARTIFACTS, "nats.log"));
    await nats.start();
    clusterBroker = new Broker(broker.bin, await freePort(), join(ARTIFACTS, "broker-cluster.log"),
      ["--nats", nats.url]);
    await clusterBroker.start();
    const sse = await newPage(context, consoleLog);
    await sse.goto(`${clusterBroker.url}/?topic=cluster.test`);
    await waitForText(sse, "#status", "live");
    const gwPage = await newPage(context, consoleLog);
    await gwPage.goto(`${clusterBroker.url}/grpc-web.html?topic=cluster.test`);
    await waitForText(gwPage, "#gw-status", "live");
    await httpPublish(clusterBroker.url, "cluster.test", `before ${run}`);
    await waitForRow(sse, "#messages", "cluster.test", `before ${run}`);
    await waitForRow(gwPage, "#gw-messages", "cluster.test", `before ${run}`);

    await nats.kill();
    await waitForText(sse, "#status", "paused");
    await sse.locator("#messages .notice.cluster", { hasText: "cannot reach" }).first().waitFor();
    await waitForText(gwPage, "#gw-status", "paused");
    await gwPage.locator("#gw-messages .notice.cluster", { hasText: "cannot reach" }).first().waitFor();
    await shot(sse, "h-cluster-lost");

    await nats.start(); // same port and store
    await within("the node back on NATS", (async () => {
      await waitForText(sse, "#status", "live");
      await sse.locator("#messages .notice.cluster", { hasText: "again" }).first().waitFor();
      await waitForText(gwPage, "#gw-status", "live");
    })(), 30_000);
    const after = `after NATS came back ${run}`;
    await within("a publish once NATS is back", (async () => {
      for (;;) {
        try {
          return await httpPublish(clusterBroker.url, "cluster.test", after);
        } catch { await new Promise((r) => setTimeout(r, 100)); }
      }
    })());
    await waitForRow(sse, "#messages", "cluster.test", after);
    await waitForRow(gwPage, "#gw-messages", "cluster.test", after);
    await shot(gwPage, "h-cluster-back");
    for (const p of [sse, gwPage]) {
      await p.close();
      pages.delete(p);
    }
    await clusterBroker.stop();
    clusterBroker = null;
    await nats.kill();
    rmSync(nats.store, { recursive: true, force: true });
    nats = null;
  });

  assert.deepEqual(pageErrors, [], "uncaught exceptions in the pages");
  await context.close();
}

/** Debian's nats-server (installed by scripts/deps-nats.sh). */
const NATS_SERVER = process.env.NATS_SERVER || "/usr/sbin/nats-server";

/** One `nats-server -js` on a fixed port and store, so it can be killed and started again. */
class NatsServer {
  constructor(port, logFile) {
    this.port = port;
    this.url = `nats://127.0.0.1:${port}`;
    this.store = mkdtempSync(join(tmpdir(), "topichub-browser-nats-"));
    this.log = createWriteStream(logFile, { flags: "a" });
    this.child = null;
  }

  async start() {
    const child = spawn(NATS_SERVER, ["-js", "-sd", this.store, "-a", "127.0.0.1", "-p", String(this.port)], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child = child;
    child.stdout.pipe(this.log, { end: false });
    child.stderr.pipe(this.log, { end: false });
    child.exited = new Promise((r) => child.once("exit", r));
    await within("nats-server accepting clients", (async () => {
      for (;;) {
        if (child.exitCode !== null) throw new Error("nats-server exited; see nats.log");
        const open = await new Promise((r) => {
          const socket = net.connect(this.port, "127.0.0.1", () => { socket.destroy(); r(true); });
          socket.on("error", () => r(false));
        });
        if (open) return;
        await new Promise((r) => setTimeout(r, 50));
      }
    })());
  }

  /** SIGKILL, as when a server dies. */
  async kill() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGKILL");
    await child.exited;
  }

  killSync() {
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGKILL");
  }
}

/** An HS256 JWT, as an identity provider would issue it. */
function hs256(secret, claims) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  return `${unsigned}.${createHmac("sha256", secret).update(unsigned).digest("base64url")}`;
}

// -----------------------------------------------------------------------------------------------

async function cleanup() {
  await browser?.close().catch(() => {});
  if (broker) await broker.stop().catch(() => broker.kill());
  if (authBroker) await authBroker.stop().catch(() => authBroker.kill());
  if (clusterBroker) await clusterBroker.stop().catch(() => clusterBroker.kill());
  nats?.killSync();
  if (nats) rmSync(nats.store, { recursive: true, force: true });
}

process.on("exit", () => {
  broker?.kill();
  authBroker?.kill();
  clusterBroker?.kill();
  nats?.killSync();
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    log(`got ${signal}; cleaning up`);
    broker?.kill();
    process.exit(130);
  });
}
const watchdog = setTimeout(() => {
  log(`FAILED: the whole run took longer than ${TOTAL_MS} ms`);
  broker?.kill();
  process.exit(1);
}, TOTAL_MS);
watchdog.unref();

const started = Date.now();
let failed = null;
try {
  await main();
} catch (error) {
  failed = error;
}
await within("cleanup", cleanup()).catch((e) => log(`cleanup: ${e.message}`));
writeFileSync(join(ARTIFACTS, "results.json"), JSON.stringify(results, null, 2));
const files = readdirSync(ARTIFACTS);
const shots = files.filter((f) => f.endsWith(".png")).length;
log(`artifacts in ${ARTIFACTS}: ${shots} screenshots, ${files.filter((f) => !f.endsWith(".png")).join(", ")}`);
for (const r of results) log(`${r.ok ? "ok  " : "FAIL"} ${r.name} (${r.ms} ms)`);
if (failed) {
  log(`FAILED after ${Date.now() - started} ms: ${failed.stack ?? failed}`);
  process.exit(1);
}
log(`all steps passed in ${Date.now() - started} ms`);
process.exit(0);
