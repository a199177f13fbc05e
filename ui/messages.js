// A chat's messages: the newest page first, older pages as the reader scrolls up, long
// messages folded, the actions under them, and the chat kept equal to what is stored when the
// tab comes back into view (another tab, another device, an answer started elsewhere).
"use strict";

const MESSAGE_PAGE = 60;
const NEAR_BOTTOM_PX = 48;
/** A user message taller than this is folded behind "Show more". */
const FOLD_PX = 320;
const SYNC_RETRY_MS = 15_000;

const chatView = {
  older: null, // `prev_cursor` of the oldest page shown
  loadingOlder: false,
  syncing: false,
  retrySync: 0, // the timer of syncWhenReachable
};

// ---- Opening a chat -------------------------------------------------------------------------

async function openChat(chatId, botId) {
  closeStream();
  cancelEdit();
  state.chatId = chatId;
  rememberChat(chatId);
  if (botId) $("bot-picker").value = botId;
  const page = await api("GET", chatPath(chatId, `/messages?before=latest&limit=${MESSAGE_PAGE}`));
  if (state.chatId !== chatId) return; // another chat was opened meanwhile
  showPage(page);
  showStatus("");
  markCurrentChat();
  showTitle();
  restoreDraft();
  $("message-input").focus();
}

/** Shows a chat's newest page in place of what is there, and follows its answer if it runs. */
function showPage(page) {
  const { messages } = page;
  chatView.older = page.prev_cursor;
  $("messages").replaceChildren(...messages.map(storedMessage));
  $("older").hidden = !chatView.older;
  foldLongMessages();
  showWelcome();
  refreshActions();
  scrollToBottom();
  recheckOlder();
  const last = messages[messages.length - 1];
  if (last && last.role === "assistant" && last.status === "streaming") {
    // An answer still being generated (before a reload, or in another tab): follow it live
    // from its first event, so what is shown is exactly what is stored.
    const el = $("messages").lastElementChild;
    el.classList.add("typing");
    beginStream(state.chatId, el, 0, "");
    resume();
  }
}

function storedMessage(message) {
  const el = messageElement(message.role, message.content, message.id);
  el.dataset.status = message.status;
  if (message.versions?.length) {
    // Earlier answers first; the stored message itself is the newest version, shown first.
    el.versions = [...message.versions, { id: message.id, content: message.content, status: message.status }];
    el.dataset.version = String(el.versions.length - 1);
  }
  showEnding(el, message.status);
  return el;
}

/** The note under an answer that did not simply complete. */
function showEnding(el, status) {
  el.querySelector(".note")?.remove();
  if (el.dataset.role === "assistant" && !["complete", "streaming"].includes(status)) {
    note(el, endingNote(status), status === "error");
  }
}

/** The text of the version on screen (the answer itself when it has no other). */
function shownText(el) {
  return el.versions ? el.versions[Number(el.dataset.version)].content : el.dataset.text;
}

/** Shows version `index` of a regenerated answer: ‹ and › step through them. */
function showVersion(el, index) {
  const version = el.versions[index];
  el.dataset.version = String(index);
  Markdown.render(el.querySelector(".body"), version.content);
  showEnding(el, version.status);
  refreshActions();
  announce(`Version ${index + 1} of ${el.versions.length}`);
}

function versionPicker(el) {
  const picker = document.createElement("span");
  picker.className = "versions";
  const index = Number(el.dataset.version);
  const count = el.versions.length;
  const step = (by, label, glyph) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "icon";
    button.textContent = glyph;
    button.setAttribute("aria-label", label);
    button.title = label;
    button.disabled = index + by < 0 || index + by >= count;
    button.addEventListener("click", () => showVersion(el, index + by));
    return button;
  };
  const where = document.createElement("span");
  where.className = "version-count";
  where.textContent = `${index + 1} / ${count}`;
  picker.append(step(-1, "Previous version", "‹"), where, step(1, "Next version", "›"));
  return picker;
}

function endingNote(status) {
  return { stopped: "Stopped", interrupted: "Interrupted", error: "Failed" }[status] || status;
}

function newChat() {
  closeStream();
  cancelEdit();
  state.chatId = null;
  chatView.older = null;
  $("older").hidden = true;
  rememberChat(null);
  $("messages").replaceChildren();
  markCurrentChat();
  showWelcome();
  showStatus("");
  showTitle();
  closeDrawer();
  restoreDraft();
  $("message-input").focus();
}

// ---- Older pages ----------------------------------------------------------------------------

async function loadOlder() {
  const chatId = state.chatId;
  if (chatView.loadingOlder || !chatView.older || !chatId) return;
  chatView.loadingOlder = true;
  try {
    const page = await api("GET", chatPath(chatId, `/messages?before=${encodeURIComponent(chatView.older)}&limit=${MESSAGE_PAGE}`));
    if (state.chatId !== chatId) return;
    const scroller = $("scroller");
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    $("messages").prepend(...page.messages.map(storedMessage));
    // The reader stays on what they were reading: the new page grows above it.
    if (!state.stickToBottom) scroller.scrollTop = scroller.scrollHeight - fromBottom;
    chatView.older = page.prev_cursor;
    $("older").hidden = !chatView.older;
    foldLongMessages();
    refreshActions();
  } catch (e) {
    handleError(e);
  } finally {
    chatView.loadingOlder = false;
  }
  recheckOlder();
}

let olderObserver;
/** A page that does not fill the screen leaves the "earlier" row in view: ask again. */
function recheckOlder() {
  olderObserver?.unobserve($("older"));
  if (!$("older").hidden) olderObserver?.observe($("older"));
}

// ---- Rendering ------------------------------------------------------------------------------

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

function messageElement(role, text, id) {
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
  return el;
}

function addMessage(role, text, id) {
  const el = messageElement(role, text, id);
  $("messages").append(el);
  if (role === "user") foldLongMessages();
  showWelcome();
  followIfStuck();
  return el;
}

/** Folds user messages taller than FOLD_PX behind a "Show more" button (once each). */
function foldLongMessages() {
  for (const el of $("messages").querySelectorAll("li.user:not([data-folding])")) {
    const body = el.querySelector(".body");
    el.dataset.folding = body.scrollHeight > FOLD_PX ? "folded" : "short";
    if (el.dataset.folding === "short") continue;
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.className = "fold quiet";
    toggle.setAttribute("aria-expanded", "false");
    toggle.textContent = "Show more";
    toggle.addEventListener("click", () => {
      const folded = el.dataset.folding === "folded";
      el.dataset.folding = folded ? "open" : "folded";
      toggle.textContent = folded ? "Show less" : "Show more";
      toggle.setAttribute("aria-expanded", String(folded));
    });
    body.after(toggle);
  }
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
    if (el.versions) actions.append(versionPicker(el));
    if (el.dataset.role === "assistant" && shownText(el)) {
      actions.append(actionButton("copy", "Copy answer", () => copyText(shownText(el), "Answer copied")));
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

function showWelcome() {
  $("welcome").hidden = $("messages").children.length > 0;
}

// ---- Keeping up with what is stored ---------------------------------------------------------

/** Whether the page shows `message` as stored (a message sent from this page has no id yet). */
function showsStored(el, message) {
  const versions = el.versions ? el.versions.length - 1 : 0;
  return el.dataset.role === message.role &&
    versions === (message.versions?.length || 0) &&
    (!el.dataset.id || el.dataset.id === message.id) &&
    (el.dataset.status || "complete") === message.status &&
    el.dataset.text === message.content;
}

/**
 * Reads the open chat's newest page and, if storage holds something the page does not show
 * (a turn sent from another tab, an answer that went on while this one was offline, or one
 * started elsewhere), shows what is stored. Not while this page streams an answer itself.
 */
async function syncOpenChat() {
  const chatId = state.chatId;
  if (!chatId || state.streaming || chatView.syncing || !state.token) return true;
  chatView.syncing = true;
  try {
    const page = await api("GET", chatPath(chatId, `/messages?before=latest&limit=${MESSAGE_PAGE}`));
    if (state.chatId !== chatId || state.streaming) return true;
    const shown = [...$("messages").children].slice(-page.messages.length);
    const same = shown.length === page.messages.length &&
      shown.every((el, i) => showsStored(el, page.messages[i]));
    if (same) return true;
    const reading = !state.stickToBottom;
    const scrollTop = $("scroller").scrollTop;
    showPage(page);
    showStatus(""); // what went wrong before is what storage now shows
    if (reading) {
      $("scroller").scrollTop = scrollTop;
      onScroll();
    }
    loadChats().catch(() => {});
    return true;
  } catch (e) {
    if (e instanceof SignInError) showSignIn(e.message);
    return e instanceof SignInError;
  } finally {
    chatView.syncing = false;
  }
}

/**
 * After a stream the page gave up on: reads the stored answer now, and again every
 * SYNC_RETRY_MS until storage can be read (the network may still be away, with the browser
 * none the wiser), unless another chat is opened meanwhile.
 */
async function syncWhenReachable() {
  clearTimeout(chatView.retrySync);
  const chatId = state.chatId;
  if (!(await syncOpenChat()) && state.chatId === chatId) {
    chatView.retrySync = setTimeout(syncWhenReachable, SYNC_RETRY_MS);
  }
}

function onPageShown() {
  if (document.visibilityState !== "visible" || $("app").hidden) return;
  syncOpenChat();
  loadChats().catch(() => {});
}

// ---- Editing and regenerating ---------------------------------------------------------------

function startEdit(el) {
  state.editing = { el };
  el.classList.add("editing");
  const input = $("message-input");
  input.value = el.dataset.text;
  autosize();
  updateCounter();
  input.focus();
  showComposerHint();
}

function cancelEdit() {
  if (!state.editing) return;
  state.editing.el.classList.remove("editing");
  state.editing = null;
  restoreDraft();
  showComposerHint();
}

/**
 * Asks a question again from `userEl` on: what follows it is removed, here and on the server
 * (which keeps the answer as an earlier version when regenerating).
 */
async function resendFrom(userEl, message, { keepAnswer = false } = {}) {
  const chatId = state.chatId;
  let id = userEl.dataset.id;
  if (!id) {
    // Sent in this page: its id is only in storage.
    const { messages } = await api("GET", chatPath(chatId, "/messages?before=latest&limit=2"));
    id = messages.findLast((m) => m.role === "user")?.id;
  }
  const keep = keepAnswer ? "?keep_answer=true" : "";
  await api("DELETE", chatPath(chatId, `/messages/${encodeURIComponent(id)}${keep}`));
  while (userEl.nextElementSibling) userEl.nextElementSibling.remove();
  userEl.remove();
  send(message, { chatId, regenerating: keepAnswer });
}

function regenerate() {
  const question = [...$("messages").children].findLast((el) => el.dataset.role === "user");
  if (question) resendFrom(question, question.dataset.text, { keepAnswer: true }).catch(handleError);
}

function continueAnswer() {
  send("Continue from where you stopped.");
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

function onScroll() {
  const s = $("scroller");
  state.stickToBottom = s.scrollHeight - s.scrollTop - s.clientHeight < NEAR_BOTTOM_PX;
  if (state.stickToBottom) $("jump").hidden = true;
}

// ---- Wiring ---------------------------------------------------------------------------------

function wireMessages() {
  $("scroller").addEventListener("scroll", onScroll, { passive: true });
  followResizes();
  olderObserver = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadOlder();
  }, { root: $("scroller"), rootMargin: "400px 0px 0px 0px" });
  $("older-button").addEventListener("click", loadOlder);
  $("jump").addEventListener("click", () => {
    scrollToBottom();
    $("message-input").focus();
  });
  // Copy buttons of code blocks, wherever Markdown put them.
  $("messages").addEventListener("click", (e) => {
    const button = e.target.closest(".copy-code");
    if (button) copyText(button.closest(".code-block").querySelector("code").textContent.replace(/\n$/, ""), "Code copied");
  });
  document.addEventListener("visibilitychange", onPageShown);
  window.addEventListener("focus", onPageShown);
}
