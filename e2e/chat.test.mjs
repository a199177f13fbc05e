// The chat page in a real headless Chromium (Debian's), driven by playwright-core.
// Started by tests/api/browser.rs, which runs a real Mangoo behind a cuttable proxy and a test
// upstream this script controls over HTTP:
//   APP_URL        the page, through the proxy (disconnect grace period: 30 s)
//   TOKEN          a JWT for the test user; EXPIRED_TOKEN and FORGED_TOKEN are refused ones
//   CONTROL_URL    the test upstream: /control/script, /control/release, /control/cut,
//                  /control/requests (how many calls so far),
//                  /control/outcome/{n} (waits until the n-th upstream call ended)
//   SHORT_GRACE_*  a second server whose grace period is 1 s, with its own upstream, token and
//                  cuttable proxy
//   JWT_SECRET, JWT_LEEWAY_SECS  to mint a token that expires during a test
//   ARTIFACTS      where step-by-step screenshots go; SCREENSHOTS: the README's (docs/)
// The tests run in order and share one page, as one user's session would. The daily-use tests
// (long chats, many chats, expiry, outages…) are in daily.test.mjs; both use support.mjs.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import {
  openSession,
  problems,
  session,
  env,
  APP_URL,
  TOKEN,
  ARTIFACTS,
  SCREENSHOTS,
  control,
  upstreamOutcome,
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
} from "./support.mjs";

let browser;
let context;
let page;

before(async () => {
  ({ browser, context, page } = await openSession());
});

after(async () => {
  await browser?.close();
});

// ---- Sign-in --------------------------------------------------------------------------------

test("without a token the sign-in screen shows alone, with how to get a token", async () => {
  // Refused tokens make Chromium log the 401 responses: expected here, and only here.
  const p = await newPage(undefined, /status of 401/);
  await p.goto(APP_URL);
  await p.waitForSelector("#signin:not([hidden])");
  assert.equal(await p.locator("#app").isVisible(), false);
  assert.equal(await p.locator("#messages, #composer").filter({ visible: true }).count(), 0);
  const help = await p.locator("#token-help").innerText();
  assert.match(help, /mangoo token --sub/);
  assert.match(help, /#token=/);

  for (const [token, expected] of [
    ["not a token", /does not look like a token/],
    [env.FORGED_TOKEN, /not valid here/],
    [env.EXPIRED_TOKEN, /expired/],
  ]) {
    await p.fill("#token-input", token);
    await p.press("#token-input", "Enter");
    // This attempt's verdict, not the previous one's (the page hides it on submit).
    await p.waitForFunction(
      (source) => {
        const error = document.getElementById("signin-error");
        return !error.hidden && new RegExp(source).test(error.textContent);
      },
      expected.source,
    );
    assert.match(await p.locator("#signin-error").innerText(), expected);
    assert.equal(await p.locator("#app").isVisible(), false);
  }
  await p.screenshot({ path: `${ARTIFACTS}/0-signin.png` });
  await p.close();
});

test("the printed link signs in, the token leaves the URL, the welcome screen has focus", async () => {
  await page.goto(`${APP_URL}#token=${TOKEN}`);
  await page.waitForSelector("#app:not([hidden])");
  assert.equal(new URL(page.url()).hash, "");
  assert.equal(await page.evaluate(() => sessionStorage.getItem("mangoo.token")), TOKEN);
  const bots = await page.locator("#bot-picker option").allTextContents();
  assert.ok(bots.includes("bot-123"), bots.join());
  assert.equal(await page.locator("#welcome").isVisible(), true);
  assert.ok((await page.locator("#suggestions button").count()) >= 3);
  assert.equal(await page.evaluate(() => document.activeElement.id), "message-input");
  const csp = (await page.request.get(APP_URL)).headers()["content-security-policy"];
  assert.match(csp, /script-src 'self'/);
  assert.match(csp, /img-src 'self' data:;/);
  const icon = await page.request.get(new URL("favicon.ico", APP_URL).href);
  assert.equal(icon.status(), 200);
  assert.equal(icon.headers()["content-type"], "image/x-icon");
});

// ---- Streaming ------------------------------------------------------------------------------

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
  assert.equal(await answerText(), expected);
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
  assert.equal(await answerText(), "Half an");
  assert.equal(await lastAnswer().locator(".note").innerText(), "Stopped");
  assert.equal(await lastAnswer().locator(".action-continue").count(), 1);
  assert.equal(await lastAnswer().locator(".action-regenerate").count(), 1);
});

test("a dropped connection resumes with the full answer exactly once", async () => {
  const tokens = ["One", " two", " three", " four", " five", " six."];
  await control("script", { tokens, gated: true });
  await send("Count to six");
  await control("release", { n: 2 });
  await waitForAnswer("One two");
  await page.evaluate(() => (window.__statuses = []));
  // The cut response is logged by Chromium itself as an incomplete body: expected here only.
  session.expectedNow = /ERR_INCOMPLETE_CHUNKED_ENCODING/;
  await control("cut");
  await page.waitForFunction(() => window.__statuses.includes("reconnecting…"));
  await control("release", { n: 4 });
  await waitIdle();
  session.expectedNow = null;
  assert.equal(await answerText(), tokens.join(""));
  assert.equal(await page.locator("#status.error").count(), 0);
  await page.screenshot({ path: `${ARTIFACTS}/4-resumed.png` });
});

test("pressing Enter while an answer streams keeps the draft", async () => {
  await control("script", { tokens: ["Still", " going."], gated: true });
  await send("Take your time");
  await page.fill("#message-input", "my next question");
  await page.press("#message-input", "Enter");
  assert.equal(await page.inputValue("#message-input"), "my next question");
  assert.match(await page.locator("#composer-hint").innerText(), /waits here/);
  await control("release", { n: 2 });
  await waitIdle();
  await page.press("#message-input", "Enter");
  await page.waitForFunction(() => document.querySelectorAll("#messages li.user").length === 2);
  assert.equal(await page.inputValue("#message-input"), "");
  await waitIdle();
});

// ---- Answers outlive the tab ----------------------------------------------------------------

test("a reload mid-answer reopens the chat and resumes it; the text equals the stored answer", async () => {
  const tokens = ["Reloads", " do", " not", " lose", " answers."];
  await control("script", { tokens, gated: true });
  await send("Survive a reload");
  await control("release", { n: 2 });
  await waitForAnswer("Reloads do");
  const chatId = await currentChatId();
  await page.reload();
  await page.waitForSelector("#messages li.assistant");
  assert.equal(await currentChatId(), chatId, "the same chat is open again");
  await control("release", { n: 3 });
  await waitForAnswer(tokens.join(""));
  await waitIdle();
  const messages = await stored(chatId);
  assert.equal(messages[1].status, "complete");
  assert.equal(await answerText(), messages[1].content);
  assert.equal(messages[1].content, tokens.join(""));
});

test("nobody back within the grace period: the answer is cancelled upstream, then continued", async () => {
  const base = env.SHORT_GRACE_URL;
  const controlUrl = env.SHORT_GRACE_CONTROL_URL;
  const token = env.SHORT_GRACE_TOKEN;
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: new URL(base).origin });
  await control("script", { tokens: ["Cut", " short", " here"], gated: true }, controlUrl);
  let p = await newPage();
  await p.goto(`${base}#token=${token}`);
  await p.waitForSelector("#app:not([hidden])");
  await send("A long one, please", p);
  await control("release", { n: 1 }, controlUrl);
  await waitForAnswer("Cut", p);
  await p.close(); // the tab is gone; nobody listens any more

  assert.equal(await upstreamOutcome(0, controlUrl), "cancelled");
  const { chats } = await apiGet("api/v1/chats", token, base);
  const messages = await settled(chats[0].chat_id, token, base);
  assert.equal(messages[1].status, "interrupted");
  assert.equal(messages[1].content, "Cut");

  p = await newPage();
  await p.goto(`${base}#token=${token}`);
  await waitForAnswer("Cut", p);
  assert.equal(await lastAnswer(p).locator(".note").innerText(), "Interrupted");
  await lastAnswer(p).locator(".action-continue").click();
  await waitForAnswer("Hello, world!", p);
  await waitIdle(p);
  const after = await stored(chats[0].chat_id, token, base);
  assert.equal(after.length, 4);
  assert.equal(after[3].status, "complete");
  await p.close();
});

// ---- Markdown -------------------------------------------------------------------------------

test("Markdown: tables, line breaks, lists, highlighted code with a label and a copy button", async () => {
  const answer = [
    "Line one\nline two\n\n",
    "| Store | Scale |\n|---|---|\n| SQLite | one node |\n| PostgreSQL | many |\n\n",
    "- first\n- second\n\n",
    "```python\ndef merge(a, b):\n    return sorted(a + b)\n```\n\n",
    "See ![a diagram](https://example.com/d.png) and [docs](https://example.com/docs).",
  ];
  await control("script", { tokens: answer });
  await send("Show me everything");
  await waitIdle();
  const body = lastAnswer().locator(".body");
  assert.equal(await body.locator("br").count(), 1, "a single line break is kept");
  assert.deepEqual(await body.locator("table th").allInnerTexts(), ["Store", "Scale"]);
  assert.equal(await body.locator("table tbody tr").count(), 2);
  assert.deepEqual(await body.locator("ul li").allInnerTexts(), ["first", "second"]);
  assert.equal(await body.locator(".code-lang").innerText(), "python");
  assert.ok((await body.locator("code .hljs-keyword").count()) >= 1, "coloured");
  assert.equal(await body.locator("img").count(), 0, "images from the model are never loaded");
  const text = await body.innerText();
  assert.match(text, /\[a diagram\]/);
  assert.doesNotMatch(text, /!\[|!a diagram/);
  const link = body.locator("a");
  assert.equal(await link.count(), 1);
  assert.equal(await link.getAttribute("href"), "https://example.com/docs");
  assert.match(await link.getAttribute("rel"), /noopener/);

  await body.locator(".copy-code").click();
  await page.waitForSelector("#toast:not([hidden])");
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  assert.equal(copied, "def merge(a, b):\n    return sorted(a + b)");
  await page.screenshot({ path: `${ARTIFACTS}/5-markdown.png` });
});

test("while streaming, half-written Markdown never shows its raw syntax", async () => {
  const tokens = ["Some ", "**bo", "ld** text", " and [a li", "nk](https://example.com)", "\n\n| a | b", " |\n|---|---|\n| 1 | 2 |"];
  await control("script", { tokens, gated: true });
  await send("Format something");
  let released = 0;
  for (const shown of ["Some", "Some bo", "Some bold text", "Some bold text and a li", "Some bold text and a link"]) {
    await control("release", { n: 1 });
    released += 1;
    await waitForAnswer(shown);
    const text = await answerText();
    assert.doesNotMatch(text, /\*\*|\[|\]\(/, `after ${released} tokens: ${text}`);
  }
  await control("release", { n: 1 });
  // The table's first row alone is not shown as a line of pipes.
  await page.waitForFunction(() => document.querySelector("#messages li.assistant:last-child").dataset.text.includes("| a | b"));
  assert.doesNotMatch(await answerText(), /\|/);
  await control("release", { n: 1 });
  await waitIdle();
  assert.equal(await lastAnswer().locator("table td").count(), 2);
});

test("model output is sanitised: no HTML runs, no script URL becomes a link", async () => {
  await control("script", {
    tokens: [
      "<img src=x onerror=\"window.__pwned=1\">",
      " <script>window.__pwned=2</script>",
      " [click](javascript:window.__pwned=3)",
      " <a href=\"javascript:window.__pwned=4\">x</a>",
      " ![p](javascript:window.__pwned=5)",
      " <svg onload=\"window.__pwned=6\"></svg>",
      " and **bold**",
    ],
  });
  await send("Say something dangerous");
  await waitIdle();
  const answer = lastAnswer().locator(".body");
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
  assert.equal(await answer.locator("img, script, a, svg, iframe").count(), 0);
  assert.equal(await answer.locator("strong").innerText(), "bold");
  const text = await answer.innerText();
  assert.ok(text.includes('<img src=x onerror="window.__pwned=1">'), text);
  assert.ok(text.includes("<script>window.__pwned=2</script>"), text);
  await page.screenshot({ path: `${ARTIFACTS}/6-untrusted-output.png` });
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

// ---- Actions --------------------------------------------------------------------------------

test("copy an answer, edit and resend the last message, regenerate it and page its versions", async () => {
  await control("script", { tokens: ["First", " answer."] });
  await send("Original question");
  await waitIdle();
  const chatId = await currentChatId();
  await lastAnswer().locator(".action-copy").click();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), "First answer.");

  await control("script", { tokens: ["Edited", " answer."] });
  await page.locator("#messages li.user").last().locator(".action-edit").click();
  assert.equal(await page.inputValue("#message-input"), "Original question");
  await page.fill("#message-input", "Edited question");
  await page.press("#message-input", "Enter");
  await waitForAnswer("Edited answer.");
  await waitIdle();
  let messages = await stored(chatId);
  assert.deepEqual(messages.map((m) => m.content), ["Edited question", "Edited answer."]);
  assert.equal(await page.locator("#messages li").count(), 2);

  await control("script", { tokens: ["Regenerated", " answer."] });
  await lastAnswer().locator(".action-regenerate").click();
  await waitForAnswer("Regenerated answer.");
  await waitIdle();
  messages = await stored(chatId);
  assert.deepEqual(messages.map((m) => m.content), ["Edited question", "Regenerated answer."]);
  assert.deepEqual(messages[1].versions.map((v) => v.content), ["Edited answer."]);

  // The answer it replaced is a version: ‹ 2 / 2 › steps back to it and forth again.
  const versions = lastAnswer().locator(".versions");
  await versions.waitFor();
  assert.equal(await versions.locator(".version-count").innerText(), "2 / 2");
  assert.equal(await versions.locator("button[aria-label='Next version']").isDisabled(), true);
  await versions.locator("button[aria-label='Previous version']").click();
  assert.equal(await answerText(), "Edited answer.");
  assert.equal(await lastAnswer().locator(".version-count").innerText(), "1 / 2");
  await page.screenshot({ path: `${ARTIFACTS}/versions.png` });
  await lastAnswer().locator(".action-copy").click();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), "Edited answer.");
  await lastAnswer().locator("button[aria-label='Next version']").click();
  assert.equal(await answerText(), "Regenerated answer.");

  // A third one, and after a reload all three are there, the newest shown.
  await control("script", { tokens: ["Third", " take."] });
  await lastAnswer().locator(".action-regenerate").click();
  await waitForAnswer("Third take.");
  await waitIdle();
  await page.waitForFunction(() => document.querySelector("#messages li.assistant:last-child .version-count")?.textContent === "3 / 3");
  await page.reload();
  await page.waitForSelector("#messages li.assistant .version-count");
  assert.equal(await lastAnswer().locator(".version-count").innerText(), "3 / 3");
  assert.equal(await answerText(), "Third take.");
  assert.equal(await page.locator("#messages li").count(), 2);
});

test("a chat is renamed from the header; delete asks first and can be undone", async () => {
  const chatId = await currentChatId();
  await page.click("#rename");
  await page.fill("#title-input", "Renamed chat");
  await page.press("#title-input", "Enter");
  await page.waitForFunction(() => document.querySelector("#chat-list li.current .title")?.textContent === "Renamed chat");
  assert.equal(await page.locator("#chat-title").innerText(), "Renamed chat");

  const item = page.locator(`#chat-list li[data-chat-id="${chatId}"]`);
  await item.locator(".delete").click();
  await page.waitForSelector("#confirm-delete[open]");
  assert.match(await page.locator("#confirm-delete-text").innerText(), /Renamed chat/);
  await page.click("#cancel-delete");
  assert.equal(await item.count(), 1, "cancelled: still there");
  await item.locator(".delete").click();
  await page.click("#confirm-delete-button");
  await page.waitForFunction((id) => !document.querySelector(`#chat-list li[data-chat-id="${id}"]`), chatId);
  // Undo, for a few seconds: the chat comes back, opened again, with its messages.
  await page.click("#toast button:text('Undo')");
  await page.waitForFunction((id) => document.querySelector(`#chat-list li.current[data-chat-id="${id}"]`), chatId);
  assert.ok((await stored(chatId)).length > 0, "nothing was deleted");
  assert.ok((await page.locator("#messages li").count()) > 0);

  await item.locator(".delete").click();
  const deleted = page.waitForResponse(
    (r) => r.request().method() === "DELETE" && r.url().endsWith(`/chats/${chatId}`),
    { timeout: 20_000 },
  );
  await page.click("#confirm-delete-button");
  assert.equal(await page.locator("#toast button").innerText(), "Undo");
  assert.equal((await deleted).status(), 204, "sent once the Undo has passed");
  const { chats } = await apiGet("api/v1/chats");
  assert.ok(!chats.some((c) => c.chat_id === chatId));
});

test("titles come from the first sentence and tell chats apart", async () => {
  await page.reload();
  await page.waitForSelector("#chat-list li");
  const titles = await page.locator("#chat-list li .title").allInnerTexts();
  assert.ok(titles.length >= 5, titles.join(" | "));
  assert.ok(titles.includes("Tell me about streaming"), titles.join(" | "));
  assert.equal(new Set(titles).size, titles.length, `distinct: ${titles.join(" | ")}`);
  const older = page.locator("#chat-list li .open", { hasText: "Tell me about streaming" });
  await older.click();
  await waitForAnswer("Streams arrive one token at a time.");
  assert.equal(await page.locator("#messages li.user .body").innerText(), "Tell me about streaming");
});

// ---- Layout ---------------------------------------------------------------------------------

/** Fills the current chat with a long answer so that the message list must scroll. */
async function longChat(p = page) {
  const para = "This paragraph is here to make the chat longer than the window. ";
  const tokens = [];
  for (let i = 0; i < 30; i++) tokens.push(`${para.repeat(3)}\n\n`);
  await control("script", { tokens: ["## A long answer\n\n", ...tokens, "| Metric | Value |\n|---|---|\n| p50 | 12 ms |\n| p99 | 41 ms |\n\n```rust\nfn main() {\n    println!(\"hi\");\n}\n```"] });
  await send("Write a long answer with a table and code", p);
  await waitIdle(p);
}

async function checkLayout(p, name) {
  const metrics = await p.evaluate(() => {
    const box = (sel) => document.querySelector(sel).getBoundingClientRect();
    return {
      scrollWidth: document.documentElement.scrollWidth,
      clientWidth: document.documentElement.clientWidth,
      windowScrolled: window.scrollY,
      header: box("header"),
      composer: box("#composer"),
      input: box("#message-input"),
      send: box("#send:not([hidden]), #stop:not([hidden])"),
      main: box("main"),
      viewport: { w: innerWidth, h: innerHeight },
      listScrolls: document.getElementById("scroller").scrollHeight > document.getElementById("scroller").clientHeight,
    };
  });
  assert.ok(metrics.scrollWidth <= metrics.clientWidth, `${name}: no horizontal scroll`);
  for (const part of ["main", "header", "composer", "input", "send"]) {
    assert.ok(metrics[part].right <= metrics.viewport.w + 0.5, `${name}: ${part} ends at ${metrics[part].right}px`);
  }
  assert.equal(metrics.windowScrolled, 0, `${name}: the page itself does not scroll`);
  assert.ok(metrics.listScrolls, `${name}: the message list scrolls`);
  assert.ok(metrics.header.top >= 0 && metrics.header.bottom <= metrics.viewport.h, `${name}: header on screen`);
  assert.ok(metrics.composer.bottom <= metrics.viewport.h + 0.5 && metrics.composer.top >= 0, `${name}: composer on screen`);
  return metrics;
}

test("desktop 1280×800: header and composer stay, only the messages scroll", async () => {
  await page.setViewportSize({ width: 1280, height: 800 });
  await longChat();
  const metrics = await checkLayout(page, "desktop");
  assert.ok(metrics.input.width >= 500, `message box ${metrics.input.width}px wide`);
  await page.mouse.wheel(0, -3000);
  assert.equal(await page.locator("header").isVisible(), true);
  assert.equal(await page.locator("#composer").isVisible(), true);
});

test("auto-scroll follows the answer, pauses when the reader scrolls up, and jumps back", async () => {
  const tokens = Array.from({ length: 60 }, (_, i) => `Sentence number ${i} keeps the answer growing.\n\n`);
  await control("script", { tokens, gated: true });
  await send("Keep talking");
  await control("release", { n: 30 });
  await waitForAnswer("Sentence number 0");
  await page.waitForFunction(() => document.querySelector("#messages li.assistant:last-child .body").textContent.includes("number 29"));
  const bottom = () => {
    const s = document.getElementById("scroller");
    return s.scrollHeight - s.scrollTop - s.clientHeight < 48;
  };
  // Waits for the view to reach the bottom (a frame may pass first); fails if it never does.
  const reachesBottom = () => page.waitForFunction(bottom);
  await reachesBottom(); // following the answer
  await page.evaluate(() => (document.getElementById("scroller").scrollTop = 0));
  await page.waitForFunction(() => document.getElementById("scroller").scrollTop === 0);
  await control("release", { n: 15 });
  await page.waitForFunction(() => document.querySelector("#messages li.assistant:last-child .body").textContent.includes("number 44"));
  assert.equal(await page.evaluate(() => document.getElementById("scroller").scrollTop), 0, "the reader stays put");
  await page.waitForSelector("#jump:not([hidden])");
  await page.click("#jump");
  await reachesBottom();
  assert.equal(await page.locator("#jump").isHidden(), true);
  await control("release", { n: 15 });
  await waitIdle();
  await reachesBottom(); // following again, to the end
});

test("phone 375×700: a drawer for chats, a full-width composer", async () => {
  await page.setViewportSize({ width: 375, height: 700 });
  const metrics = await checkLayout(page, "phone");
  assert.ok(metrics.input.width >= 220, `message box ${metrics.input.width}px wide`);
  assert.equal(await page.locator("#sidebar").isVisible(), false, "the chat list is a closed drawer");
  await page.click("#open-drawer");
  await page.waitForFunction(() => document.getElementById("sidebar").getBoundingClientRect().left >= 0);
  assert.equal(await page.locator("#new-chat").isVisible(), true);
  await page.keyboard.press("Escape");
  await page.waitForFunction(() => !document.getElementById("app").classList.contains("drawer-open"));
  await page.fill("#message-input", "typed on a phone");
  assert.equal(await page.inputValue("#message-input"), "typed on a phone");
  await page.fill("#message-input", "");
});

// ---- Themes, contrast, screenshots ----------------------------------------------------------

/** The WCAG contrast ratio of each element's text against what is behind it. */
function contrasts(p, selectors) {
  return p.evaluate((selectors) => {
    const rgb = (c) => c.match(/[\d.]+/g).map(Number);
    const lum = ([r, g, b]) => {
      const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (el) => {
      for (; el; el = el.parentElement) {
        const c = getComputedStyle(el).backgroundColor;
        const parts = rgb(c);
        if (parts.length < 4 || parts[3] > 0.9) return parts.slice(0, 3);
      }
      return [255, 255, 255];
    };
    const out = {};
    for (const sel of selectors) {
      const el = document.querySelector(sel);
      if (!el) continue;
      const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(background(el))];
      out[sel] = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    }
    return out;
  }, selectors);
}

test("both themes meet WCAG AA contrast; the toggle overrides the system and is remembered", async () => {
  await page.setViewportSize({ width: 1280, height: 800 });
  const selectors = [
    "body", "#chat-title", "#new-chat", "#send", "#chat-list .title", "#chat-list .when",
    "#composer-hint", "#message-input", ".msg.user .body", ".msg.assistant .body",
    ".code-lang", ".copy-code", ".hljs-keyword", ".hljs-string", ".hljs-title", "#sign-out",
    "#settings summary", "#chat-list li.group", "#chat-search",
  ];
  for (const scheme of ["light", "dark"]) {
    await page.evaluate(() => localStorage.removeItem("mangoo.theme"));
    await page.emulateMedia({ colorScheme: scheme });
    await page.reload();
    await page.locator("#chat-list li .open", { hasText: "Write a long answer" }).click();
    await page.waitForSelector("#messages li.assistant .code-block");
    assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), scheme);
    const ratios = await contrasts(page, selectors);
    for (const [sel, ratio] of Object.entries(ratios)) {
      assert.ok(ratio >= 4.5, `${scheme}: ${sel} has contrast ${ratio.toFixed(2)}:1`);
    }
    assert.equal(Object.keys(ratios).length, selectors.length, Object.keys(ratios).join());
  }
  await page.click("#theme-toggle");
  assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), "light");
  await page.reload();
  await page.waitForSelector("#app:not([hidden])");
  assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), "light", "remembered");
  await page.evaluate(() => localStorage.removeItem("mangoo.theme"));
  await page.emulateMedia({ colorScheme: "light" });
});

test("screenshots for the README: desktop and phone, light and dark", async () => {
  await control("script", {
    tokens: [
      "Both work; they suit different sizes.\n\n",
      "| | SQLite | PostgreSQL |\n|---|---|---|\n| Set-up | none: one file | a server |\n",
      "| Instances | one | many |\n| Writes | one at a time | concurrent |\n\n",
      "Start with SQLite, move when you add a **second instance**:\n\n",
      "```toml\n[database]\nurl = \"postgres://mangoo@db/mangoo\"\n```\n\n",
      "Mangoo migrates the schema on start.",
    ],
  });
  await page.setViewportSize({ width: 1280, height: 800 });
  await send("Should my chat server use SQLite or PostgreSQL?");
  await waitIdle();
  const shots = [
    ["desktop", { width: 1280, height: 800 }],
    ["phone", { width: 375, height: 700 }],
  ];
  for (const scheme of ["light", "dark"]) {
    await page.emulateMedia({ colorScheme: scheme });
    for (const [device, viewport] of shots) {
      await page.setViewportSize(viewport);
      await page.reload();
      await page.waitForSelector("#messages li.assistant .code-block");
      await page.evaluate(() => document.activeElement.blur());
      await page.screenshot({ path: `${SCREENSHOTS}/${device}-${scheme}.png` });
    }
  }
  await page.emulateMedia({ colorScheme: "light" });
  await page.setViewportSize({ width: 1280, height: 800 });
});

// ---- Keyboard and screen readers ------------------------------------------------------------

test("keyboard only: send with Enter, reach the answer's actions, open and close the drawer", async () => {
  await page.reload();
  await page.waitForSelector("#app:not([hidden])");
  await page.click("#new-chat");
  assert.equal(await page.evaluate(() => document.activeElement.id), "message-input");
  await control("script", { tokens: ["Typed", " without", " a", " mouse."] });
  await page.keyboard.type("Hello from the keyboard");
  await page.keyboard.press("Enter");
  await waitForAnswer("Typed without a mouse.");
  await waitIdle();
  assert.equal(await lastAnswer().getAttribute("aria-busy"), null, "announced once finished");
  assert.equal(await page.locator("#messages").getAttribute("role"), "log");

  // Backwards from the composer, the last answer's actions come first.
  await page.focus("#message-input");
  let reached = null;
  for (let i = 0; i < 8 && !reached; i++) {
    await page.keyboard.press("Shift+Tab");
    reached = await page.evaluate(() => document.activeElement.className.match(/action-\w+/)?.[0] ?? null);
  }
  assert.equal(reached, "action-regenerate");
  await control("script", { tokens: ["Again", " by", " keyboard."] });
  await page.keyboard.press("Enter");
  await waitForAnswer("Again by keyboard.");
  await waitIdle();

  await page.setViewportSize({ width: 375, height: 700 });
  await page.focus("#open-drawer");
  await page.keyboard.press("Enter");
  assert.equal(await page.evaluate(() => document.activeElement.id), "new-chat", "focus moves into the drawer");
  await page.keyboard.press("Escape");
  assert.equal(await page.evaluate(() => document.activeElement.id), "open-drawer");
  await page.setViewportSize({ width: 1280, height: 800 });
});

test("no console errors and no CSP violations during the whole run", async () => {
  assert.deepEqual(problems, []);
});
