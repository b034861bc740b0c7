// Shared by the chat, arena and leaderboard pages: requests that carry the API key, the server-sent-events
// reader, and the one way model text enters the page (textContent, never markup).

const KEY_STORAGE = "lmforge.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// fetch with JSON in and the server's error envelope turned into an HttpError. A 401 asks for the key once
// (the server was started with --api-key) and tries again.
export async function request(path, { method = "GET", body, signal } = {}, askedForKey = false) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (apiKey()) headers["Authorization"] = `Bearer ${apiKey()}`;
  const response = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401 && !askedForKey) {
    const key = window.prompt("This server needs an API key:");
    if (key) {
      setApiKey(key.trim());
      return request(path, { method, body, signal }, true);
    }
  }
  if (!response.ok) throw new HttpError(response.status, await errorMessage(response));
  return response;
}

export async function requestJson(path, options) {
  return (await request(path, options)).json();
}

// POST `body` to an endpoint that answers in the chat-completions chunk format as server-sent events (split on
// blank lines, strip "data: ", stop at [DONE]; EventSource cannot POST). onText(textSoFar) runs for every piece.
// Aborting `signal` ends the reply early: it comes back with stopped = true and the text it had.
export async function streamChat(path, body, { signal, onText = () => {} } = {}) {
  const started = performance.now();
  const reply = { text: "", finishReason: null, usage: null, stopped: false, ttftMs: null, seconds: 0 };
  const done = () => {
    reply.seconds = (performance.now() - started) / 1000;
    return reply;
  };
  try {
    const response = await request(path, { method: "POST", body, signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done: ended } = await reader.read();
      if (ended) return done();
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice("data: ".length);
        if (data === "[DONE]") return done();
        const chunk = JSON.parse(data);
        if (chunk.error) throw new HttpError(500, chunk.error.message);
        if (chunk.usage) reply.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = choice.delta?.content || "";
          if (piece) {
            reply.ttftMs ??= performance.now() - started;
            reply.text += piece;
            onText(reply.text);
          }
          if (choice.finish_reason) reply.finishReason = choice.finish_reason;
        }
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") throw error;
    reply.stopped = true;
    reply.finishReason = "stopped";
    return done();
  }
}

// One line about a finished reply: tokens, tokens per second (end to end), time to first token, why it ended.
export function statsLine(stats) {
  const parts = [];
  if (stats.completion_tokens != null) {
    parts.push(`${stats.completion_tokens} tokens`);
    if (stats.seconds > 0) parts.push(`${(stats.completion_tokens / stats.seconds).toFixed(1)} tok/s`);
  } else {
    parts.push(`${stats.seconds.toFixed(1)} s`);
  }
  if (stats.ttft_ms != null) parts.push(`TTFT ${Math.round(stats.ttft_ms)} ms`);
  if (stats.finish_reason) parts.push(stats.finish_reason);
  return parts.join(" · ");
}

export function statsOf(reply) {
  return {
    completion_tokens: reply.usage?.completion_tokens ?? null,
    prompt_tokens: reply.usage?.prompt_tokens ?? null,
    seconds: reply.seconds,
    ttft_ms: reply.ttftMs,
    finish_reason: reply.finishReason,
  };
}

// Model text into `element` as text. Code fences (```lang ... ```) become code blocks with a copy button;
// everything else keeps its line breaks through CSS (white-space: pre-wrap). Only textContent is ever set,
// so "<script>" or "<img onerror=...>" in a reply is shown as those characters and is never parsed as markup.
export function renderText(element, text) {
  const nodes = [];
  text.split("```").forEach((part, i) => {
    if (i % 2 === 0) {
      if (part) nodes.push(make("span", "text", part));
      return;
    }
    const newline = part.indexOf("\n");
    const language = newline >= 0 ? part.slice(0, newline).trim() : "";
    const code = newline >= 0 ? part.slice(newline + 1) : part;
    const block = make("div", "code-block");
    const bar = make("div", "code-bar", language || "code");
    const copy = make("button", "copy", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => navigator.clipboard?.writeText(code));
    bar.append(copy);
    const pre = make("pre");
    pre.append(make("code", "", code));
    block.append(bar, pre);
    nodes.push(block);
  });
  element.replaceChildren(...nodes);
}

// An element with a class and text (as text).
export function make(tag, className = "", text = "") {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text) element.textContent = text;
  return element;
}

// A dot that is green while /health answers.
export function watchHealth(dot, everyMs = 10000) {
  const check = async () => {
    try {
      const health = await (await fetch("/health")).json();
      dot.className = "health ok";
      dot.title = `server ok: ${health.active} running, ${health.queued} queued`;
    } catch {
      dot.className = "health down";
      dot.title = "server not answering";
    }
  };
  check();
  setInterval(check, everyMs);
}

// Is the scrollable element scrolled to (near) its bottom? Auto-scroll follows a reply only then.
export function atBottom(element) {
  return element.scrollHeight - element.scrollTop - element.clientHeight < 40;
}
