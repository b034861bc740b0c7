// The arena page: one prompt, two anonymous models streaming side by side, one vote, then the names.
// The server draws the pair and keeps the names until the vote (web.py); this page only ever sees "model_a"
// and "model_b".

import { make, renderText, requestJson, statsLine, statsOf, streamChat, watchHealth } from "./common.js";

const $ = (id) => document.getElementById(id);
const CLIENT_STORAGE = "lmforge.arenaClient";
const DEFAULT_MAX_TOKENS = 256;
const VOTE_NAMES = { model_a: "A is better", model_b: "B is better", tie: "Tie", "tie (bothbad)": "Both are bad" };

let battleId = null;

function clientId() {
  let id = localStorage.getItem(CLIENT_STORAGE);
  if (!id) {
    // randomUUID exists only in secure contexts (https, localhost); a server reached over plain http lacks it
    id = crypto.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    localStorage.setItem(CLIENT_STORAGE, id);
  }
  return id;
}

function params() {
  const fields = { max_tokens: DEFAULT_MAX_TOKENS };
  for (const [id, name] of [["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"]]) {
    const text = $(id).value.trim();
    if (text !== "") fields[name] = Number(text);
  }
  return fields;
}

function setVoting(enabled) {
  for (const button of $("votes").querySelectorAll("button")) button.disabled = !enabled;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function resetPanes() {
  for (const side of ["a", "b"]) {
    const pane = $(`pane-${side}`);
    pane.dataset.state = "idle";
    pane.classList.remove("winner");
    pane.querySelector(".model-name").textContent = `Model ${side.toUpperCase()}`;
    pane.querySelector(".content").replaceChildren();
    pane.querySelector(".stats").textContent = "";
  }
}

async function streamSide(side) {
  const pane = $(`pane-${side}`);
  const content = pane.querySelector(".content");
  pane.dataset.state = "streaming";
  const reply = await streamChat(`/api/arena/battles/${battleId}/reply/${side}`, {}, {
    onText: (text) => renderText(content, text),
  });
  renderText(content, reply.text);
  pane.querySelector(".stats").textContent = statsLine(statsOf(reply));
  pane.dataset.state = "done";
}

async function startBattle(prompt) {
  if (!prompt.trim() || battleId) return;
  showError("");
  resetPanes();
  $("prompt").disabled = true;
  $("send").disabled = true;
  $("result").textContent = "";
  try {
    ({ battle_id: battleId } = await requestJson("/api/arena/battles", {
      method: "POST", body: { prompt, params: params(), client_id: clientId() },
    }));
    await Promise.all([streamSide("a"), streamSide("b")]); // both at once, as the server batches them together
    setVoting(true);
    $("result").textContent = "Which answer is better?";
  } catch (error) {
    showError(error.message);
    $("new-round").hidden = false;
  }
}

async function vote(winner) {
  setVoting(false);
  try {
    const battle = await requestJson(`/api/arena/battles/${battleId}/vote`, { method: "POST", body: { winner } });
    for (const side of ["a", "b"]) {
      const pane = $(`pane-${side}`);
      pane.querySelector(".model-name").textContent = `Model ${side.toUpperCase()}: ${battle[`model_${side}`]}`;
      pane.classList.toggle("winner", winner === `model_${side}`);
    }
    $("result").replaceChildren(make("span", "", `You voted: ${VOTE_NAMES[winner]}. Thank you! `));
    const link = make("a", "", "See the leaderboard");
    link.href = "/leaderboard";
    $("result").append(link);
    document.body.dataset.voted = "true";
  } catch (error) {
    showError(error.message);
  }
  $("new-round").hidden = false;
}

function newRound() {
  battleId = null;
  delete document.body.dataset.voted;
  resetPanes();
  setVoting(false);
  showError("");
  $("result").textContent = "";
  $("new-round").hidden = true;
  $("prompt").disabled = false;
  $("send").disabled = false;
  $("prompt").value = "";
  $("prompt").focus();
}

function start() {
  watchHealth($("health"));
  for (const button of $("votes").querySelectorAll("button")) {
    button.addEventListener("click", () => vote(button.dataset.winner));
  }
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    startBattle($("prompt").value);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      startBattle($("prompt").value);
    }
  });
  $("new-round").addEventListener("click", newRound);
  document.body.dataset.ready = "true";
}

start();
