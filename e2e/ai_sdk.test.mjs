// The Vercel AI SDK (the `ai` npm package) against a running Mangoo, run by tests/api/ai_sdk.rs:
// `AbstractChat` — the chat logic `useChat` runs in React, Vue and Svelte — with the SDK's own
// `DefaultChatTransport`, given a plain in-memory state in place of a framework's. It sends,
// streams, regenerates, resumes after the connection is cut (a proxy that drops it) and stops.
//
// Environment: APP_URL (through the cutting proxy), TOKEN, CONTROL_URL (the test upstream's
// controls: scripts the next answer, releases gated tokens, cuts the proxy's connections).
import assert from "node:assert/strict";
import { test } from "node:test";
import { AbstractChat, DefaultChatTransport } from "ai";

const { APP_URL, TOKEN, CONTROL_URL } = process.env;
const headers = { Authorization: `Bearer ${TOKEN}` };

async function control(path, body = {}) {
  const response = await fetch(`${CONTROL_URL}/control/${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.equal(response.status, 204);
}

async function upstreamCalls() {
  return (await (await fetch(`${CONTROL_URL}/control/requests`)).json()).count;
}

async function upstreamOutcome(index) {
  return (await (await fetch(`${CONTROL_URL}/control/outcome/${index}`)).json()).outcome;
}

/** What a framework's state does for `useChat`, in memory, with a way to wait for a change. */
class MemoryState {
  constructor(messages = []) {
    this.status = "ready";
    this.error = undefined;
    this.messages = messages;
    this.waiters = [];
  }
  changed() {
    for (const waiter of this.waiters.splice(0)) waiter();
  }
  pushMessage = (message) => {
    this.messages = [...this.messages, message];
    this.changed();
  };
  popMessage = () => {
    this.messages = this.messages.slice(0, -1);
    this.changed();
  };
  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
    this.changed();
  };
  snapshot = (thing) => structuredClone(thing);
  /** Resolves once `predicate()` holds, re-checked at every change of the chat. */
  async until(predicate) {
    while (!predicate()) await new Promise((resolve) => this.waiters.push(resolve));
  }
}

class TestChat extends AbstractChat {
  constructor({ id, messages, onFinish }) {
    const state = new MemoryState(messages);
    super({
      id,
      state,
      onFinish,
      transport: new DefaultChatTransport({ api: `${APP_URL}api/v1/ai-sdk/chat`, headers }),
    });
    this.memory = state;
  }
}

const textOf = (message) =>
  message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");

async function stored(chatId) {
  const response = await fetch(`${APP_URL}api/v1/chats/${chatId}/messages`, { headers });
  assert.equal(response.status, 200);
  return (await response.json()).messages;
}

test("sending streams the answer, onFinish reports it, and the chat is stored under its id", async () => {
  const finished = [];
  const chat = new TestChat({ id: `sdk-${Date.now()}`, onFinish: (f) => finished.push(f) });
  await chat.sendMessage({ text: "Say hello" });
  assert.equal(chat.status, "ready");
  assert.equal(chat.messages.length, 2);
  assert.equal(textOf(chat.messages[1]), "Hello, world!");
  assert.equal(finished.length, 1);
  assert.equal(finished[0].finishReason, "stop");
  assert.equal(finished[0].isError, false);
  assert.equal(finished[0].isAbort, false);
  const answerId = chat.messages[1].id;

  await control("script", { tokens: ["Second", " answer"] });
  await chat.sendMessage({ text: "And again" });
  assert.equal(textOf(chat.messages[3]), "Second answer");
  let messages = await stored(chat.id);
  assert.deepEqual(
    messages.map((m) => m.content),
    ["Say hello", "Hello, world!", "And again", "Second answer"],
  );
  assert.equal(messages[1].id, answerId, "the UI message's id is the stored answer's");

  await control("script", { tokens: ["Regenerated"] });
  await chat.regenerate();
  assert.equal(chat.messages.length, 4);
  assert.equal(textOf(chat.messages[3]), "Regenerated");
  messages = await stored(chat.id);
  assert.deepEqual(
    messages.map((m) => m.content),
    ["Say hello", "Hello, world!", "And again", "Regenerated"],
  );
});

test("a cut connection is resumed by a new chat on the same id, with the answer from its start", async () => {
  const id = `sdk-cut-${Date.now()}`;
  await control("script", { tokens: ["The", " sea", " is", " wide", "."], gated: true });
  const chat = new TestChat({ id });
  const sending = chat.sendMessage({ text: "Describe the sea" });
  await control("release", { n: 2 });
  await chat.memory.until(() => chat.messages.length === 2 && textOf(chat.messages[1]) === "The sea");
  await control("cut");
  await sending;
  assert.equal(chat.status, "error", "the cut reached the SDK");

  // As after a reload: the stored conversation's question, and `resume: true`.
  const finished = [];
  const reloaded = new TestChat({ id, messages: [chat.messages[0]], onFinish: (f) => finished.push(f) });
  const resuming = reloaded.resumeStream();
  await reloaded.memory.until(() => reloaded.messages.length === 2);
  await control("release", { n: 3 });
  await resuming;
  assert.equal(reloaded.messages.length, 2);
  assert.equal(textOf(reloaded.messages[1]), "The sea is wide.", "every word once");
  assert.equal(finished[0].finishReason, "stop");

  // Nothing running: 204, and the chat stays as it is.
  const idle = new TestChat({ id, messages: reloaded.messages });
  await idle.resumeStream();
  assert.equal(idle.status, "ready");
  assert.equal(idle.messages.length, 2);
  const response = await fetch(`${APP_URL}api/v1/ai-sdk/chat/never-used-${Date.now()}/stream`, { headers });
  assert.equal(response.status, 204);
});

test("stop ends the answer on the server too: stored as stopped, the upstream cancelled", async () => {
  const id = `sdk-stop-${Date.now()}`;
  const call = await upstreamCalls();
  await control("script", { tokens: ["one", " two", " three", " four"], gated: true });
  const finished = [];
  const chat = new TestChat({ id, onFinish: (f) => finished.push(f) });
  const sending = chat.sendMessage({ text: "Count" });
  await control("release", { n: 1 });
  await chat.memory.until(() => chat.messages.length === 2 && textOf(chat.messages[1]) === "one");
  // The stop button: the SDK's stop, and Mangoo's, so the answer ends for every listener.
  await Promise.all([
    chat.stop(),
    fetch(`${APP_URL}api/v1/chats/${id}/stop`, { method: "POST", headers }),
  ]);
  await sending;
  assert.equal(finished[0].isAbort, true, "onFinish: the tab that stopped aborted");
  assert.equal(await upstreamOutcome(call), "cancelled");
  const messages = await stored(id);
  assert.equal(messages[1].status, "stopped");
  assert.equal(messages[1].content, "one");
});
