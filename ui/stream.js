// Sending a message and receiving its answer over SSE. A refused message goes back into the
// composer; a lost connection resumes by Last-Event-ID (with backoff and jitter while online,
// and on the `online` event after an outage); and when the page stops following an answer
// without its end, what storage holds is what the page then shows.
"use strict";

const SILENCE_MS = 60_000; // no data and no heartbeat for this long: the stream is dead
const MAX_RECONNECTS = 8;

// ---- Sending --------------------------------------------------------------------------------

function send(message, { chatId = state.chatId, regenerating = false } = {}) {
  if (state.streaming) return false;
  const botId = $("bot-picker").value;
  state.lastRequest = { message, botId, chatId };
  state.chatId = chatId;
  holdDraft(chatId, message);
  const question = addMessage("user", message);
  const el = addMessage("assistant", "");
  el.classList.add("typing");
  el.setAttribute("aria-busy", "true");
  scrollToBottom();
  beginStream(chatId, el, 0, "");
  state.streaming.sent = { message, question, chatId, regenerating };
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
    $("composer-hint-text").textContent = "An answer is still coming: your message waits here. Stop it or wait.";
    return;
  }
  const max = state.limits.max_message_chars;
  if (max && messageLength(message) > max) {
    showStatus(`This message is longer than the ${max.toLocaleString()} characters a message may have.`, true);
    return;
  }
  const editing = state.editing;
  input.value = "";
  autosize();
  updateCounter();
  if (editing) {
    cancelEdit();
    resendFrom(editing.el, message).catch((e) => {
      returnToComposer(message);
      handleError(e);
    });
  } else {
    send(message);
  }
}

/**
 * The server did not take the message (`401`, `400 message_too_long`, `409`, `429`, a 5xx…):
 * it leaves the conversation and goes back into the composer, with the reason beside it.
 */
function refused(s, status, problem) {
  const { message, question } = s.sent;
  settle(s, null);
  question.remove();
  s.el.remove();
  setStreaming(false);
  showWelcome();
  returnToComposer(message);
  if (status === 401) return showSignIn(tokenProblem(problem.error));
  const why = (problem.error || `HTTP ${status}`).replace(/\.$/, "");
  showStatus(`Not sent: ${why}. Your text is back in the box.`, true);
  $("message-input").focus();
}

async function stopAnswer() {
  const s = state.streaming;
  if (!s || !s.chatId) return;
  try {
    await api("POST", chatPath(s.chatId, "/stop"));
  } catch (e) {
    handleError(e);
  }
}

function retryLast() {
  const last = state.lastRequest;
  if (!last) return;
  $("bot-picker").value = last.botId;
  showStatus("");
  // The failed turn may have created its chat: ask again there, not in a new one.
  send(last.message, { chatId: state.chatId || last.chatId });
}

// ---- Streaming ------------------------------------------------------------------------------

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  if (!on) showComposerHint();
  refreshActions();
}

function beginStream(chatId, el, lastId, text) {
  state.streaming = { chatId, lastId, seen: new Set(), text, el, controller: null, attempts: 0, frame: 0, sent: null };
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
  await read("GET", chatPath(s.chatId, "/stream"), null, headers);
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
    if (response.status === 204) return nothingRunning(s);
    if (!response.ok) return notStreamed(s, response);
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

/** The connection went before the server's `start`: the message goes back like a refusal. */
function lostBeforeTaken(s) {
  return refused(s, 0, { error: "the connection was lost before the server took the message" });
}

/** A resume found no answer running: ended already, or the message never reached the server. */
function nothingRunning(s) {
  if (s.sent && !s.sent.accepted) {
    return lostBeforeTaken(s);
  }
  finish(s, null);
  syncWhenReachable();
}

/** A response that is not a stream: a refused message, or a resume the server turned down. */
async function notStreamed(s, response) {
  const problem = await response.json().catch(() => ({}));
  if (s.sent && !s.sent.accepted) return refused(s, response.status, problem);
  if (response.status === 401) return showSignIn(tokenProblem(problem.error));
  return fail(s, problem.error || `HTTP ${response.status}`, response.status >= 500 || response.status === 429);
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
  if (event.type === "start") started(s, data);
  else if (event.type === "message") {
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

/** The server took the message: it is stored, so it is no longer a draft. */
function started(s, data) {
  s.chatId = data.chat_id;
  s.el.dataset.id = data.message_id;
  if (s.sent) {
    s.sent.accepted = true;
    dropDraft(s.sent.chatId, s.sent.message);
  }
  if (!state.chatId) {
    // What is in the composer now belongs to this chat, no longer to a new one.
    localStorage.removeItem(draftKey(null));
    state.chatId = data.chat_id;
    rememberChat(data.chat_id);
    saveDraft();
  }
  s.attempts = 0;
  loadChats().catch(() => {});
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
  s.el.dataset.status = status || "complete";
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
  // A regenerated answer's earlier versions are in storage: show its ‹ 2 / 2 ›.
  if (s.sent?.regenerating) syncOpenChat();
}

function fail(s, message, retryable, code) {
  const status = code === "answer_interrupted" || code === "server_shutting_down" ? "interrupted" : "error";
  settle(s, status);
  note(s.el, endingNote(status), status === "error");
  setStreaming(false);
  followIfStuck();
  showStatus(message, true, retryable !== false);
  // The answer may have gone on (or ended otherwise) where this page could not follow it: show
  // what is stored as soon as storage can be read.
  if (!code || s.sent?.regenerating) syncWhenReachable();
}

// Exponential backoff with full jitter, then resume from the last event seen. Offline, the page
// waits for the network instead of spending its attempts on it.
function reconnect(s) {
  if (!s.chatId) {
    if (s.sent && !s.sent.accepted) return lostBeforeTaken(s);
    return fail(s, "the connection was lost before the answer started", true);
  }
  if (!navigator.onLine) {
    s.waitingOnline = true;
    return showStatus("Offline: the answer goes on without you and shows here when you are back.");
  }
  if (s.attempts >= MAX_RECONNECTS) return fail(s, "the connection keeps dropping", true);
  const delay = Math.random() * Math.min(30_000, 500 * 2 ** s.attempts);
  s.attempts += 1;
  showStatus("reconnecting…");
  setTimeout(() => {
    if (state.streaming === s) resume();
  }, delay);
}

function onOnline() {
  const s = state.streaming;
  if (s && s.waitingOnline) {
    s.waitingOnline = false;
    s.attempts = 0;
    showStatus("reconnecting…");
    resume();
  } else if (!$("app").hidden) {
    syncOpenChat();
  }
}

function wireStreaming() {
  window.addEventListener("online", onOnline);
}
