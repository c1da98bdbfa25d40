// Shared by every console page: the API key, authorised fetches, and two DOM helpers.
// The key is typed into the page and kept in sessionStorage: it lives as long as the tab, is sent only as the
// Authorization header the API itself asks for, and never sits in a cookie that other sites' requests would carry.
"use strict";

const KEY_NAME = "slm_fusion_api_key";
const authRequired = document.body.dataset.auth === "required";

function apiKey() { return sessionStorage.getItem(KEY_NAME) || ""; }

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  return headers;
}

function haveAccess() { return !authRequired || apiKey() !== ""; }

// JSON from an authorised endpoint; an OpenAI-shaped error becomes an Error with its message.
async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options || {}, {headers: authHeaders((options || {}).headers)}));
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.status + " " + response.statusText;
    throw new Error(message);
  }
  return body;
}

function status(message, isError) {
  const box = document.getElementById("status");
  box.textContent = message || "";
  box.className = isError ? "error" : "";
}

// el("td", {class: "x"}, "text", child): text always goes in as text, never as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (digits !== undefined) return value.toFixed(digits);
  return Number.isInteger(value) ? String(value) : value.toFixed(3);
}

const NOT_PRESENT = () => el("p", {class: "absent"}, "not present");

// Runs `load` now (when the page has access) and every `seconds`; the page's own refresh without a reload.
function every(seconds, load) {
  const run = async () => {
    if (!haveAccess()) { status("Enter the API key (top right) to see this gateway's data."); return; }
    try { await load(); } catch (e) { status(e.message, true); }
  };
  run();
  return setInterval(run, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("key-form");
  const state = document.getElementById("key-state");
  const show = () => { state.textContent = apiKey() ? "key set" : (authRequired ? "key needed" : "no key needed"); };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("key-input");
    sessionStorage.setItem(KEY_NAME, input.value.trim());
    input.value = "";
    show();
    window.location.reload();
  });
  show();
});
