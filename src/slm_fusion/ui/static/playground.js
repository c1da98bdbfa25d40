// Playground: chat with any model through the gateway's own /v1/chat/completions, streamed (SSE read from fetch),
// with the reasoning layer's knobs; shows what the answer carried: reasoning vs answer tokens, the executed program,
// the votes, the sources used, and the route decision from the x-slm-fusion-* headers.
"use strict";

const conversation = [];  // the conversation sent with each turn: [{role, content}]
const $ = id => document.getElementById(id);

async function loadChoices() {
  const data = await api("/ui/api/models");
  $("model").replaceChildren(...data.models.map(m => el("option", {value: m.name},
    m.kind === "virtual" ? `${m.name} (routed)` : `${m.name} (${m.backend})`)));
  if (data.context) {
    const stores = await api("/v1/vector_stores");
    $("stores").replaceChildren(...(stores.data.length ? stores.data.map(s => el("label", {},
      el("input", {type: "checkbox", value: s.id, class: "store"}), ` ${s.name || s.id}`)) : ["no vector store yet"]));
  }
}

function requestBody() {
  const body = {model: $("model").value, messages: conversation, stream: true, stream_options: {include_usage: true},
                max_tokens: Number($("max-tokens").value) || undefined, n: Number($("n").value) || 1};
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  if (Number($("budget").value) > 0) body.reasoning_budget = Number($("budget").value);
  if ($("pal").checked) body.pal = true;
  if ($("vote").checked) body.vote = true;
  const stores = [...document.querySelectorAll("input.store:checked")].map(i => i.value);
  if (stores.length) body.context = {vector_store_ids: stores};
  return body;
}

// The SSE frames of a fetch response, parsed: yields each `data:` JSON object until [DONE].
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

function bubble(role, text) {
  const node = el("div", {class: "msg " + role}, el("span", {class: "who"}, role), el("span", {class: "text"}, text));
  $("transcript").append(node);
  return node.querySelector(".text");
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  $("prompt").value = "";
  conversation.push({role: "user", content: prompt});
  bubble("user", prompt);
  const texts = {};  // choice index -> its bubble
  const contents = {};
  const details = {};
  let usage = null;
  $("send").disabled = true;
  $("chat-state").textContent = "waiting for the first token…";
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: authHeaders({"Content-Type": "application/json"}), body: JSON.stringify(requestBody())});
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(body && body.error ? body.error.message : `${response.status} ${response.statusText}`);
    }
    const route = {model: response.headers.get("x-slm-fusion-model"), route: response.headers.get("x-slm-fusion-route")};
    for await (const chunk of sse(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.slm_fusion) details[c.index] = Object.assign(details[c.index] || {}, c.slm_fusion);
        const piece = (c.delta || {}).content;
        if (!piece) continue;
        if (!(c.index in texts)) texts[c.index] = bubble("assistant", "");
        contents[c.index] = (contents[c.index] || "") + piece;
        texts[c.index].textContent = contents[c.index];
        $("chat-state").textContent = "streaming…";
      }
    }
    conversation.push({role: "assistant", content: contents[0] || ""});
    showDetails(route, usage, details, (performance.now() - started) / 1000);
    $("chat-state").textContent = "done";
  } catch (e) {
    conversation.pop();
    bubble("error", e.message);
    $("chat-state").textContent = "failed";
  } finally {
    $("send").disabled = false;
  }
}

function showDetails(route, usage, details, seconds) {
  const rows = [["answered by", route.model || "–"], ["route", route.route || "direct (no router)"],
                ["seconds", fmt(seconds, 2)]];
  if (usage) rows.push(["tokens", `prompt ${usage.prompt_tokens}, completion ${usage.completion_tokens}`]);
  for (const [index, d] of Object.entries(details)) {
    const p = `choice ${index}: `;
    if (d.reasoning_tokens !== undefined) {
      rows.push([p + "reasoning vs answer tokens", `${d.reasoning_tokens} reasoning · ${d.answer_tokens} answer` +
                 (d.forced ? " (budget forced the answer)" : "")]);
    }
    if (d.answer !== undefined) rows.push([p + "answer", `${d.answer} (${d.status})`]);
    if (d.program) rows.push([p + "executed program", el("pre", {}, d.program)]);
    if (d.error) rows.push([p + "program error", d.error]);
    if (d.votes) rows.push([p + "votes", Object.entries(d.votes).map(([a, n]) => `${a}: ${n}`).join(", ") +
                            ` (agreement ${fmt(d.agreement, 2)} over ${d.samples} samples)`]);
    if (d.citations) rows.push([p + "sources", d.citations.map(c => `${c.filename} (${fmt(c.score, 2)})`).join(", ") || "none"]);
  }
  $("details").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

document.addEventListener("DOMContentLoaded", () => {
  $("budget").addEventListener("input", () => {
    $("budget-out").textContent = Number($("budget").value) > 0 ? $("budget").value + " tokens" : "off";
  });
  $("chat-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", e => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("clear").addEventListener("click", () => { conversation.length = 0; $("transcript").replaceChildren(); });
  if (haveAccess()) loadChoices().catch(e => status(e.message, true));
  else status("Enter the API key (top right) to chat.");
});
