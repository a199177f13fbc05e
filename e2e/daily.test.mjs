// The chat page in daily use, in Debian's headless Chromium: a long chat, many chats and their
// search, a session that expires, an outage longer than the grace period, a refused message,
// two tabs on one chat and a long pasted message. Started by tests/api/browser.rs after
// chat.test.mjs, with the same servers (see chat.test.mjs and support.mjs); its own browser,
// signed in by the link `mangoo serve` prints.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import {
  openSession,
  problems,
  session,
  env,
  APP_URL,
  ARTIFACTS,
  TOKEN,
  control,
  upstreamCalls,
  upstreamOutcome,
  watch,
  newPage,
  lastAnswer,
  answerText,
  waitForAnswer,
  waitIdle,
  apiGet,
  stored,
  settled,
  currentChatId,
  send,
  mint,
} from "./support.mjs";

let browser;
let page;

before(async () => {
  ({ browser, page } = await openSession());
  await page.goto(`${APP_URL}#token=${TOKEN}`);
  await page.waitForSelector("#app:not([hidden])");
});

after(async () => {
  await browser?.close();
});

// ---- Daily use: long chats, many chats, expiry, outages, refusals, tabs ---------------------

/** One turn through the API, as another client would send it; the chat's id. */
async function apiTurn(message, chatId = null, token = TOKEN, base = APP_URL) {
  const response = await page.request.post(new URL("api/v1/chat/stream", base).href, {
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    data: { bot_id: "bot-123", message, ...(chatId ? { chat_id: chatId } : {}) },
  });
  assert.equal(response.status(), 200, await response.text());
  const start = (await response.text()).match(/"chat_id":"([^"]+)"/);
  return start[1];
}

const shownUserTexts = (p = page) => p.locator("#messages li.user .body").allInnerTexts();

test("a 105-turn chat opens on its newest turn and older ones load while scrolling up", async () => {
  let chatId = null;
  for (let n = 1; n <= 105; n++) chatId = await apiTurn(`turn ${n}`, chatId);
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.reload();
  await page.waitForSelector("#app:not([hidden])");
  await page.click(`#chat-list li[data-chat-id="${chatId}"] .open`);
  await page.waitForFunction(() => [...document.querySelectorAll("#messages li.user .body")].pop()?.textContent === "turn 105");
  let texts = await shownUserTexts();
  assert.equal(texts[texts.length - 1], "turn 105");
  assert.ok(texts.length < 105, `a page, not the whole chat: ${texts.length} turns`);
  const newest = page.locator("#messages li.user").last();
  assert.ok(await newest.isVisible());
  const box = await newest.boundingBox();
  assert.ok(box.y > 0 && box.y + box.height <= 800, "the newest turn is on screen");

  // Scrolling up loads the rest, a page at a time, without moving what the reader sees.
  while (texts.length < 105) {
    const before = texts.length;
    const anchor = page.locator("#messages li.user").first();
    const anchorText = await anchor.innerText();
    await page.locator("#scroller").evaluate((s) => s.scrollTo(0, 0));
    await page.waitForFunction((n) => document.querySelectorAll("#messages li.user").length > n, before);
    texts = await shownUserTexts();
    const top = await page.locator("#scroller").evaluate((s) => s.scrollTop);
    assert.ok(top > 0, "the older page is above what was shown, not under the reader");
    assert.ok(texts.includes(anchorText));
  }
  assert.deepEqual(texts, Array.from({ length: 105 }, (_, i) => `turn ${i + 1}`));
  assert.equal(await page.locator("#older").isVisible(), false, "nothing older left");
  assert.equal(await page.locator("#messages li.assistant").count(), 105);
});

test("150 chats: the list pages on scroll, groups by day, and search finds titles and text", async () => {
  const before = (await apiGet("api/v1/chats?limit=100")).chats.length;
  for (let n = 0; n < 150; n += 10) {
    await Promise.all(
      Array.from({ length: 10 }, (_, i) => apiTurn(`Chat ${n + i} of many. The word here is zebra${n + i}.`)),
    );
  }
  await page.reload();
  await page.waitForSelector("#app:not([hidden])");
  const listed = () => page.locator("#chat-list li[data-chat-id]").count();
  assert.ok((await listed()) < 150, "the first page only");
  assert.deepEqual(await page.locator("#chat-list li.group").allInnerTexts(), ["TODAY"]);
  await page.screenshot({ path: `${ARTIFACTS}/daily-list.png` });
  while (await page.locator("#chat-list-more").isVisible()) {
    const count = await listed();
    await page.locator("#chat-list-nav").evaluate((nav) => nav.scrollTo(0, nav.scrollHeight));
    await page.waitForFunction(
      (n) => document.querySelectorAll("#chat-list li[data-chat-id]").length > n ||
        document.getElementById("chat-list-more").hidden,
      count,
    );
  }
  assert.equal(await listed(), before + 150);
  const ids = await page.locator("#chat-list li[data-chat-id]").evaluateAll((items) => items.map((i) => i.dataset.chatId));
  assert.equal(new Set(ids).size, ids.length, "no chat twice");

  // A word of the message only (not of its title): one result, the match marked.
  await page.fill("#chat-search", "zebra42");
  await page.waitForSelector("#search-results li[data-chat-id]");
  assert.equal(await page.locator("#chat-list").isVisible(), false);
  const results = page.locator("#search-results li[data-chat-id]");
  assert.equal(await results.count(), 1);
  assert.equal(await results.locator(".title").innerText(), "Chat 42 of many.");
  assert.equal(await results.locator("mark").innerText(), "zebra42");
  await page.screenshot({ path: `${ARTIFACTS}/daily-search.png` });
  // Prefixes of words, every word required; results page on scroll too.
  await page.fill("#chat-search", "many zebr");
  await page.waitForFunction(() => document.querySelectorAll("#search-results li[data-chat-id]").length >= 30);
  await page.locator("#chat-list-nav").evaluate((nav) => nav.scrollTo(0, nav.scrollHeight));
  await page.waitForFunction(() => document.querySelectorAll("#search-results li[data-chat-id]").length > 30);
  await page.fill("#chat-search", "zebra7 missing");
  await page.waitForSelector("#search-empty:not([hidden])");
  await page.fill("#chat-search", "zebra149");
  await page.waitForFunction(() => document.querySelectorAll("#search-results li[data-chat-id]").length === 1);
  await page.press("#chat-search", "Enter");
  await page.waitForFunction(() => document.querySelector("#messages li.user .body")?.textContent.includes("zebra149"));
  await page.press("#chat-search", "Escape");
  assert.equal(await page.locator("#chat-list").isVisible(), true);

  // Days later, the same chats fall under older groups. (A clock is its context's: this one's
  // own, so the other pages keep the real time.)
  for (const [days, group] of [[1, "YESTERDAY"], [3, "PREVIOUS 7 DAYS"], [20, "PREVIOUS 30 DAYS"]]) {
    const later = await browser.newContext();
    const p = watch(await later.newPage());
    await p.clock.setFixedTime(new Date(Date.now() + days * 86_400_000));
    await p.goto(`${APP_URL}#token=${TOKEN}`);
    await p.waitForSelector("#chat-list li[data-chat-id]");
    assert.equal(await p.locator("#chat-list li.group").first().innerText(), group);
    await later.close();
  }
});

test("a session that expires: Send shows the sign-in, keeps the message, and sends it after", async () => {
  const leeway = Number(env.JWT_LEEWAY_SECS);
  const now = Math.floor(Date.now() / 1000);
  // Valid for the server for 6 more seconds (its leeway included): time to sign in.
  const soon = mint({ sub: "alice", exp: now - leeway + 6 });
  const p = await newPage(undefined, /status of 401/);
  await p.goto(`${APP_URL}#token=${soon}`);
  await p.waitForSelector("#app:not([hidden])");
  await p.click("#new-chat");
  const draft = "Written while the session ran out";
  await p.fill("#message-input", draft);
  await p.waitForFunction((deadline) => Date.now() > deadline, (now + 7) * 1000, { polling: 250 });
  await p.click("#send");
  await p.waitForSelector("#signin:not([hidden])");
  assert.match(await p.locator("#signin-error").innerText(), /session has expired/);
  assert.equal(await p.locator("#signin-kept").isVisible(), true);
  await p.screenshot({ path: `${ARTIFACTS}/daily-expired.png` });

  // A fresh link in the same tab signs in again; the message is back in the box, unsent.
  await p.goto(`${APP_URL}#token=${TOKEN}`);
  await p.waitForSelector("#app:not([hidden])");
  assert.equal(await p.inputValue("#message-input"), draft);
  assert.equal(await p.locator("#messages li").count(), 0);
  await p.click("#send");
  await waitForAnswer("Hello, world!", p);
  await waitIdle(p);
  const chatId = await currentChatId(p);
  assert.equal((await stored(chatId))[0].content, draft);
  assert.equal(await p.inputValue("#message-input"), "");
  await p.close();
});

test("offline past the grace period: back online, the page shows the stored answer as it ended", async () => {
  const base = env.SHORT_GRACE_URL;
  const controlUrl = env.SHORT_GRACE_CONTROL_URL;
  const token = env.SHORT_GRACE_TOKEN;
  const tokens = ["Words", " keep", " coming", " while", " you", " are", " away", " and", " more", " never"];
  await control("script", { tokens, gated: true }, controlUrl);
  const offlineContext = await browser.newContext();
  const p = watch(await offlineContext.newPage(), /ERR_INTERNET_DISCONNECTED|ERR_NETWORK_CHANGED|ERR_INCOMPLETE_CHUNKED_ENCODING|Failed to fetch/);
  await p.goto(`${base}#token=${token}`);
  await p.waitForSelector("#app:not([hidden])");
  const call = await upstreamCalls(controlUrl);
  await send("Tell me something long", p);
  await control("release", { n: 2 }, controlUrl);
  await waitForAnswer("Words keep", p);
  const shownBefore = await answerText(p);

  // The network goes: new connections fail, and the one the answer was on is cut.
  await offlineContext.setOffline(true);
  await control("cut", {}, controlUrl);
  await p.waitForFunction(() => /Offline/.test(document.getElementById("status").textContent));
  await control("release", { n: 6 }, controlUrl); // generated with nobody listening
  assert.equal(await upstreamOutcome(call, controlUrl), "cancelled"); // the grace period passed
  const chatId = await currentChatId(p);
  const answer = (await settled(chatId, token, base))[1];
  assert.equal(answer.status, "interrupted");
  assert.ok(answer.content.length > shownBefore.length, `${answer.content} > ${shownBefore}`);

  await offlineContext.setOffline(false);
  await p.waitForFunction(() => document.querySelector("#messages li.assistant .note")?.textContent === "Interrupted");
  assert.equal(await answerText(p), answer.content);
  assert.equal(await lastAnswer(p).locator(".action-continue").count(), 1);
  assert.doesNotMatch(await p.locator("#status").innerText(), /Offline/);
  await offlineContext.close();
});

test("a refused 40,000-character message stays in the box; the counter shows the limit first", async () => {
  await page.click("#new-chat");
  const long = "x".repeat(40_000);
  await page.fill("#message-input", long);
  assert.equal(await page.locator("#char-count").isVisible(), true);
  assert.match(await page.locator("#char-count").innerText(), /40,000 \/ 32,768 characters: 7,232 too many/);
  assert.equal(await page.locator("#send").isDisabled(), true);
  await page.screenshot({ path: `${ARTIFACTS}/daily-counter.png` });
  await page.press("#message-input", "Enter");
  assert.match(await page.locator("#status").innerText(), /32,768 characters/);
  assert.equal((await page.inputValue("#message-input")).length, 40_000);

  // A page that still believes in an older, larger limit: the server refuses, nothing is lost.
  session.expectedNow = /status of 400/;
  await page.evaluate(() => {
    state.limits.max_message_chars = 1_000_000;
    updateCounter();
  });
  await page.click("#send");
  await page.waitForSelector("#status.error");
  session.expectedNow = null;
  assert.match(await page.locator("#status").innerText(), /Not sent: message is longer than 32768 characters/);
  assert.equal(await page.inputValue("#message-input"), long);
  assert.equal(await page.locator("#messages li").count(), 0, "no half-sent turn left on screen");
  // Stored as typed: a reload keeps it too.
  await page.reload();
  await page.waitForSelector("#app:not([hidden])");
  assert.equal((await page.inputValue("#message-input")).length, 40_000);
  await page.fill("#message-input", "");
});

test("two pages on one chat: a turn sent in one shows in the other when it is looked at again", async () => {
  const chatId = await apiTurn("Shared between two tabs");
  const other = await newPage();
  await other.goto(`${APP_URL}#token=${TOKEN}`);
  for (const p of [page, other]) {
    await p.reload();
    await p.waitForSelector("#app:not([hidden])");
    await p.click(`#chat-list li[data-chat-id="${chatId}"] .open`);
    await p.waitForSelector("#messages li.assistant");
  }
  await other.fill("#message-input", "Sent from the other tab");
  await other.click("#send");
  await waitIdle(other);
  await page.bringToFront();
  await page.evaluate(() => document.dispatchEvent(new Event("visibilitychange")));
  await page.waitForFunction(() => [...document.querySelectorAll("#messages li.user .body")].some((b) => b.textContent === "Sent from the other tab"));

  // An answer started in the other tab is followed live here.
  await control("script", { tokens: ["Followed", " from", " afar."], gated: true });
  await other.fill("#message-input", "And a slow one");
  await other.click("#send");
  await control("release", { n: 1 });
  await waitForAnswer("Followed", other);
  await page.bringToFront();
  await page.evaluate(() => window.dispatchEvent(new Event("focus")));
  await waitForAnswer("Followed");
  await control("release", { n: 2 });
  await waitForAnswer("Followed from afar.");
  await waitIdle();
  const messages = await stored(chatId);
  assert.equal(await answerText(), messages[messages.length - 1].content);
  assert.equal((await shownUserTexts()).length, 3);
  await other.close();
});

test("a 10,000-character message folds behind Show more", async () => {
  await page.click("#new-chat");
  const long = Array.from({ length: 200 }, (_, i) => `Line ${String(i).padStart(3, "0")} of a long paste, sixty characters or so, each.`).join("\n");
  assert.ok(long.length >= 10_000);
  await page.fill("#message-input", long);
  await page.click("#send");
  await waitIdle();
  const bubble = page.locator("#messages li.user").last();
  const folded = (await bubble.locator(".body").boundingBox()).height;
  assert.ok(folded < 400, `folded: ${folded}px`);
  await page.screenshot({ path: `${ARTIFACTS}/daily-folded.png` });
  await bubble.locator("button.fold").click();
  assert.equal(await bubble.locator("button.fold").innerText(), "Show less");
  const open = (await bubble.locator(".body").boundingBox()).height;
  assert.ok(open > 2000, `open: ${open}px`);
  await bubble.locator("button.fold").click();
  assert.ok((await bubble.locator(".body").boundingBox()).height < 400);
  // Folded again after a reload, from the stored message.
  await page.reload();
  await page.waitForSelector("#messages li.user button.fold");
});

test("no console errors and no CSP violations during the whole run", async () => {
  assert.deepEqual(problems, []);
});
