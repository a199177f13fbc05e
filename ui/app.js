// Mangoo's reference chat client. Plain JavaScript, no dependencies: every streaming practice in
// one small file — fetch-based SSE (so the token travels in a header, not the URL), resume by
// Last-Event-ID with exponential backoff and jitter, de-duplication by event id, a silence
// watchdog, a stop button, and Markdown rendered without ever interpreting model output as HTML.
"use strict";

const SILENCE_MS = 60_000; // no data and no heartbeat for this long: the stream is dead
const MAX_RECONNECTS = 8;
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  bots: [],
  chatId: null,
  streaming: null, // the answer being received: {chatId, lastId, seen, text, el, controller}
  lastRequest: null, // what Retry sends again
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
    signOut();
    throw new Error("your session has expired; sign in again");
  }
  if (!response.ok && response.status !== 204) {
    const problem = await response.json().catch(() => ({}));
    throw new Error(problem.error || `HTTP ${response.status}`);
  }
  return response.status === 204 ? null : response.json();
}

// ---- Sign-in --------------------------------------------------------------------------------

function takeTokenFromUrl() {
  // `mangoo serve` prints http://host/#token=...; a fragment never reaches a server or its logs.
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (token) {
    sessionStorage.setItem("mangoo.token", token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function signOut() {
  sessionStorage.removeItem("mangoo.token");
  state.token = null;
  $("app").hidden = true;
  $("signin").hidden = false;
}

async function start() {
  takeTokenFromUrl();
  state.token = sessionStorage.getItem("mangoo.token");
  $("api-base").value = localStorage.getItem("mangoo.apiBase") || "";
  if (!state.token) {
    $("signin").hidden = false;
    return;
  }
  $("signin").hidden = true;
  $("app").hidden = false;
  try {
    await Promise.all([loadBots(), loadChats()]);
  } catch (e) {
    showStatus(e.message, true);
  }
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

async function loadChats() {
  const { chats } = await api("GET", "api/v1/chats?limit=50");
  const list = $("chat-list");
  list.replaceChildren(
    ...chats.map((chat) => {
      const item = document.createElement("li");
      item.dataset.chatId = chat.chat_id;
      item.classList.toggle("current", chat.chat_id === state.chatId);
      const open = document.createElement("button");
      open.className = "open";
      open.type = "button";
      open.textContent = chat.title || "(untitled)";
      open.title = chat.updated_at;
      open.addEventListener("click", () => openChat(chat.chat_id, chat.bot_id));
      const remove = document.createElement("button");
      remove.className = "delete";
      remove.type = "button";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Delete ${chat.title}`);
      remove.addEventListener("click", () => deleteChat(chat.chat_id));
      item.append(open, remove);
      return item;
    }),
  );
}

async function openChat(chatId, botId) {
  closeStream();
  state.chatId = chatId;
  if (botId) $("bot-picker").value = botId;
  const { messages } = await api("GET", `api/v1/chats/${encodeURIComponent(chatId)}/messages`);
  $("messages").replaceChildren();
  for (const message of messages) {
    const el = addMessage(message.role, message.content);
    if (message.role === "assistant" && message.status !== "complete") {
      note(el, message.status === "streaming" ? "still being written…" : message.status);
    }
  }
  showStatus("");
  await loadChats();
  const last = messages[messages.length - 1];
  if (last && last.role === "assistant" && last.status === "streaming") {
    // Pick up an answer still being generated (another tab, or before a reload).
    const el = $("messages").lastElementChild;
    beginStream(chatId, el, 0, "");
    resume();
  }
}

function newChat() {
  closeStream();
  state.chatId = null;
  $("messages").replaceChildren();
  showStatus("");
  loadChats().catch(() => {});
  $("message-input").focus();
}

async function deleteChat(chatId) {
  try {
    await api("DELETE", `api/v1/chats/${encodeURIComponent(chatId)}`);
    if (chatId === state.chatId) newChat();
    await loadChats();
  } catch (e) {
    showStatus(e.message, true);
  }
}

// ---- Messages and safe Markdown -------------------------------------------------------------

function addMessage(role, text) {
  const el = document.createElement("li");
  el.className = `msg ${role}`;
  el.dataset.role = role;
  if (role === "assistant") renderMarkdown(el, text);
  else el.textContent = text;
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function note(el, text) {
  const small = document.createElement("div");
  small.className = "note";
  small.textContent = text;
  el.append(small);
}

// Model output is untrusted: it is only ever put into the page as text nodes. The Markdown
// subset (paragraphs, headings, lists, code, bold, italics, links to http(s)) is built with
// createElement, so `<img onerror>` or `<script>` in an answer is shown, never run.
function renderMarkdown(el, source) {
  const blocks = [];
  const lines = source.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("```")) {
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      const pre = document.createElement("pre");
      const codeEl = document.createElement("code");
      codeEl.textContent = code.join("\n");
      pre.append(codeEl);
      blocks.push(pre);
    } else if (/^#{1,6} /.test(line)) {
      const level = Math.min(line.indexOf(" "), 6);
      const h = document.createElement(`h${Math.max(level, 3)}`);
      inline(h, line.slice(level + 1));
      blocks.push(h);
    } else if (/^\s*([-*]|\d+\.) /.test(line)) {
      const ordered = /^\s*\d+\./.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      for (; i < lines.length && /^\s*([-*]|\d+\.) /.test(lines[i]); i++) {
        const li = document.createElement("li");
        inline(li, lines[i].replace(/^\s*([-*]|\d+\.) /, ""));
        list.append(li);
      }
      i--;
      blocks.push(list);
    } else if (line.trim()) {
      const p = document.createElement("p");
      const para = [line];
      while (i + 1 < lines.length && lines[i + 1].trim() && !/^(```|#{1,6} |\s*([-*]|\d+\.) )/.test(lines[i + 1])) {
        para.push(lines[++i]);
      }
      inline(p, para.join("\n"));
      blocks.push(p);
    }
  }
  el.replaceChildren(...blocks);
}

function inline(parent, text) {
  const pattern = /(`[^`]+`|\*\*[^*]+\*\*|\*[^*\s][^*]*\*|\[[^\]]+\]\([^)\s]+\))/g;
  let at = 0;
  for (const match of text.matchAll(pattern)) {
    parent.append(document.createTextNode(text.slice(at, match.index)));
    const token = match[0];
    let node;
    if (token.startsWith("`")) {
      node = document.createElement("code");
      node.textContent = token.slice(1, -1);
    } else if (token.startsWith("**")) {
      node = document.createElement("strong");
      node.textContent = token.slice(2, -2);
    } else if (token.startsWith("*")) {
      node = document.createElement("em");
      node.textContent = token.slice(1, -1);
    } else {
      const [, label, href] = token.match(/^\[([^\]]+)\]\(([^)\s]+)\)$/);
      if (/^https?:\/\//i.test(href)) {
        node = document.createElement("a");
        node.href = href;
        node.rel = "noopener noreferrer nofollow";
        node.target = "_blank";
        node.textContent = label;
      } else {
        node = document.createTextNode(token);
      }
    }
    parent.append(node);
    at = match.index + token.length;
  }
  parent.append(document.createTextNode(text.slice(at)));
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
}

function beginStream(chatId, el, lastId, text) {
  state.streaming = { chatId, lastId, seen: new Set(), text, el, controller: null, attempts: 0 };
  setStreaming(true);
}

function closeStream() {
  const s = state.streaming;
  if (s && s.controller) s.controller.abort();
  state.streaming = null;
  setStreaming(false);
}

async function send(message) {
  if (state.streaming) return;
  const botId = $("bot-picker").value;
  state.lastRequest = { message, botId, chatId: state.chatId };
  addMessage("user", message);
  const el = addMessage("assistant", "");
  el.classList.add("typing");
  beginStream(state.chatId, el, 0, "");
  showStatus("");
  const body = { bot_id: botId, message, ...(state.chatId ? { chat_id: state.chatId } : {}) };
  await read("POST", "api/v1/chat/stream", body);
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
      return fail(s, problem.error || `HTTP ${response.status}`, response.status >= 500);
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
  } catch (e) {
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
    if (!state.chatId) state.chatId = data.chat_id;
    s.attempts = 0;
    loadChats().catch(() => {});
  } else if (event.type === "message") {
    s.el.classList.remove("typing");
    s.text += data.content;
    renderMarkdown(s.el, s.text);
    s.el.scrollIntoView({ block: "end" });
    showStatus("");
  } else if (event.type === "done") {
    finish(s, data.stopped ? "stopped" : null);
    return true;
  } else if (event.type === "error") {
    fail(s, data.error, data.retryable);
    return true;
  }
  return false;
}

function finish(s, remark) {
  s.el.classList.remove("typing");
  if (remark) note(s.el, remark);
  if (state.streaming === s) state.streaming = null;
  setStreaming(false);
  showStatus("");
  loadChats().catch(() => {});
}

function fail(s, message, retryable) {
  s.el.classList.remove("typing");
  if (state.streaming === s) state.streaming = null;
  setStreaming(false);
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

// ---- Wiring ---------------------------------------------------------------------------------

$("signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("mangoo.token", $("token-input").value.trim());
  $("token-input").value = "";
  start();
});
$("sign-out").addEventListener("click", signOut);
$("new-chat").addEventListener("click", newChat);
$("api-base").addEventListener("change", (e) => {
  localStorage.setItem("mangoo.apiBase", e.target.value.trim());
  start();
});
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("message-input");
  const message = input.value.trim();
  if (!message) return;
  input.value = "";
  send(message);
});
$("message-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", async () => {
  const s = state.streaming;
  if (!s || !s.chatId) return;
  try {
    await api("POST", `api/v1/chats/${encodeURIComponent(s.chatId)}/stop`);
  } catch (e) {
    showStatus(e.message, true);
  }
});
$("retry").addEventListener("click", () => {
  const last = state.lastRequest;
  if (!last) return;
  state.chatId = last.chatId || state.chatId;
  $("bot-picker").value = last.botId;
  showStatus("");
  send(last.message);
});

start();
