// The chat list: a page at a time as it scrolls, grouped by day, searchable over titles and
// messages (the server's full-text search), renamed from the header, deleted with an Undo.
"use strict";

const CHAT_PAGE = 30;
const SEARCH_DELAY_MS = 250;
const UNDO_MS = 6000;

const chatList = {
  next: null, // `next_cursor` of the last page loaded
  loading: false,
  search: { query: "", next: null, loading: false, generation: 0, timer: 0 },
  pendingDeletes: new Map(), // chat id → {timer, chat}
  observer: null, // watches the "more" row at the end of the list
};

/** Asks the observer again whether the "more" row shows: a short page leaves it in view. */
function recheckMore() {
  const more = $("chat-list-more");
  chatList.observer?.unobserve(more);
  if (!more.hidden) chatList.observer?.observe(more);
}

// ---- Pages and groups -----------------------------------------------------------------------

/** The first page again (after a turn, a rename…); pages loaded further down are kept. */
async function loadChats() {
  const page = await api("GET", `api/v1/chats?limit=${CHAT_PAGE}`);
  const first = visibleChats(page.chats);
  if (!state.chats.length || !first.length) {
    state.chats = first;
    chatList.next = page.next_cursor;
  } else {
    // Chats beyond the first page stay where they were, without the ones that moved up.
    const ids = new Set(first.map((c) => c.chat_id));
    const oldest = Date.parse(first[first.length - 1].updated_at);
    const rest = state.chats.filter((c) => !ids.has(c.chat_id) && Date.parse(c.updated_at) <= oldest);
    state.chats = [...first, ...rest];
    if (!page.next_cursor) chatList.next = null;
    else if (!rest.length) chatList.next = page.next_cursor;
  }
  renderChatList();
  showTitle();
}

async function loadMoreChats() {
  if (chatList.loading || !chatList.next) return;
  chatList.loading = true;
  try {
    const page = await api("GET", `api/v1/chats?limit=${CHAT_PAGE}&cursor=${encodeURIComponent(chatList.next)}`);
    const known = new Set(state.chats.map((c) => c.chat_id));
    state.chats.push(...visibleChats(page.chats).filter((c) => !known.has(c.chat_id)));
    chatList.next = page.next_cursor;
    renderChatList();
  } catch (e) {
    handleError(e);
  } finally {
    chatList.loading = false;
  }
}

/** Chats about to be deleted (their Undo still showing) are not listed. */
function visibleChats(chats) {
  return chats.filter((c) => !chatList.pendingDeletes.has(c.chat_id));
}

/** Calendar days between `iso` and today, in local time (0: today). */
function daysAgo(iso) {
  return Math.round((new Date().setHours(0, 0, 0, 0) - new Date(iso).setHours(0, 0, 0, 0)) / 86_400_000);
}

/** Today, Yesterday, Previous 7 days, Previous 30 days, then by month. */
function dayGroup(iso) {
  const then = new Date(iso);
  const days = daysAgo(iso);
  if (days <= 0) return "Today";
  if (days === 1) return "Yesterday";
  if (days <= 7) return "Previous 7 days";
  if (days <= 30) return "Previous 30 days";
  return then.toLocaleDateString([], { month: "long", year: "numeric" });
}

function relativeDay(iso) {
  const then = new Date(iso);
  const days = daysAgo(iso);
  const time = then.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (days <= 0) return `Today ${time}`;
  if (days === 1) return `Yesterday ${time}`;
  return then.toLocaleDateString([], { month: "short", day: "numeric", year: days > 300 ? "numeric" : undefined });
}

function renderChatList() {
  const items = [];
  let group = null;
  for (const chat of state.chats) {
    const label = dayGroup(chat.updated_at);
    if (label !== group) {
      group = label;
      const heading = document.createElement("li");
      heading.className = "group";
      heading.setAttribute("role", "presentation");
      heading.textContent = label;
      items.push(heading);
    }
    items.push(chatItem(chat));
  }
  $("chat-list").replaceChildren(...items);
  $("chat-list-more").hidden = !chatList.next || chatList.search.query !== "";
  recheckMore();
}

function chatItem(chat, snippet = null) {
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
  open.append(title);
  if (snippet) open.append(snippet);
  open.append(when);
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

function markCurrentChat() {
  for (const list of [$("chat-list"), $("search-results")]) {
    for (const item of list.children) {
      item.classList.toggle("current", item.dataset.chatId === state.chatId);
    }
  }
}

function showTitle() {
  const chat = state.chats.find((c) => c.chat_id === state.chatId);
  $("chat-title").textContent = chat ? chat.title : "New chat";
  $("rename").hidden = !chat;
  document.title = chat ? `${chat.title} · Mangoo` : "Mangoo";
}

// ---- Search ---------------------------------------------------------------------------------

function onSearchInput() {
  clearTimeout(chatList.search.timer);
  const query = $("chat-search").value.trim();
  chatList.search.timer = setTimeout(() => runSearch(query), query ? SEARCH_DELAY_MS : 0);
}

async function runSearch(query) {
  const search = chatList.search;
  search.query = query;
  search.next = null;
  const generation = ++search.generation;
  const searching = query !== "";
  $("chat-list").hidden = searching;
  $("search-results").hidden = !searching;
  $("search-empty").hidden = true;
  $("chat-list-more").hidden = searching || !chatList.next;
  if (!searching) {
    $("search-results").replaceChildren();
    return recheckMore();
  }
  await searchPage(generation, true);
}

async function searchPage(generation, first) {
  const search = chatList.search;
  const cursor = first ? "" : `&cursor=${encodeURIComponent(search.next)}`;
  search.loading = true;
  try {
    const page = await api("GET", `api/v1/chats/search?q=${encodeURIComponent(search.query)}&limit=${CHAT_PAGE}${cursor}`);
    if (generation !== search.generation) return; // typed on meanwhile
    const items = visibleChats(page.results.map((r) => ({ ...r.chat, snippet: r.snippet })))
      .map((chat) => chatItem(chat, highlighted(chat.snippet, page.terms)));
    if (first) $("search-results").replaceChildren(...items);
    else $("search-results").append(...items);
    search.next = page.next_cursor;
    $("search-empty").hidden = $("search-results").children.length > 0;
    $("chat-list-more").hidden = !search.next;
    recheckMore();
  } catch (e) {
    if (generation === search.generation) handleError(e);
  } finally {
    search.loading = false;
  }
}

/** The snippet with every word that starts with a search term marked, built as text nodes. */
function highlighted(snippet, terms) {
  const line = document.createElement("span");
  line.className = "snippet";
  const pattern = new RegExp(`(?<![\\p{L}\\p{N}])(${terms.map(escapeRegExp).join("|")})`, "giu");
  let at = 0;
  for (const match of snippet.matchAll(pattern)) {
    line.append(snippet.slice(at, match.index));
    const mark = document.createElement("mark");
    mark.textContent = match[0];
    line.append(mark);
    at = match.index + match[0].length;
  }
  line.append(snippet.slice(at));
  return line;
}

function escapeRegExp(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

function clearSearch() {
  $("chat-search").value = "";
  runSearch("");
}

/** Near the end of the list (or of the results): the next page. */
function loadMoreOnScroll() {
  const search = chatList.search;
  if (search.query) {
    if (!search.loading && search.next) searchPage(search.generation, false);
  } else {
    loadMoreChats();
  }
}

// ---- Delete, with Undo ----------------------------------------------------------------------

function confirmDelete(chat) {
  const dialog = $("confirm-delete");
  $("confirm-delete-text").textContent = `Delete “${chat.title}”? You can undo it for a few seconds.`;
  dialog.dataset.chatId = chat.chat_id;
  dialog.showModal();
  $("cancel-delete").focus();
}

/** Gone from the page at once, from the server when the Undo has passed (or the page closes). */
function deleteChat(chatId) {
  const chat = state.chats.find((c) => c.chat_id === chatId) || { chat_id: chatId, title: "" };
  const wasOpen = chatId === state.chatId;
  chatList.pendingDeletes.set(chatId, {
    chat,
    wasOpen,
    timer: setTimeout(() => commitDelete(chatId), UNDO_MS),
  });
  document.body.dataset.pendingDeletes = String(chatList.pendingDeletes.size);
  if (wasOpen) newChat();
  state.chats = state.chats.filter((c) => c.chat_id !== chatId);
  renderChatList();
  $("search-results").querySelector(`li[data-chat-id="${CSS.escape(chatId)}"]`)?.remove();
  toast("Chat deleted", { action: { label: "Undo", run: () => undoDelete(chatId) }, ms: UNDO_MS });
}

async function undoDelete(chatId) {
  const pending = chatList.pendingDeletes.get(chatId);
  if (!pending) return;
  clearTimeout(pending.timer);
  forgetPendingDelete(chatId);
  await loadChats().catch(handleError);
  if (chatList.search.query) runSearch(chatList.search.query);
  if (pending.wasOpen) await openChat(chatId, pending.chat.bot_id).catch(handleError);
  toast("Chat restored");
}

async function commitDelete(chatId, { keepalive = false } = {}) {
  if (!chatList.pendingDeletes.has(chatId)) return;
  forgetPendingDelete(chatId);
  localStorage.removeItem(draftKey(chatId));
  try {
    await api("DELETE", chatPath(chatId), null, { keepalive });
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) {
      handleError(e);
      loadChats().catch(() => {});
    }
  }
}

function forgetPendingDelete(chatId) {
  chatList.pendingDeletes.delete(chatId);
  document.body.dataset.pendingDeletes = String(chatList.pendingDeletes.size);
}

/** Leaving the page ends the Undo: the deletes it held are sent as it goes. */
function flushDeletes() {
  for (const [chatId, pending] of [...chatList.pendingDeletes]) {
    clearTimeout(pending.timer);
    commitDelete(chatId, { keepalive: true });
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
    await api("PATCH", chatPath(state.chatId), { title });
    await loadChats();
  } catch (e) {
    handleError(e);
  }
  endRename();
  $("rename").focus();
}

// ---- Wiring ---------------------------------------------------------------------------------

function wireChatList() {
  $("chat-search").addEventListener("input", onSearchInput);
  $("chat-search").addEventListener("keydown", (e) => {
    if (e.key === "Escape" && $("chat-search").value) {
      e.stopPropagation();
      clearSearch();
    } else if (e.key === "Enter") {
      $("search-results").querySelector("button.open")?.click();
    }
  });
  // The "more" row at the end of the list: seen (or clicked), the next page comes.
  chatList.observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMoreOnScroll();
  }, { root: $("chat-list-nav"), rootMargin: "200px" });
  chatList.observer.observe($("chat-list-more"));
  $("chat-list-more").addEventListener("click", loadMoreOnScroll);
  $("cancel-delete").addEventListener("click", () => $("confirm-delete").close());
  $("confirm-delete-button").addEventListener("click", () => {
    const dialog = $("confirm-delete");
    dialog.close();
    deleteChat(dialog.dataset.chatId);
  });
  window.addEventListener("pagehide", flushDeletes);
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
}
