// The node-side dependencies of tests/browser/*.mjs, re-exported from here so that they resolve
// from web/node_modules (bare imports in tests/browser/ would look for node_modules next to the
// test files). Not part of the browser bundle.
export { chromium } from "playwright-core";
export { Code, ConnectError, createClient } from "@connectrpc/connect";
export { createGrpcTransport } from "@connectrpc/connect-node";
export * from "./gen/topichub/v1/topichub_pb.js";
