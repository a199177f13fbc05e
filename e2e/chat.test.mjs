// The chat page in a real headless Chromium (Debian's), driven by playwright-core.
// Started by tests/api/browser.rs, which runs a real Mangoo behind a cuttable proxy and a test
// upstream this script controls over HTTP:
//   APP_URL      the page, through the proxy
//   TOKEN        a JWT for the test user
//   CONTROL_URL  the test upstream: /control/script, /control/release, /control/cut
//   ARTIFACTS    where screenshots go
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const { APP_URL, TOKEN, CONTROL_URL, ARTIFACTS = "artifacts" } = process.env;
mkdirSync(ARTIFACTS, { recursive: true });

let browser;
let page;

async function control(path, body = {}) {
  const response = await fetch(`${CONTROL_URL}/control/${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.equal(response.status, 204);
}

const answerText = () => page.locator("#messages li.assistant").last().innerText();
const waitForAnswer = (text) =>
  page.waitForFunction(
    (expected) => {
      const all = document.querySelectorAll("#messages li.assistant");
      const last = all[all.length - 1];
      return last && last.textContent.replace(/\s+/g, " ").trim().startsWith(expected);
    },
    text,
  );
const waitIdle = () => page.waitForSelector("#send:not([hidden])");

/// Sends `message` in a new chat.
async function send(message) {
  await page.click("#new-chat");
  await page.fill("#message-input", message);
  await page.click("#send");
}

before(async () => {
  browser = await chromium.launch({
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
  page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  page.on("pageerror", (e) => console.error("page error:", e));
  // Record every status line the page shows, however briefly.
  await page.addInitScript(() => {
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
});

after(async () => {
  await browser?.close();
});

test("the printed link signs in and the token leaves the URL", async () => {
  await page.goto(`${APP_URL}#token=${TOKEN}`);
  await page.waitForSelector("#app:not([hidden])");
  assert.equal(new URL(page.url()).hash, "");
  assert.equal(await page.evaluate(() => sessionStorage.getItem("mangoo.token")), TOKEN);
  const bots = await page.locator("#bot-picker option").allTextContents();
  assert.ok(bots.includes("bot-123"), bots.join());
  const csp = (await page.request.get(APP_URL)).headers()["content-security-policy"];
  assert.match(csp, /script-src 'self'/);
});

test("an answer renders progressively as tokens arrive", async () => {
  const tokens = ["Streams", " arrive", " one", " token", " at", " a time."];
  await control("script", { tokens, gated: true });
  await send("Tell me about streaming");
  await page.waitForSelector("#messages li.assistant.typing");
  await page.screenshot({ path: `${ARTIFACTS}/1-typing.png` });
  const renders = [];
  let expected = "";
  for (const token of tokens) {
    await control("release", { n: 1 });
    expected += token;
    await waitForAnswer(expected.trim());
    renders.push(await answerText());
    if (renders.length === 3) await page.screenshot({ path: `${ARTIFACTS}/2-streaming.png` });
  }
  await waitIdle();
  assert.ok(new Set(renders).size >= 5, `distinct intermediate renders: ${renders.join(" | ")}`);
  assert.equal((await answerText()).trim(), expected);
  assert.equal(await page.locator("#messages li.assistant.typing").count(), 0);
  await page.screenshot({ path: `${ARTIFACTS}/3-answered.png` });
});

test("stop halts the answer mid-way", async () => {
  await control("script", { tokens: ["Half", " an", " answer", " never", " ends"], gated: true });
  await send("Start something long");
  await control("release", { n: 2 });
  await waitForAnswer("Half an");
  await page.click("#stop");
  await waitIdle();
  await page.waitForSelector("#messages li.assistant .note");
  assert.match(await answerText(), /^Half an\s+stopped$/);
});

test("a dropped connection resumes with the full answer exactly once", async () => {
  const tokens = ["One", " two", " three", " four", " five", " six."];
  await control("script", { tokens, gated: true });
  await send("Count to six");
  await control("release", { n: 2 });
  await waitForAnswer("One two");
  await page.evaluate(() => (window.__statuses = []));
  await control("cut");
  await page.waitForFunction(() => window.__statuses.includes("reconnecting…"));
  await control("release", { n: 4 });
  await waitIdle();
  assert.equal((await answerText()).trim(), tokens.join(""));
  assert.equal(await page.locator("#status.error").count(), 0);
  await page.screenshot({ path: `${ARTIFACTS}/4-resumed.png` });
});

test("model output is rendered as text, never as HTML", async () => {
  await control("script", {
    tokens: [
      "<img src=x onerror=\"window.__pwned=1\">",
      " <script>window.__pwned=2</script>",
      " [click](javascript:window.__pwned=3)",
      " and **bold**",
    ],
  });
  await send("Say something dangerous");
  await waitIdle();
  const answer = page.locator("#messages li.assistant").last();
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
  assert.equal(await answer.locator("img, script, a").count(), 0);
  assert.equal(await answer.locator("strong").innerText(), "bold");
  const text = await answer.innerText();
  assert.ok(text.includes('<img src=x onerror="window.__pwned=1">'), text);
  assert.ok(text.includes("<script>window.__pwned=2</script>"), text);
  await page.screenshot({ path: `${ARTIFACTS}/5-untrusted-output.png` });
});

test("an error shows its message and Retry asks again", async () => {
  await control("script", { http_error: 429 });
  await control("script", { tokens: ["Second", " time", " lucky."] });
  await send("Try twice");
  await page.waitForSelector("#status.error");
  assert.match(await page.locator("#status").innerText(), /limiting requests/);
  await page.click("#retry");
  await waitForAnswer("Second time lucky.");
  await waitIdle();
  assert.equal(await page.locator("#status.error").count(), 0);
  assert.equal(await page.locator("#retry").isHidden(), true);
});

test("after a reload the chat list is there, newest first, and old chats open", async () => {
  await page.reload();
  await page.waitForSelector("#chat-list li");
  const titles = await page.locator("#chat-list li .open").allInnerTexts();
  assert.ok(titles.length >= 5, titles.join(" | "));
  assert.equal(titles[0], "Try twice");
  const older = page.locator("#chat-list li .open", { hasText: "Tell me about streaming" });
  await older.click();
  await waitForAnswer("Streams arrive one token at a time.");
  assert.equal(await page.locator("#messages li.user").innerText(), "Tell me about streaming");
  await page.screenshot({ path: `${ARTIFACTS}/6-history.png` });

  const before = await page.locator("#chat-list li").count();
  await page.locator("#chat-list li", { hasText: "Start something long" }).locator(".delete").click();
  await page.waitForFunction((n) => document.querySelectorAll("#chat-list li").length === n - 1, before);
});
