// The web chat: keeps the conversation in memory, sends it to /v1/chat/completions with
// "stream": true and appends the server-sent deltas to the reply as they arrive.
// Text is only ever set through textContent (never parsed as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), form = $("form");
const sendButton = $("send"), stopButton = $("stop");
let messages = [];      // [{role, content}] sent with every request
let modelId = null;
let controller = null;  // AbortController of the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function showError(text) {
  const div = bubble("error", text);
  div.classList.remove("msg");
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) throw new Error(await errorText(r));
    const body = await r.json();
    modelId = body.data[0].id;
    $("model").textContent = modelId + " · " + body.data[0].context_length + " tokens";
  } catch (e) {
    $("model").textContent = "not connected: " + e.message;
  }
}

// Parse a server-sent-events body: frames are separated by a blank line, payload lines start with "data:".
async function* sseFrames(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody() {
  const body = { model: modelId, messages: messages, stream: true, temperature: Number($("temperature").value) };
  const maxTokens = $("max-tokens").value.trim();  // empty: the server's default, clipped to the context
  if (maxTokens) body.max_tokens = Number(maxTokens);
  return body;
}

async function send(text) {
  if (!modelId) await loadModel();
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.dataset.state = "streaming";
  sendButton.disabled = true;
  stopButton.disabled = false;
  controller = new AbortController();
  let content = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify(requestBody()),
    });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const data of sseFrames(r)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices && event.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        content += choice.delta.content;
        reply.textContent = content;
        log.scrollTop = log.scrollHeight;
      }
      if (choice && choice.finish_reason) reply.dataset.finish = choice.finish_reason;
    }
    messages.push({ role: "assistant", content: content });
  } catch (e) {
    if (e.name === "AbortError") {
      messages.push({ role: "assistant", content: content });
    } else {
      messages.pop();  // the turn failed: forget the question too
      showError(e.message);
    }
  } finally {
    reply.dataset.state = "done";
    if (!content) reply.textContent = "(empty reply)";
    controller = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
    input.focus();
  }
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    form.requestSubmit();
  }
});

stopButton.addEventListener("click", () => controller && controller.abort());

$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  log.replaceChildren();
  bubble("hint", "Conversation cleared.").classList.remove("msg");
});

$("api-key").addEventListener("change", loadModel);

loadModel();
