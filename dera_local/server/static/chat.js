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
  settings: $("settings"), exact: $("exact-toggle"),
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

// The slider spans the lams this server accepts (serve --lam-range); the page keeps its
// own range when /v1/models cannot be read (an API key not entered yet).
fetch("/v1/models").then((r) => (r.ok ? r.json() : null)).then((models) => {
  const range = models?.dera_lam_range;
  if (!range) return;
  [ui.lam.min, ui.lam.max] = range.map(String);
  ui.lam.dispatchEvent(new Event("input"));
  // Compare by default at the lowest, middle and highest of the lams the server offers
  // (its presets follow the pair's useful range), never outside them.
  const offered = [...new Set((models.data || []).map((m) => m.dera_lambda))].sort((a, b) => a - b);
  if (offered.length >= 2) {
    const picks = [offered[0], offered[Math.floor((offered.length - 1) / 2)], offered[offered.length - 1]];
    ui.compareLams.value = [...new Set(picks)].join(", ");
  }
}).catch(() => {});

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
    stream_options: { include_usage: true }, // the last chunk: usage and `dera`
    dera_lambda: lam,
    temperature: Number(ui.temperature.value),
    max_tokens: Number(ui.maxTokens.value),
  };
  // Classifier-free guidance: the server renders the negative prompt as the system
  // message of a second sequence of the same conversation.
  // Exact realignment: the server draws from the retrained target itself (dera_exact).
  if (ui.exact.checked) body.dera_exact = true;
  const negative = ui.negative.value.trim();
  if (negative) {
    body.dera_negative_prompt = negative;
    body.dera_cfg_scale = Number(ui.cfgScale.value);
  }
  return body;
}

// Under an answer: what it cost and how far it sits from the reference.
function showStats(node, stats) {
  if (!stats.dera || !stats.usage) return;
  const kl = stats.dera.kl_to_reference;
  const tokens = stats.usage.completion_tokens;
  const perSecond = stats.seconds > 0 ? tokens / stats.seconds : 0;
  const line = document.createElement("span");
  line.className = "stats";
  line.dataset.kl = String(kl);
  line.dataset.tokens = String(tokens);
  line.textContent = `${tokens} tokens · ${perSecond.toFixed(1)} tokens/s · ` +
    `KL to the reference ${kl.toFixed(3)} nats`;
  line.title = "KL(π_λ ‖ π_ref) of this answer: log π_λ(answer) − log π_ref(answer)";
  const exact = stats.dera.exact;
  if (exact) {
    line.dataset.attempts = String(exact.attempts);
    line.textContent += ` · exact: ${exact.attempts} attempts (${exact.killed} killed)`;
  }
  node.append(line);
}

// Streams one completion into `target` (a .text span); returns the whole answer and its
// stats (usage, the `dera` object, seconds from the first token to the last).
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
  let buffer = "", answer = "", first = null;
  const stats = { dera: null, usage: null, seconds: 0 };
  const finish = () => {
    stats.seconds = first === null ? 0 : (performance.now() - first) / 1000;
    return { answer, stats };
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.replace(/^data: ?/, "");
      if (data === "[DONE]") return finish();
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.dera) stats.dera = chunk.dera;
      if (chunk.usage) stats.usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content || "";
      if (delta && first === null) first = performance.now();
      answer += delta;
      target.textContent = answer;
      ui.messages.lastElementChild?.scrollIntoView({ block: "end" });
    }
  }
  return finish();
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
    const { answer, stats } = await stream(requestBody(history, lam), reply.querySelector(".text"));
    history.push({ role: "assistant", content: answer });
    showStats(reply, stats);
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
    throw new Error("compare needs 2 to 4 lam values, e.g. 0, 0.5, 1");
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
      const { stats } = await stream(requestBody(messages, lam), column.querySelector(".text"));
      showStats(column, stats);
      column.dataset.done = "true";
    } catch (error) {
      column.classList.add("error");
      column.querySelector(".text").textContent = error.message;
    }
  }));
  setStatus("");
}
