// gRPC-Web demo page: calls `topichub.v1.PubSub` from the browser with Connect's gRPC-Web
// transport, on the same origin (and port) as everything else the broker serves.
//
//   - Publish: a unary call (`PubSub/Publish`); the answer's cursor seq is shown in #gw-pub-result.
//   - Subscribe: a server-streaming call (`PubSub/Subscribe`); events are rendered in #gw-messages.
//   - #token: a bearer token for brokers with authentication on, sent with every call; kept in
//     localStorage (shared with the main page) and taken from `?access_token=` on the page URL.
//     When the stream breaks (broker restart, network), it is reopened after the last cursor
//     received, so nothing is missed or repeated while the hub keeps its history (a restarted
//     hub answers with a `gap` notice instead).
//
// Element ids are a contract with tests/browser/browser.test.mjs. Built into web/grpc-web.js by
// scripts/build-web.sh (esbuild); the generated code under ./gen comes from `buf generate`.

import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import {
  CursorSchema,
  PubSub,
  type Cursor,
  type Message,
  type SubscribeRequestSchema,
} from "./gen/topichub/v1/topichub_pb.js";

const MAX_ROWS = 500;
/** Reconnect delays after a broken stream: first retry after 0.5 s, then up to 5 s. */
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 5000;
/** Status codes after which reopening the stream may help; anything else is shown and final. */
const RETRYABLE = new Set([
  Code.Unavailable,
  Code.Unknown,
  Code.Internal,
  Code.DeadlineExceeded,
  Code.ResourceExhausted,
  Code.Aborted,
]);

/** A bearer token, for brokers started with a JWT key; shared with the main page. */
const TOKEN_KEY = "topichub.token";
const token = (): string => $<HTMLInputElement>("token").value.trim();

// Every call carries the token typed into #token (as `authorization: Bearer`), read per call so
// that a new token applies to the next call without rebuilding the client.
const withToken: Interceptor = (next) => (request) => {
  const current = token();
  if (current) request.header.set("authorization", "Bearer " + current);
  return next(request);
};
const transport = createGrpcWebTransport({ baseUrl: location.origin, interceptors: [withToken] });
const client = createClient(PubSub, transport);

// ---------------------------------------------------------------------------------------------
// DOM helpers

function $<T extends HTMLElement = HTMLElement>(id: string): T {
  const node = document.getElementById(id);
  if (!node) throw new Error(`missing #${id}`);
  return node as T;
}

function el(tag: string, className?: string, text?: string): HTMLElement {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const parseTopics = (text: string): string[] => text.split(/[\s,]+/).filter(Boolean);

type Status = "connecting" | "live" | "paused" | "reconnecting" | "closed";

function setStatus(state: Status, detail = ""): void {
  const badge = $("gw-status");
  badge.textContent = state;
  badge.className = "badge " + state;
  badge.title = detail;
}

/** Adds a row on top of #gw-messages, dropping the oldest rows beyond MAX_ROWS. */
function addRow(row: HTMLElement): void {
  const list = $("gw-messages");
  list.querySelector(".empty")?.remove();
  list.prepend(row);
  while (list.childElementCount > MAX_ROWS) list.lastElementChild?.remove();
}

function addNotice(kind: "gap" | "lag" | "cluster" | "error", text: string): void {
  addRow(el("div", "notice " + kind, text));
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** The payload as text when it is UTF-8, otherwise a short description of the bytes. */
function payloadText(payload: Uint8Array): { text: string; binary: boolean } {
  try {
    return { text: utf8.decode(payload), binary: false };
  } catch {
    return { text: `(binary, ${payload.length} bytes)`, binary: true };
  }
}

function formatTime(date: Date | undefined): string {
  if (!date) return "";
  const ms = String(date.getMilliseconds()).padStart(3, "0");
  return date.toLocaleTimeString([], { hour12: false }) + "." + ms;
}

const cursorText = (cursor: Cursor | undefined): string =>
  cursor ? `${cursor.epoch}-${cursor.seq}` : "";

function addMessage(message: Message): void {
  const seq = String(message.cursor?.seq ?? "");
  const row = el("div", "msg");
  row.dataset.topic = message.topic;
  row.dataset.seq = seq;
  const meta = el("div", "meta");
  meta.append(el("span", "topic", message.topic), el("span", "seq", "seq " + seq));
  const published = message.publishedAt ? timestampDate(message.publishedAt) : undefined;
  const time = el("time", "time", formatTime(published));
  time.setAttribute("datetime", published?.toISOString() ?? "");
  time.title = `${published?.toISOString() ?? ""} · cursor ${cursorText(message.cursor)}`;
  meta.append(time);
  const headers = Object.entries(message.headers);
  if (headers.length) {
    meta.append(el("span", "headers", headers.map(([k, v]) => `${k}: ${v}`).join(" · ")));
  }
  const { text, binary } = payloadText(message.payload);
  const payload = el("pre", "payload" + (binary ? " binary" : ""), text);
  row.append(meta, payload);
  addRow(row);
  received += 1;
  $("gw-count").textContent = `${received} received`;
}

/** "CODE: message" for any error a call may throw. */
function describe(err: unknown): string {
  const error = ConnectError.from(err);
  return `${Code[error.code] ?? error.code}: ${error.rawMessage}`;
}

// ---------------------------------------------------------------------------------------------
// Subscribe (server streaming)

let received = 0;
/** Aborts the current subscription loop, if any. */
let stopCurrent: AbortController | null = null;

const sleep = (ms: number, signal: AbortSignal): Promise<void> =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });

/** Follows `topics` until another subscribe replaces it; reopens broken streams. */
async function subscribe(topics: string[]): Promise<void> {
  stopCurrent?.abort();
  const abort = new AbortController();
  stopCurrent = abort;
  const { signal } = abort;
  $<HTMLInputElement>("gw-topic").value = topics.join(", ");
  if (!topics.length) {
    setStatus("closed");
    $("gw-current").textContent = "not subscribed";
    return;
  }
  const query = topics.map((t) => "topic=" + encodeURIComponent(t)).join("&");
  history.replaceState(null, "", "?" + query + location.hash); // shareable URL
  $("gw-current").textContent = "subscribed to " + topics.join(", ");

  let last: Cursor | undefined; // newest position seen: resume after it
  let delay = RETRY_MIN_MS;
  setStatus("connecting");
  while (!signal.aborted) {
    const request: MessageInitShape<typeof SubscribeRequestSchema> = {
      topics,
      start: last
        ? { position: { case: "after", value: last } }
        : { position: { case: "latest", value: true } },
    };
    try {
      for await (const response of client.subscribe(request, { signal })) {
        if (signal.aborted) return; // replaced by another subscribe
        const event = response.event;
        switch (event.case) {
          case "subscribed":
            setStatus("live", `subscription ${event.value.subscriptionId}`);
            delay = RETRY_MIN_MS;
            if (!last) {
              // Before any message, resume after the head the hub reported.
              last = event.value.head;
            } else if (event.value.head && event.value.head.epoch !== last.epoch) {
              // The hub restarted with a new history: its `gap` notice covers the old one, and
              // a later reconnect replays the new history from its start.
              last = create(CursorSchema, { epoch: event.value.head.epoch, seq: 0n });
            }
            break;
          case "message":
            addMessage(event.value);
            last = event.value.cursor ?? last;
            break;
          case "gap": {
            const g = event.value;
            // to_seq 0 (below from_seq): the range runs to the end of an earlier epoch.
            const range = g.toSeq < g.fromSeq ? `${g.fromSeq} to end of epoch`
              : g.toSeq === g.fromSeq ? `${g.fromSeq}` : `${g.fromSeq}-${g.toSeq}`;
            addNotice("gap", `Missed messages seq ${range} (${g.reason})`);
            break;
          }
          case "lag":
            addNotice("lag", `Fell behind at seq ${event.value.fromSeq}; catching up to seq ${event.value.toSeq}`);
            break;
          case "cluster":
            // Cluster mode: delivery pauses while the node cannot reach NATS, and continues
            // where it paused; the stream stays open.
            addNotice("cluster", `Cluster: ${event.value.message}`);
            setStatus(event.value.reachable ? "live" : "paused", event.value.message);
            break;
        }
      }
      // The server ended the stream with OK (e.g. Unsubscribe): nothing to resume.
      if (!signal.aborted) setStatus("closed", "stream ended by the server");
      return;
    } catch (err) {
      if (signal.aborted) return; // replaced by another subscribe
      const error = ConnectError.from(err);
      addNotice("error", "Subscribe: " + describe(error));
      if (!RETRYABLE.has(error.code)) {
        setStatus("closed", describe(error));
        return;
      }
      setStatus("reconnecting", describe(error));
      await sleep(delay, signal);
      delay = Math.min(delay * 2, RETRY_MAX_MS);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Publish (unary)

function showResult(kind: "ok" | "error" | "pending", text: string): void {
  const result = $("gw-pub-result");
  result.textContent = text;
  result.className = "result " + kind;
}

async function publish(topic: string, payload: string): Promise<void> {
  showResult("pending", "publishing…");
  try {
    const answer = await client.publish({
      topic: topic.trim(),
      payload: new TextEncoder().encode(payload),
    });
    showResult("ok", `published seq ${answer.cursor?.seq} to ${topic.trim()}`);
  } catch (err) {
    showResult("error", describe(err));
  }
}

// ---------------------------------------------------------------------------------------------

function init(): void {
  // ?access_token= on the page URL, else the token saved last time (by either page).
  const params = new URLSearchParams(location.search);
  $<HTMLInputElement>("token").value = params.get("access_token") || localStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    localStorage.setItem(TOKEN_KEY, token());
    void subscribe(parseTopics($<HTMLInputElement>("gw-topic").value));
  });
  $("gw-sub-form").addEventListener("submit", (event) => {
    event.preventDefault();
    void subscribe(parseTopics($<HTMLInputElement>("gw-topic").value));
  });
  $("gw-pub-form").addEventListener("submit", (event) => {
    event.preventDefault();
    void publish($<HTMLInputElement>("gw-pub-topic").value, $<HTMLTextAreaElement>("gw-pub-payload").value);
  });
  $("gw-pub-payload").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $<HTMLFormElement>("gw-pub-form").requestSubmit();
    }
  });
  $("gw-clear").addEventListener("click", () => {
    $("gw-messages").replaceChildren(el("p", "empty muted", "No messages yet."));
    received = 0;
    $("gw-count").textContent = "";
  });
  const fromUrl = new URLSearchParams(location.search).getAll("topic").flatMap(parseTopics);
  void subscribe(fromUrl.length ? fromUrl : ["demo.>"]);
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
