// The chat page: streams replies from /v1/chat/completions and keeps each conversation in the server's store
// (PUT of the whole conversation after every change), so a reload, or another browser, finds it again.

import {
  apiKey, atBottom, make, renderText, request, requestJson, setApiKey, statsLine, statsOf, streamChat, watchHealth,
} from "./common.js";

const $ = (id) => document.getElementById(id);
const SETTINGS_STORAGE = "lmforge.chatSettings";
const MODEL_STORAGE = "lmforge.chatModel";
// settings input -> request field; an empty input sends nothing, so the server's default applies
const NUMBER_FIELDS = {
  temperature: "temperature", "top-p": "top_p", "top-k": "top_k", "min-p": "min_p", "max-tokens": "max_tokens",
  "repetition-penalty": "repetition_penalty", seed: "seed",
};

let conversation = null; // {id, title, model, settings, messages: [{role, content, model, finish_reason, stats}]}
let streaming = null; // the AbortController of the reply being streamed
let retryLast = null; // what Retry runs again after an error

// --- settings ---------------------------------------------------------------------------------------------

function readSettings() {
  const settings = {
    system_prompt: $("system-prompt").value, stop: $("stop").value, ignore_eos: $("ignore-eos").checked,
  };
  for (const id of Object.keys(NUMBER_FIELDS)) settings[id] = $(id).value;
  return settings;
}

function writeSettings(settings) {
  $("system-prompt").value = settings.system_prompt || "";
  $("stop").value = settings.stop || "";
  $("ignore-eos").checked = Boolean(settings.ignore_eos);
  for (const id of Object.keys(NUMBER_FIELDS)) $(id).value = settings[id] ?? "";
}

function samplingFields() {
  const fields = {};
  for (const [id, name] of Object.entries(NUMBER_FIELDS)) {
    const text = $(id).value.trim();
    if (text !== "") fields[name] = Number(text);
  }
  const stops = $("stop").value.split("\n").filter((s) => s);
  if (stops.length) fields.stop = stops;
  if ($("ignore-eos").checked) fields.ignore_eos = true;
  return fields;
}

// --- the conversation list ------------------------------------------------------------------------------------

async function refreshList() {
  const search = encodeURIComponent($("search").value.trim());
  const { conversations } = await requestJson(`/api/conversations?search=${search}`);
  $("conversations").replaceChildren(...conversations.map((c) => {
    const item = make("li", c.id === conversation?.id ? "current" : "", c.title);
    item.dataset.id = c.id;
    item.addEventListener("click", () => openConversation(c.id));
    return item;
  }));
  return conversations;
}

async function openConversation(id) {
  if (streaming) return;
  conversation = await requestJson(`/api/conversations/${encodeURIComponent(id)}`);
  history.replaceState(null, "", `#${id}`);
  if ([...$("model").options].some((o) => o.value === conversation.model)) $("model").value = conversation.model;
  hideError();
  renderConversation();
  await refreshList();
}

function newConversation() {
  if (streaming) return;
  conversation = null;
  history.replaceState(null, "", location.pathname);
  hideError();
  renderConversation();
  refreshList();
  $("input").focus();
}

async function ensureConversation(firstText) {
  if (conversation) return;
  const title = firstText.trim().split("\n")[0].slice(0, 60) || "New chat"; // auto-title: the first line
  conversation = await requestJson("/api/conversations", {
    method: "POST", body: { title, model: $("model").value, settings: readSettings() },
  });
  history.replaceState(null, "", `#${conversation.id}`);
}

async function saveConversation() {
  await request(`/api/conversations/${encodeURIComponent(conversation.id)}`, {
    method: "PUT",
    body: {
      title: conversation.title, model: $("model").value, settings: readSettings(), messages: conversation.messages,
    },
  });
  await refreshList();
}

// --- rendering ----------------------------------------------------------------------------------------------

function button(text, className, onClick) {
  const element = make("button", className, text);
  element.type = "button";
  element.addEventListener("click", onClick);
  return element;
}

function messageElement(message, index) {
  const element = make("div", `message ${message.role}`);
  element.dataset.index = index;
  element.dataset.state = ["stopped", "error"].includes(message.finish_reason) ? message.finish_reason : "done";
  const label = message.role === "assistant" ? message.model || "assistant" : message.role;
  const content = make("div", "content");
  renderText(content, message.content);
  element.append(make("div", "role", label), content);
  if (message.stats) element.append(make("div", "stats", statsLine(message.stats)));
  const actions = make("div", "actions");
  if (message.role === "user") actions.append(button("Edit", "edit", () => startEdit(index, element)));
  if (message.role === "assistant" && index === conversation.messages.length - 1) {
    actions.append(button("Regenerate", "regenerate", regenerate));
  }
  element.append(actions);
  return element;
}

function renderConversation() {
  $("title").textContent = conversation?.title || "New chat";
  const box = $("messages");
  box.replaceChildren(...(conversation?.messages || []).map(messageElement));
  box.scrollTop = box.scrollHeight;
}

function showError(text, retry) {
  $("error-text").textContent = text;
  $("error").hidden = false;
  retryLast = retry;
}

function hideError() {
  $("error").hidden = true;
  retryLast = null;
}

function setStreaming(controller) {
  streaming = controller;
  document.body.classList.toggle("busy", Boolean(controller));
  $("send").hidden = Boolean(controller);
  $("stop-button").hidden = !controller;
  $("input").disabled = Boolean(controller);
}

// --- sending, stopping, regenerating, editing ------------------------------------------------------------------

async function generateReply() {
  const model = $("model").value;
  const system = $("system-prompt").value.trim();
  const messages = [
    ...(system ? [{ role: "system", content: system }] : []),
    ...conversation.messages.map(({ role, content }) => ({ role, content })),
  ];
  const message = { role: "assistant", content: "", model, finish_reason: null, stats: null };
  conversation.messages.push(message);
  renderConversation();
  const box = $("messages");
  const element = box.lastElementChild;
  element.dataset.state = "streaming";
  element.classList.add("streaming");
  const content = element.querySelector(".content");
  setStreaming(new AbortController());
  let reply;
  try {
    reply = await streamChat(
      "/v1/chat/completions",
      { model, messages, stream: true, stream_options: { include_usage: true }, ...samplingFields() },
      {
        signal: streaming.signal,
        onText: (text) => {
          const follow = atBottom(box); // follow the reply only while the reader is at the bottom
          renderText(content, text);
          if (follow) box.scrollTop = box.scrollHeight;
        },
      },
    );
  } catch (error) {
    conversation.messages.pop();
    setStreaming(null);
    renderConversation();
    showError(error.message, generateReply);
    return;
  }
  setStreaming(null);
  message.content = reply.text;
  message.finish_reason = reply.finishReason;
  message.stats = statsOf(reply);
  renderConversation();
  await saveOrShow();
}

async function saveOrShow() {
  try {
    await saveConversation();
  } catch (error) {
    showError(`not saved: ${error.message}`, saveOrShow);
  }
}

async function send(text) {
  if (streaming || !text.trim()) return;
  hideError();
  try {
    await ensureConversation(text);
  } catch (error) {
    showError(error.message, () => send(text));
    return;
  }
  $("input").value = "";
  conversation.messages.push({ role: "user", content: text, model: null, finish_reason: null, stats: null });
  renderConversation();
  await saveOrShow();
  await generateReply();
}

async function regenerate() {
  if (streaming) return;
  hideError();
  conversation.messages.pop();
  await generateReply();
}

function startEdit(index, element) {
  if (streaming) return;
  const editor = make("textarea", "editor");
  editor.value = conversation.messages[index].content;
  editor.rows = 3;
  const resend = button("Send", "primary resend", async () => {
    if (!editor.value.trim()) return;
    // the conversation goes on from the edited message: everything after it is replaced
    conversation.messages = conversation.messages.slice(0, index);
    conversation.messages.push({ role: "user", content: editor.value, model: null, finish_reason: null, stats: null });
    renderConversation();
    await saveOrShow();
    await generateReply();
  });
  element.querySelector(".content").replaceWith(editor);
  element.querySelector(".actions").replaceChildren(resend, button("Cancel", "cancel", renderConversation));
  editor.focus();
}

// --- the toolbar --------------------------------------------------------------------------------------------

async function renameConversation() {
  if (!conversation || streaming) return;
  const title = window.prompt("Rename the conversation:", conversation.title);
  if (!title?.trim()) return;
  conversation.title = title.trim().slice(0, 200);
  renderConversation();
  await saveOrShow();
}

async function deleteConversation() {
  if (!conversation || streaming || !window.confirm(`Delete "${conversation.title}"?`)) return;
  await request(`/api/conversations/${encodeURIComponent(conversation.id)}`, { method: "DELETE" });
  newConversation();
}

function exportConversation() {
  if (!conversation) return;
  const { title, model, settings, messages } = conversation;
  const blob = new Blob([JSON.stringify({ title, model, settings, messages }, null, 2)], { type: "application/json" });
  const link = make("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${title.replace(/[^\w.-]+/g, "_").slice(0, 60) || "conversation"}.json`;
  link.click();
  URL.revokeObjectURL(link.href);
}

async function importConversation(file) {
  try {
    const data = JSON.parse(await file.text());
    const created = await requestJson("/api/conversations", {
      method: "POST", body: { title: String(data.title || file.name).slice(0, 200), model: data.model || "" },
    });
    await request(`/api/conversations/${created.id}`, {
      method: "PUT",
      body: {
        title: created.title, model: created.model, settings: data.settings || {}, messages: data.messages || [],
      },
    });
    await openConversation(created.id);
  } catch (error) {
    showError(`import failed: ${error.message}`, null);
  }
}

// --- start ---------------------------------------------------------------------------------------------------

async function start() {
  watchHealth($("health"));
  writeSettings(JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}"));
  $("api-key").value = apiKey();

  $("settings").addEventListener("change", () => {
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(readSettings()));
  });
  $("api-key").addEventListener("change", () => setApiKey($("api-key").value.trim()));
  $("reset-settings").addEventListener("click", () => {
    writeSettings({});
    localStorage.removeItem(SETTINGS_STORAGE);
  });
  $("settings-toggle").addEventListener("click", () => {
    $("settings").hidden = !$("settings").hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!$("settings").hidden));
  });
  $("model").addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, $("model").value));
  $("new-chat").addEventListener("click", newConversation);
  $("rename").addEventListener("click", renameConversation);
  $("delete").addEventListener("click", deleteConversation);
  $("export").addEventListener("click", exportConversation);
  $("import").addEventListener("change", (event) => event.target.files[0] && importConversation(event.target.files[0]));
  let searchTimer;
  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(refreshList, 200);
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send($("input").value);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send($("input").value);
    }
  });
  $("stop-button").addEventListener("click", () => streaming?.abort());
  $("retry").addEventListener("click", () => {
    const retry = retryLast;
    hideError();
    retry?.();
  });

  try {
    const models = await requestJson("/v1/models");
    $("model").replaceChildren(...models.data.map((m) => {
      const option = make("option", "", m.id);
      option.value = m.id;
      return option;
    }));
    const remembered = localStorage.getItem(MODEL_STORAGE);
    if (models.data.some((m) => m.id === remembered)) $("model").value = remembered;
    await refreshList();
    if (location.hash.length > 1) await openConversation(decodeURIComponent(location.hash.slice(1)));
    else renderConversation();
  } catch (error) {
    showError(error.message, () => location.reload());
  }
  document.body.dataset.ready = "true";
}

start();
