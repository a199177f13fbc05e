// Mangoo's chat page. Plain JavaScript, no build step: every streaming practice in one file —
// fetch-based SSE (the token travels in a header, not the URL), resume by Last-Event-ID with
// exponential backoff and jitter, de-duplication by event id, a silence watchdog, Stop, and an
// answer that outlives the tab (a reload reopens the chat and follows the answer live). Markdown
// is markdown.js's (marked + DOMPurify + highlight.js, vendored).
"use strict";

const SILENCE_MS = 60_000; // no data and no heartbeat for this long: the stream is dead
const MAX_RECONNECTS = 8;
const NEAR_BOTTOM_PX = 48;
const SUGGESTIONS = [
  "Explain Server-Sent Events in two paragraphs",
  "Write a Python function that merges two sorted lists",
  "Compare PostgreSQL and SQLite in a table",
  "Give me three ideas for a weekend in Lisbon",
];
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  user: null, // the token's `sub`: which user's "last chat" to remember
  bots: [],
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

async function api(method, path, body) {
  const response = await fetch(apiUrl(path), {
    method,
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
    const problem = await response.json().catch(() => ({}));
    throw new Error(problem.error || `HTTP ${response.status}`);
  }
  return response.status === 204 ? null : response.json();
}

// ---- Sign-in --------------------------------------------------------------------------------

/** What to tell the user about a refused token, from the server's reason. */
function tokenProblem(reason = "") {
  if (/expired/i.test(reason)) return "This token has expired. Get a new one and sign in again.";
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

function takeTokenFromUrl() {
  // `mangoo serve` prints http://host/#token=...; a fragment never reaches a server or its logs.
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (token) {
    sessionStorage.setItem("mangoo.token", token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function showSignIn(problem) {
  closeStream();
  sessionStorage.removeItem("mangoo.token");
  state.token = null;
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").hidden = !problem;
  $("signin-error").textContent = problem || "";
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
    await loadBots();
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

// ---- Bots and chats -------------------------------------------------------------------------

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

function relativeDay(iso) {
  const then = new Date(iso);
  const days = Math.floor((new Date().setHours(0, 0, 0, 0) - new Date(then).setHours(0, 0, 0, 0)) / 86_400_000);
  const time = then.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (days <= 0) return `Today ${time}`;
  if (days === 1) return `Yesterday ${time}`;
  return then.toLocaleDateString([], { month: "short", day: "numeric", year: days > 300 ? "numeric" : undefined });
}

async function loadChats() {
  const { chats } = await api("GET", "api/v1/chats?limit=100");
  state.chats = chats;
  $("chat-list").replaceChildren(...chats.map(chatItem));
  showTitle();
}

function chatItem(chat) {
  const item = document.createElement("li");
  item.dataset.chatId = chat.chat_id;
  item.classList.toggle("current", chat.chat_id === state.chatId);
  const open = document.createElement("button");
  open.className = "open";
  open.type = "button";
  if (chat.chat_id === state.chatId) open.setAttribute("aria-current", "true");
  const title = document.createElement("span");
  title.className = "title";
  title.textContent = chat.title || "(untitled)";
  const when = document.createElement("span");
  when.className = "when";
  when.textContent = relativeDay(chat.updated_at);
  open.title = chat.title;
  open.append(title, when);
  open.addEventListener("click", () => {
    closeDrawer();
    openChat(chat.chat_id, chat.bot_id).catch(handleError);
  });
  const remove = document.createElement("button");
  remove.className = "delete icon";
  remove.type = "button";
  remove.append(icon("trash"));
  remove.setAttribute("aria-label", `Delete “${chat.title}”`);
  remove.title = "Delete";
  remove.addEventListener("click", () => confirmDelete(chat));
  item.append(open, remove);
  return item;
}

function showTitle() {
  const chat = state.chats.find((c) => c.chat_id === state.chatId);
  $("chat-title").textContent = chat ? chat.title : "New chat";
  $("rename").hidden = !chat;
  document.title = chat ? `${chat.title} · Mangoo` : "Mangoo";
}

async function openChat(chatId, botId) {
  closeStream();
  cancelEdit();
  state.chatId = chatId;
  rememberChat(chatId);
  if (botId) $("bot-picker").value = botId;
  const { messages } = await api("GET", `api/v1/chats/${encodeURIComponent(chatId)}/messages`);
  if (state.chatId !== chatId) return; // another chat was opened meanwhile
  $("messages").replaceChildren();
  for (const message of messages) {
    const el = addMessage(message.role, message.content, message.id);
    if (message.role === "assistant" && message.status !== "complete" && message.status !== "streaming") {
      el.dataset.status = message.status;
      note(el, endingNote(message.status), message.status === "error");
    }
  }
  showWelcome();
  showStatus("");
  for (const item of $("chat-list").children) {
    item.classList.toggle("current", item.dataset.chatId === chatId);
  }
  showTitle();
  refreshActions();
  scrollToBottom();
  const last = messages[messages.length - 1];
  if (last && last.role === "assistant" && last.status === "streaming") {
    // An answer still being generated (before a reload, or in another tab): follow it live
    // from its first event, so what is shown is exactly what is stored.
    const el = $("messages").lastElementChild;
    el.classList.add("typing");
    beginStream(chatId, el, 0, "");
    resume();
  }
  $("message-input").focus();
}

function endingNote(status) {
  return { stopped: "Stopped", interrupted: "Interrupted", error: "Failed" }[status] || status;
}

function newChat() {
  closeStream();
  cancelEdit();
  state.chatId = null;
  rememberChat(null);
  $("messages").replaceChildren();
  for (const item of $("chat-list").children) item.classList.remove("current");
  showWelcome();
  showStatus("");
  showTitle();
  closeDrawer();
  $("message-input").focus();
}

function confirmDelete(chat) {
  const dialog = $("confirm-delete");
  $("confirm-delete-text").textContent = `Delete “${chat.title}”? Its messages are gone for good.`;
  dialog.dataset.chatId = chat.chat_id;
  dialog.showModal();
  $("cancel-delete").focus();
}

async function deleteChat(chatId) {
  try {
    await api("DELETE", `api/v1/chats/${encodeURIComponent(chatId)}`);
    if (chatId === state.chatId) newChat();
    await loadChats();
    toast("Chat deleted");
  } catch (e) {
    handleError(e);
  }
}

// ---- Rename ---------------------------------------------------------------------------------

function startRename() {
  const chat = state.chats.find((c) => c.chat_id === state.chatId);
  if (!chat) return;
  $("title-input").value = chat.title;
  $("chat-title").hidden = true;
  $("rename").hidden = true;
  $("title-form").hidden = false;
  $("title-input").select();
}

function endRename() {
  $("title-form").hidden = true;
  $("chat-title").hidden = false;
  showTitle();
}

async function saveTitle() {
  const title = $("title-input").value.trim();
  if (!title || !state.chatId) return endRename();
  try {
    await api("PATCH", `api/v1/chats/${encodeURIComponent(state.chatId)}`, { title });
    await loadChats();
  } catch (e) {
    handleError(e);
  }
  endRename();
  $("rename").focus();
}

// ---- Messages -------------------------------------------------------------------------------

const ICONS = {
  copy: "M9 9h10v10H9zM5 15V5h10",
  edit: "M4 20h4L19 9l-4-4L4 16zM14 6l4 4",
  regenerate: "M20 11a8 8 0 1 0-2.3 5.7M20 5v6h-6",
  continue: "M5 12h12M13 6l6 6-6 6",
  trash: "M5 7h14M10 7V4h4v3M7 7l1 13h8l1-13",
};

function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", ICONS[name]);
  path.setAttribute("fill", "none");
  path.setAttribute("stroke", "currentColor");
  path.setAttribute("stroke-width", "2");
  path.setAttribute("stroke-linecap", "round");
  path.setAttribute("stroke-linejoin", "round");
  svg.append(path);
  return svg;
}

function addMessage(role, text, id) {
  const el = document.createElement("li");
  el.className = `msg ${role}`;
  el.dataset.role = role;
  if (id) el.dataset.id = id;
  el.dataset.text = text;
  const body = document.createElement("div");
  body.className = "body";
  el.append(body);
  if (role === "assistant") Markdown.render(body, text);
  else body.textContent = text;
  $("messages").append(el);
  showWelcome();
  followIfStuck();
  return el;
}

function note(el, text, isError = false) {
  el.querySelector(".note")?.remove();
  const small = document.createElement("div");
  small.className = "note";
  small.classList.toggle("error", isError);
  small.textContent = text;
  el.querySelector(".body").after(small);
}

function actionButton(name, label, onClick, labelled = false) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `icon action-${name}`;
  button.classList.toggle("labelled", labelled);
  button.setAttribute("aria-label", label);
  button.title = label;
  button.append(icon(name));
  if (labelled) button.append(` ${label}`);
  button.addEventListener("click", onClick);
  return button;
}

/** The buttons under messages: copy on every answer; edit, regenerate, continue on the last. */
function refreshActions() {
  for (const old of $("messages").querySelectorAll(".actions")) old.remove();
  if (state.streaming) return;
  const items = [...$("messages").children];
  const lastAnswer = items.findLast((el) => el.dataset.role === "assistant");
  const lastQuestion = items.findLast((el) => el.dataset.role === "user");
  for (const el of items) {
    const actions = document.createElement("div");
    actions.className = "actions";
    if (el.dataset.role === "assistant" && el.dataset.text) {
      actions.append(actionButton("copy", "Copy answer", () => copyText(el.dataset.text, "Answer copied")));
    }
    if (el === lastQuestion && state.chatId) {
      actions.append(actionButton("edit", "Edit and resend", () => startEdit(el)));
    }
    if (el === lastAnswer && el === items[items.length - 1] && state.chatId) {
      const unfinished = ["stopped", "interrupted", "error"].includes(el.dataset.status);
      if (unfinished) actions.append(actionButton("continue", "Continue", continueAnswer, true));
      actions.append(actionButton("regenerate", "Regenerate", regenerate, unfinished));
    }
    if (actions.children.length) el.append(actions);
  }
}

async function copyText(text, done) {
  try {
    await navigator.clipboard.writeText(text);
    toast(done);
  } catch {
    toast("Copying is not allowed here");
  }
}

let toastTimer;
function toast(text) {
  const el = $("toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.hidden = true), 2500);
}

function showWelcome() {
  $("welcome").hidden = $("messages").children.length > 0;
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

// ---- Scrolling: follow the answer unless the reader scrolled up -------------------------------

function scrollToBottom() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
  state.stickToBottom = true;
  $("jump").hidden = true;
}

function followIfStuck() {
  if (state.stickToBottom) scrollToBottom();
  else $("jump").hidden = false;
}

// Whatever changes the list's height — a rendered token, the actions row, the status line —
// keeps a reader who was at the bottom there.
function followResizes() {
  const observer = new ResizeObserver(() => {
    if (state.stickToBottom) scrollToBottom();
  });
  observer.observe($("messages"));
  observer.observe($("scroller"));
}

function announce(text) {
  $("announcer").textContent = text;
}

function onScroll() {
  const s = $("scroller");
  state.stickToBottom = s.scrollHeight - s.scrollTop - s.clientHeight < NEAR_BOTTOM_PX;
  if (state.stickToBottom) $("jump").hidden = true;
}

// ---- Sending, editing, regenerating ---------------------------------------------------------

async function send(message, { chatId = state.chatId } = {}) {
  if (state.streaming) return false;
  const botId = $("bot-picker").value;
  state.lastRequest = { message, botId, chatId };
  state.chatId = chatId;
  addMessage("user", message);
  const el = addMessage("assistant", "");
  el.classList.add("typing");
  el.setAttribute("aria-busy", "true");
  scrollToBottom();
  beginStream(chatId, el, 0, "");
  showStatus("");
  const body = { bot_id: botId, message, ...(chatId ? { chat_id: chatId } : {}) };
  read("POST", "api/v1/chat/stream", body);
  return true;
}

function submitComposer() {
  const input = $("message-input");
  const message = input.value.trim();
  if (!message) return;
  if (state.streaming) {
    // The draft stays where it is; nothing is lost by pressing Enter at the wrong moment.
    $("composer-hint").textContent = "An answer is still coming: your message waits here. Stop it or wait.";
    return;
  }
  const editing = state.editing;
  input.value = "";
  autosize();
  if (editing) {
    cancelEdit();
    resendFrom(editing.el, message).catch(handleError);
  } else {
    send(message);
  }
}

function startEdit(el) {
  state.editing = { el };
  el.classList.add("editing");
  const input = $("message-input");
  input.value = el.dataset.text;
  autosize();
  input.focus();
  showComposerHint();
}

function cancelEdit() {
  if (!state.editing) return;
  state.editing.el.classList.remove("editing");
  state.editing = null;
  $("message-input").value = "";
  autosize();
  showComposerHint();
}

/** Asks a question again from `userEl` on: what follows it is removed, here and on the server. */
async function resendFrom(userEl, message) {
  const chatId = state.chatId;
  let id = userEl.dataset.id;
  if (!id) {
    // Sent in this page: its id is only in storage.
    const { messages } = await api("GET", `api/v1/chats/${encodeURIComponent(chatId)}/messages`);
    id = messages.findLast((m) => m.role === "user")?.id;
  }
  await api("DELETE", `api/v1/chats/${encodeURIComponent(chatId)}/messages/${encodeURIComponent(id)}`);
  while (userEl.nextElementSibling) userEl.nextElementSibling.remove();
  userEl.remove();
  send(message, { chatId });
}

function regenerate() {
  const question = [...$("messages").children].findLast((el) => el.dataset.role === "user");
  if (question) resendFrom(question, question.dataset.text).catch(handleError);
}

function continueAnswer() {
  send("Continue from where you stopped.");
}

/** What Enter does now, under the composer. */
function showComposerHint() {
  $("composer-hint").textContent = state.editing
    ? "Editing your last message · Enter resends it · Esc cancels"
    : "Enter sends · Shift+Enter for a new line";
}

function autosize() {
  const input = $("message-input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 192)}px`;
}

// ---- Streaming ------------------------------------------------------------------------------

function showStatus(text, isError = false, canRetry = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
  $("retry").hidden = !canRetry;
}

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  if (!on) showComposerHint();
  refreshActions();
}

function beginStream(chatId, el, lastId, text) {
  state.streaming = { chatId, lastId, seen: new Set(), text, el, controller: null, attempts: 0, frame: 0 };
  setStreaming(true);
}

function closeStream() {
  const s = state.streaming;
  if (s && s.controller) s.controller.abort();
  state.streaming = null;
  setStreaming(false);
}

async function resume() {
  const s = state.streaming;
  if (!s || !s.chatId) return;
  const headers = s.lastId ? { "Last-Event-ID": String(s.lastId) } : {};
  await read("GET", `api/v1/chats/${encodeURIComponent(s.chatId)}/stream`, null, headers);
}

// Reads one response of SSE. A terminal event closes the stream; anything else that ends it
// (network error, silence, a cut connection) leads to a resume with Last-Event-ID.
async function read(method, path, body, extraHeaders = {}) {
  const s = state.streaming;
  const controller = new AbortController();
  s.controller = controller;
  let silence;
  const resetSilence = () => {
    clearTimeout(silence);
    silence = setTimeout(() => controller.abort(), SILENCE_MS);
  };
  let ended = false;
  try {
    resetSilence();
    const response = await fetch(apiUrl(path), {
      method,
      signal: controller.signal,
      headers: {
        Authorization: `Bearer ${state.token}`,
        Accept: "text/event-stream",
        ...(body ? { "Content-Type": "application/json" } : {}),
        ...extraHeaders,
      },
      body: body ? JSON.stringify(body) : undefined,
    });
    if (response.status === 204) return finish(s, null);
    if (!response.ok) {
      const problem = await response.json().catch(() => ({}));
      if (response.status === 401) return showSignIn(tokenProblem(problem.error));
      return fail(s, problem.error || `HTTP ${response.status}`, response.status >= 500 || response.status === 429);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      resetSilence();
      buffer += value.replace(/\r\n?/g, "\n");
      let boundary;
      while ((boundary = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary + 2);
        if (handle(s, parseEvent(block))) ended = true;
      }
      if (ended) {
        controller.abort();
        break;
      }
    }
  } catch {
    if (state.streaming !== s) return; // closed on purpose
  } finally {
    clearTimeout(silence);
  }
  if (!ended && state.streaming === s) reconnect(s);
}

function parseEvent(block) {
  const event = { id: null, type: "message", data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments: heartbeats
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") event.id = Number(value);
    else if (field === "event") event.type = value;
    else if (field === "data") event.data += (event.data ? "\n" : "") + value;
  }
  return event;
}

// Applies one event; true when it was the terminal one.
function handle(s, event) {
  if (!event.data) return false;
  if (event.id !== null) {
    if (s.seen.has(event.id) || event.id <= s.lastId) return false; // already shown
    s.seen.add(event.id);
    s.lastId = event.id;
  }
  const data = JSON.parse(event.data);
  if (event.type === "start") {
    s.chatId = data.chat_id;
    s.el.dataset.id = data.message_id;
    if (!state.chatId) {
      state.chatId = data.chat_id;
      rememberChat(data.chat_id);
    }
    s.attempts = 0;
    loadChats().catch(() => {});
  } else if (event.type === "message") {
    if (s.text === "" && s.el.dataset.text) s.el.querySelector(".note")?.remove();
    s.el.classList.remove("typing");
    s.text += data.content;
    scheduleRender(s);
    if (s.attempts) showStatus("");
    s.attempts = 0;
  } else if (event.type === "done") {
    finish(s, data.stopped ? "stopped" : null);
    return true;
  } else if (event.type === "error") {
    fail(s, data.error, data.retryable, data.code);
    return true;
  }
  return false;
}

// At most one Markdown render per frame, however fast tokens come.
function scheduleRender(s) {
  if (s.frame) return;
  s.frame = requestAnimationFrame(() => {
    s.frame = 0;
    renderAnswer(s, true);
  });
}

function renderAnswer(s, partial) {
  s.el.dataset.text = s.text;
  Markdown.render(s.el.querySelector(".body"), s.text, partial);
  followIfStuck();
}

function settle(s, status) {
  cancelAnimationFrame(s.frame);
  s.frame = 0;
  renderAnswer(s, false);
  s.el.classList.remove("typing");
  s.el.removeAttribute("aria-busy");
  if (status) s.el.dataset.status = status;
  if (state.streaming === s) state.streaming = null;
}

function finish(s, remark) {
  settle(s, remark);
  if (remark) note(s.el, endingNote(remark));
  setStreaming(false);
  followIfStuck(); // the actions row just added
  showStatus("");
  announce(remark ? `Answer ${endingNote(remark).toLowerCase()}` : "Answer complete");
  loadChats().catch(() => {});
}

function fail(s, message, retryable, code) {
  const status = code === "answer_interrupted" || code === "server_shutting_down" ? "interrupted" : "error";
  settle(s, status);
  note(s.el, endingNote(status), status === "error");
  setStreaming(false);
  followIfStuck();
  showStatus(message, true, retryable !== false);
}

// Exponential backoff with full jitter, then resume from the last event seen.
function reconnect(s) {
  if (!s.chatId) return fail(s, "the connection was lost before the answer started", true);
  if (s.attempts >= MAX_RECONNECTS) return fail(s, "the connection keeps dropping", true);
  const delay = Math.random() * Math.min(30_000, 500 * 2 ** s.attempts);
  s.attempts += 1;
  showStatus("reconnecting…");
  setTimeout(() => {
    if (state.streaming === s) resume();
  }, delay);
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
$("sign-out").addEventListener("click", () => showSignIn(null));
$("new-chat").addEventListener("click", newChat);
$("api-base").addEventListener("change", (e) => {
  localStorage.setItem("mangoo.apiBase", e.target.value.trim());
  start();
});
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  submitComposer();
});
$("message-input").addEventListener("input", autosize);
$("message-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submitComposer();
  } else if (e.key === "Escape" && state.editing) {
    cancelEdit();
  }
});
$("stop").addEventListener("click", async () => {
  const s = state.streaming;
  if (!s || !s.chatId) return;
  try {
    await api("POST", `api/v1/chats/${encodeURIComponent(s.chatId)}/stop`);
  } catch (e) {
    handleError(e);
  }
});
$("retry").addEventListener("click", () => {
  const last = state.lastRequest;
  if (!last) return;
  $("bot-picker").value = last.botId;
  showStatus("");
  // The failed turn may have created its chat: ask again there, not in a new one.
  send(last.message, { chatId: state.chatId || last.chatId });
});
$("scroller").addEventListener("scroll", onScroll, { passive: true });
followResizes();
$("jump").addEventListener("click", () => {
  scrollToBottom();
  $("message-input").focus();
});
$("theme-toggle").addEventListener("click", () => {
  localStorage.setItem("mangoo.theme", currentTheme() === "dark" ? "light" : "dark");
  applyTheme();
});
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", applyTheme);
$("rename").addEventListener("click", startRename);
$("title-form").addEventListener("submit", (e) => {
  e.preventDefault();
  saveTitle();
});
$("title-input").addEventListener("keydown", (e) => {
  if (e.key === "Escape") {
    endRename();
    $("rename").focus();
  }
});
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
$("cancel-delete").addEventListener("click", () => $("confirm-delete").close());
$("confirm-delete-button").addEventListener("click", () => {
  const dialog = $("confirm-delete");
  dialog.close();
  deleteChat(dialog.dataset.chatId);
});
// Copy buttons of code blocks, wherever Markdown put them.
$("messages").addEventListener("click", (e) => {
  const button = e.target.closest(".copy-code");
  if (button) copyText(button.closest(".code-block").querySelector("code").textContent.replace(/\n$/, ""), "Code copied");
});

start();
