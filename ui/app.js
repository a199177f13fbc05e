// Mangoo's chat page. Plain JavaScript, no build step, four classic scripts sharing one scope:
//   app.js      state, the API, sign-in (and a session that expires), drafts, limits, wiring
//   chats.js    the chat list: pages on scroll, day groups, search, rename, delete with Undo
//   messages.js a chat's messages: newest first, older pages on scrolling up, long messages
//               folded, answer versions, the actions under them, keeping up with other tabs
//   stream.js   sending and streaming: fetch-based SSE (the token travels in a header, not the
//               URL), resume by Last-Event-ID with backoff and jitter, de-duplication by event
//               id, a silence watchdog, offline waits, and the stored answer as the last word
// Markdown is markdown.js's (marked + DOMPurify + highlight.js, vendored).
"use strict";

const SUGGESTIONS = [
  "Explain Server-Sent Events in two paragraphs",
  "Write a Python function that merges two sorted lists",
  "Compare PostgreSQL and SQLite in a table",
  "Give me three ideas for a weekend in Lisbon",
];
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  user: null, // the token's `sub`: whose drafts and "last chat" to remember
  bots: [],
  limits: { max_message_chars: null },
  chats: [],
  chatId: null,
  streaming: null, // the answer being received: {chatId, lastId, seen, text, el, controller}
  lastRequest: null, // what Retry sends again
  editing: null, // the user message being edited: {id, el}
  stickToBottom: true,
};

// ---- API ------------------------------------------------------------------------------------

function apiBase() {
  const configured = (localStorage.getItem("mangoo.apiBase") || "").trim();
  // Relative by default, so the page works behind a path prefix as well as at the root.
  return configured ? configured.replace(/\/+$/, "") + "/" : new URL(".", location.href).href;
}

function apiUrl(path) {
  return new URL(path, apiBase()).href;
}

class SignInError extends Error {}

/** A refusal in the contract's shape: `code` and the server's message. */
class ApiError extends Error {
  constructor(status, problem) {
    super(problem.error || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code;
  }
}

async function api(method, path, body, { keepalive = false } = {}) {
  const response = await fetch(apiUrl(path), {
    method,
    keepalive,
    headers: {
      Authorization: `Bearer ${state.token}`,
      ...(body ? { "Content-Type": "application/json" } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 401) {
    const problem = await response.json().catch(() => ({}));
    throw new SignInError(tokenProblem(problem.error));
  }
  if (!response.ok && response.status !== 204) {
    throw new ApiError(response.status, await response.json().catch(() => ({})));
  }
  return response.status === 204 ? null : response.json();
}

const chatPath = (chatId, rest = "") => `api/v1/chats/${encodeURIComponent(chatId)}${rest}`;

// ---- Sign-in --------------------------------------------------------------------------------

/** What to tell the user about a refused token, from the server's reason. */
function tokenProblem(reason = "") {
  if (/expired/i.test(reason)) return "Your session has expired. Sign in again to go on.";
  return "This token is not valid here. Check that you copied all of it, or get a new one.";
}

/** The token's claims, or null when it is not shaped like a JWT at all. */
function claimsOf(token) {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    return JSON.parse(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/")));
  } catch {
    return null;
  }
}

/** True when the URL brought a token (`#token=`, as `mangoo serve` prints it). */
function takeTokenFromUrl() {
  // A fragment never reaches a server or its logs; the page removes it at once.
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (!token) return false;
  sessionStorage.setItem("mangoo.token", token);
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}

/** The sign-in screen. The chat, its drafts and anything unsent stay stored for afterwards. */
function showSignIn(problem) {
  closeStream();
  sessionStorage.removeItem("mangoo.token");
  state.token = null;
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").hidden = !problem;
  $("signin-error").textContent = problem || "";
  $("signin-kept").hidden = !problem || !hasDrafts();
  $("token-input").focus();
}

async function start() {
  applyTheme();
  takeTokenFromUrl();
  state.token = sessionStorage.getItem("mangoo.token");
  $("api-base").value = localStorage.getItem("mangoo.apiBase") || "";
  if (!state.token) return showSignIn(null);
  const claims = claimsOf(state.token);
  if (!claims) return showSignIn("That does not look like a token: a token has three parts separated by dots.");
  state.user = String(claims.sub || "");
  try {
    await Promise.all([loadBots(), loadLimits()]);
  } catch (e) {
    if (e instanceof SignInError) return showSignIn(e.message);
    $("signin").hidden = true;
    $("app").hidden = false;
    return showStatus(e.message, true);
  }
  $("signin").hidden = true;
  $("app").hidden = false;
  renderSuggestions();
  try {
    await loadChats();
    const last = localStorage.getItem(lastChatKey());
    const known = state.chats.find((c) => c.chat_id === last);
    if (known) await openChat(known.chat_id, known.bot_id);
    else newChat();
  } catch (e) {
    handleError(e);
  }
}

function lastChatKey() {
  return `mangoo.lastChat.${state.user}`;
}

function rememberChat(chatId) {
  if (chatId) localStorage.setItem(lastChatKey(), chatId);
  else localStorage.removeItem(lastChatKey());
}

function handleError(e) {
  if (e instanceof SignInError) showSignIn(e.message);
  else showStatus(e.message, true);
}

// ---- Drafts: what is typed is stored as it is typed, per chat, until the server takes it ------

function draftKey(chatId = state.chatId) {
  return `mangoo.draft.${state.user}.${chatId || "new"}`;
}

/** Signing out on purpose takes this user's drafts off the device too. */
function clearDrafts() {
  for (const key of Object.keys(localStorage)) {
    if (key.startsWith(`mangoo.draft.${state.user}.`)) localStorage.removeItem(key);
  }
}

function hasDrafts() {
  return Object.keys(localStorage).some((key) => key.startsWith(`mangoo.draft.${state.user}.`));
}

function saveDraft() {
  if (state.editing) return; // an edit's text is the old message's until it is sent
  const text = $("message-input").value;
  if (text.trim()) localStorage.setItem(draftKey(), text);
  else localStorage.removeItem(draftKey());
}

/** The draft of the chat now open, into the composer. */
function restoreDraft() {
  $("message-input").value = localStorage.getItem(draftKey()) || "";
  autosize();
  updateCounter();
}

/** A sent message stays stored as its chat's draft until the server has taken it. */
function holdDraft(chatId, message) {
  localStorage.setItem(draftKey(chatId), message);
}

function dropDraft(chatId, message) {
  // Only the message that was sent: something typed since is a new draft.
  if (localStorage.getItem(draftKey(chatId)) === message) localStorage.removeItem(draftKey(chatId));
}

/** A message the server did not take goes back into the composer, before what is there. */
function returnToComposer(message) {
  const input = $("message-input");
  const now = input.value.trim();
  input.value = now && now !== message.trim() ? `${message}\n\n${input.value}` : message;
  autosize();
  updateCounter();
  saveDraft();
}

// ---- Limits ---------------------------------------------------------------------------------

async function loadLimits() {
  try {
    state.limits = await api("GET", "api/v1/limits");
  } catch (e) {
    // A Mangoo from before the limits endpoint (Settings → API base URL): no counter, the
    // server's refusal still keeps the text.
    if (e instanceof SignInError) throw e;
    state.limits = { max_message_chars: null };
  }
}

/** The server counts characters (code points), as `[...text]` does. */
function messageLength(text) {
  return [...text.trim()].length;
}

/** The counter under the composer: shown near the limit, red and blocking past it. */
function updateCounter() {
  const max = state.limits.max_message_chars;
  const counter = $("char-count");
  const length = messageLength($("message-input").value);
  if (!max || length < max * 0.8) {
    counter.hidden = true;
    $("send").disabled = false;
    return;
  }
  counter.hidden = false;
  const over = length > max;
  counter.classList.toggle("over", over);
  counter.textContent = over
    ? `${length.toLocaleString()} / ${max.toLocaleString()} characters: ${(length - max).toLocaleString()} too many`
    : `${length.toLocaleString()} / ${max.toLocaleString()} characters`;
  $("send").disabled = over;
}

// ---- Theme ----------------------------------------------------------------------------------

function currentTheme() {
  return localStorage.getItem("mangoo.theme") ||
    (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
}

function applyTheme() {
  const theme = currentTheme();
  document.documentElement.dataset.theme = theme;
  const other = theme === "dark" ? "light" : "dark";
  $("theme-toggle").setAttribute("aria-label", `Use the ${other} theme`);
  $("theme-toggle").title = `Use the ${other} theme`;
}

// ---- Bots -----------------------------------------------------------------------------------

async function loadBots() {
  const { bots } = await api("GET", "api/v1/bots");
  state.bots = bots;
  const picker = $("bot-picker");
  picker.replaceChildren(
    ...bots.map((bot) => {
      const option = document.createElement("option");
      option.value = bot.id;
      option.textContent = bot.id;
      return option;
    }),
  );
}

// ---- Small pieces of the page ---------------------------------------------------------------

let toastTimer;
/** A short notice; with `action`, a button (Undo) for as long as it shows. */
function toast(text, { action = null, ms = 2500 } = {}) {
  const el = $("toast");
  const label = document.createElement("span");
  label.textContent = text;
  el.replaceChildren(label);
  if (action) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = action.label;
    button.addEventListener("click", () => {
      el.hidden = true;
      action.run();
    });
    el.append(button);
  }
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.hidden = true), ms);
}

function announce(text) {
  $("announcer").textContent = text;
}

function showStatus(text, isError = false, canRetry = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
  $("retry").hidden = !canRetry;
}

function renderSuggestions() {
  $("suggestions").replaceChildren(
    ...SUGGESTIONS.map((text) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = text;
      button.addEventListener("click", () => send(text));
      return button;
    }),
  );
}

/** What Enter does now, under the composer. */
function showComposerHint() {
  $("composer-hint-text").textContent = state.editing
    ? "Editing your last message · Enter resends it · Esc cancels"
    : "Enter sends · Shift+Enter for a new line";
}

function autosize() {
  const input = $("message-input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 192)}px`;
}

// ---- Drawer (narrow screens) ----------------------------------------------------------------

function openDrawer() {
  $("app").classList.add("drawer-open");
  $("open-drawer").setAttribute("aria-expanded", "true");
  $("new-chat").focus();
}

function closeDrawer() {
  if (!$("app").classList.contains("drawer-open")) return;
  $("app").classList.remove("drawer-open");
  $("open-drawer").setAttribute("aria-expanded", "false");
}

// ---- Wiring ---------------------------------------------------------------------------------

$("signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  $("signin-error").hidden = true; // this attempt's verdict replaces the last one
  sessionStorage.setItem("mangoo.token", $("token-input").value.trim());
  $("token-input").value = "";
  start();
});
// A fresh `#token=` link opened in this tab signs in again without a reload.
window.addEventListener("hashchange", () => {
  if (takeTokenFromUrl()) start();
});
$("sign-out").addEventListener("click", () => {
  clearDrafts();
  showSignIn(null);
});
$("new-chat").addEventListener("click", newChat);
$("api-base").addEventListener("change", (e) => {
  localStorage.setItem("mangoo.apiBase", e.target.value.trim());
  start();
});
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  submitComposer();
});
$("message-input").addEventListener("input", () => {
  autosize();
  updateCounter();
  saveDraft();
});
$("message-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submitComposer();
  } else if (e.key === "Escape" && state.editing) {
    cancelEdit();
  }
});
$("stop").addEventListener("click", stopAnswer);
$("retry").addEventListener("click", retryLast);
$("theme-toggle").addEventListener("click", () => {
  localStorage.setItem("mangoo.theme", currentTheme() === "dark" ? "light" : "dark");
  applyTheme();
});
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", applyTheme);
$("open-drawer").addEventListener("click", openDrawer);
$("close-drawer").addEventListener("click", () => {
  closeDrawer();
  $("open-drawer").focus();
});
$("scrim").addEventListener("click", closeDrawer);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && $("app").classList.contains("drawer-open")) {
    closeDrawer();
    $("open-drawer").focus();
  }
});
wireChatList();
wireMessages();
wireStreaming();

start();
