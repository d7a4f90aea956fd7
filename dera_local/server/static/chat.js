// dera-local's chat page: streaming chat through the server's own /v1 API, with lam on a
// slider and a compare view that asks one question at several lams at once (the server
// decodes them together in one batch). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  lam: $("lam"), lamValue: $("lam-value"), temperature: $("temperature"),
  maxTokens: $("max-tokens"), system: $("system"), apiKey: $("api-key"),
  negative: $("negative"), cfgScale: $("cfg-scale"),
  apiKeyRow: $("api-key-row"), compare: $("compare-toggle"), compareBar: $("compare-bar"),
  compareLams: $("compare-lams"), messages: $("messages"), prompt: $("prompt"),
  send: $("send"), form: $("composer"), newChat: $("new-chat"), status: $("status"),
  settings: $("settings"),
};
let history = []; // the conversation so far: {role, content}
let busy = false;

ui.lam.addEventListener("input", () => { ui.lamValue.textContent = ui.lam.value; });
ui.compare.addEventListener("change", () => { ui.compareBar.hidden = !ui.compare.checked; });
ui.newChat.addEventListener("click", () => {
  history = [];
  ui.messages.replaceChildren();
  setStatus("");
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || busy) return;
  ui.prompt.value = "";
  (ui.compare.checked ? compare(text) : chat(text)).finally(() => setBusy(false));
});

function setBusy(value) { busy = value; ui.send.disabled = value; }
function setStatus(text) { ui.status.textContent = text; }

function bubble(role, text, meta) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  if (meta) {
    const label = document.createElement("span");
    label.className = "meta";
    label.textContent = meta;
    node.append(label);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  node.append(body);
  return node;
}

function withSystem(messages) {
  const system = ui.system.value.trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

function requestBody(messages, lam) {
  const body = {
    model: "dera-local",
    messages: withSystem(messages),
    stream: true,
    dera_lambda: lam,
    temperature: Number(ui.temperature.value),
    max_tokens: Number(ui.maxTokens.value),
  };
  // Classifier-free guidance: the server renders the negative prompt as the system
  // message of a second sequence of the same conversation.
  const negative = ui.negative.value.trim();
  if (negative) {
    body.dera_negative_prompt = negative;
    body.dera_cfg_scale = Number(ui.cfgScale.value);
  }
  return body;
}

// Streams one completion into `target` (a .text span); returns the whole answer.
async function stream(body, target) {
  const headers = { "Content-Type": "application/json" };
  if (ui.apiKey.value) headers.Authorization = `Bearer ${ui.apiKey.value}`;
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers, body: JSON.stringify(body),
  });
  if (response.status === 401) {
    ui.apiKeyRow.hidden = false;
    ui.settings.open = true;
    ui.apiKey.focus();
    throw new Error("this server needs its API key: enter it under Settings and send again");
  }
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    throw new Error(error.error?.message || `the server answered ${response.status}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", answer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.replace(/^data: ?/, "");
      if (data === "[DONE]") return answer;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices?.[0]?.delta?.content || "";
      answer += delta;
      target.textContent = answer;
      ui.messages.lastElementChild?.scrollIntoView({ block: "end" });
    }
  }
  return answer;
}

async function chat(text) {
  setBusy(true);
  const lam = Number(ui.lam.value);
  history.push({ role: "user", content: text });
  ui.messages.append(bubble("user", text));
  const reply = bubble("assistant", "", `λ ${lam}`);
  reply.dataset.lam = String(lam);
  ui.messages.append(reply);
  setStatus(`generating at λ ${lam}…`);
  try {
    const answer = await stream(requestBody(history, lam), reply.querySelector(".text"));
    history.push({ role: "assistant", content: answer });
    reply.dataset.done = "true";
    setStatus("");
  } catch (error) {
    history.pop(); // the question stays on screen; send it again once fixed
    reply.classList.add("error");
    reply.querySelector(".text").textContent = error.message;
    setStatus(error.message);
  }
}

function parseLams(text) {
  const lams = text.split(/[\s,]+/).filter(Boolean).map(Number);
  if (lams.length < 2 || lams.length > 4 || lams.some((x) => !Number.isFinite(x))) {
    throw new Error("compare needs 2 to 4 lam values, e.g. 0, 1, 2");
  }
  return lams;
}

// One question at several lams side by side: the requests run concurrently, so the
// server batches them. Compare answers are not added to the chat history.
async function compare(text) {
  let lams;
  try { lams = parseLams(ui.compareLams.value); } catch (error) { setStatus(error.message); return; }
  setBusy(true);
  ui.messages.append(bubble("user", text));
  const row = document.createElement("div");
  row.className = "compare";
  row.style.gridTemplateColumns = `repeat(${lams.length}, 1fr)`;
  ui.messages.append(row);
  setStatus(`comparing λ ${lams.join(", ")}…`);
  const messages = [...history, { role: "user", content: text }];
  await Promise.all(lams.map(async (lam) => {
    const column = bubble("assistant compare-column", "", `λ ${lam}`);
    column.dataset.lam = String(lam);
    row.append(column);
    try {
      await stream(requestBody(messages, lam), column.querySelector(".text"));
      column.dataset.done = "true";
    } catch (error) {
      column.classList.add("error");
      column.querySelector(".text").textContent = error.message;
    }
  }));
  setStatus("");
}
