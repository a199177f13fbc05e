// What both browser test files share: the servers' addresses (from tests/api/browser.rs), one
// browser session per file, the test upstream's controls, and small steps on the page.
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { createHmac } from "node:crypto";
import { chromium } from "playwright-core";

export const env = process.env;
export const { APP_URL, TOKEN, CONTROL_URL, ARTIFACTS = "artifacts", SCREENSHOTS = "screenshots" } = env;
mkdirSync(ARTIFACTS, { recursive: true });
mkdirSync(SCREENSHOTS, { recursive: true });

/** This file's browser, its context and its main page; set by `openSession`. */
export const session = {
  browser: null,
  context: null,
  page: null,
  // What Chromium logs on its own for what a test does on purpose (a cut connection).
  expectedNow: null,
};
export const problems = []; // console errors and CSP violations, from every page

export async function control(path, body = {}, base = CONTROL_URL) {
  const response = await fetch(`${base}/control/${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.equal(response.status, 204);
}

/** How many calls the upstream has had (all ended): the index of the next one's outcome. */
export async function upstreamCalls(base = CONTROL_URL) {
  return (await (await fetch(`${base}/control/requests`)).json()).count;
}

/** Waits until the `index`-th call to the upstream has ended; "cancelled", "completed"… */
export async function upstreamOutcome(index, base = CONTROL_URL) {
  const response = await fetch(`${base}/control/outcome/${index}`);
  return (await response.json()).outcome;
}

/** Watches a page for console errors and CSP violations; `allowed` matches expected ones. */
export function watch(p, allowed = /^$/) {
  p.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  p.on("console", (m) => {
    const expected = allowed.test(m.text()) || (session.expectedNow && session.expectedNow.test(m.text()));
    if (m.type() === "error" && !expected) problems.push(`console: ${m.text()}`);
  });
  p.on("console", (m) => {
    if (m.text().startsWith("CSP violation")) problems.push(m.text());
  });
  return p;
}

export async function newPage(viewport = { width: 1280, height: 800 }, allowed) {
  const p = watch(await session.context.newPage(), allowed);
  await p.setViewportSize(viewport);
  return p;
}

export const lastAnswer = (p = session.page) => p.locator("#messages li.assistant").last();
export const answerText = async (p = session.page) => (await lastAnswer(p).locator(".body").innerText()).trim();
export const waitForAnswer = (text, p = session.page) =>
  p.waitForFunction((expected) => {
    const all = document.querySelectorAll("#messages li.assistant .body");
    const last = all[all.length - 1];
    return last && last.textContent.replace(/\s+/g, " ").trim().startsWith(expected);
  }, text);
export const waitIdle = (p = session.page) => p.waitForSelector("#send:not([hidden])");
export const apiGet = async (path, token = TOKEN, base = APP_URL) =>
  (await session.page.request.get(new URL(path, base).href, { headers: { Authorization: `Bearer ${token}` } })).json();
export const stored = async (chatId, token, base) => (await apiGet(`api/v1/chats/${chatId}/messages`, token, base)).messages;
/** The chat's messages once none is streaming any more (an answer being concluded). */
export async function settled(chatId, token, base) {
  for (let tries = 0; ; tries++) {
    const messages = await stored(chatId, token, base);
    if (!messages.some((m) => m.status === "streaming") || tries === 100) return messages;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
export const currentChatId = (p = session.page) => p.evaluate(() => document.querySelector("#chat-list li.current")?.dataset.chatId);

/** Sends `message` in a new chat. */
export async function send(message, p = session.page) {
  await p.click("#new-chat");
  await p.fill("#message-input", message);
  await p.click("#send");
}

/** An HS256 token of the test secret. */
export function mint(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  const signature = createHmac("sha256", env.JWT_SECRET).update(unsigned).digest("base64url");
  return `${unsigned}.${signature}`;
}

/** Debian's Chromium, a context that reports CSP violations and records status lines, a page. */
export async function openSession() {

  session.browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  session.context = await session.browser.newContext({ colorScheme: "light" });
  await session.context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: new URL(APP_URL).origin });
  // CSP violations are reported to the page; make them visible to the console watcher.
  await session.context.addInitScript(() => {
    document.addEventListener("securitypolicyviolation", (e) =>
      console.log(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`),
    );
    window.__statuses = [];
    document.addEventListener("DOMContentLoaded", () => {
      const status = document.getElementById("status");
      new MutationObserver(() => window.__statuses.push(status.textContent)).observe(status, {
        childList: true,
        characterData: true,
        subtree: true,
      });
    });
  });
  session.page = await newPage();
  return session;
}
