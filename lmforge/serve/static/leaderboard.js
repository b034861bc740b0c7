// The leaderboard page: /api/leaderboard as tables (every value written as text).

import { make, requestJson, watchHealth } from "./common.js";

const $ = (id) => document.getElementById(id);

const number = (value, digits = 0) => (value == null ? "–" : value.toFixed(digits));

function row(cells, header = false) {
  const tr = make("tr");
  tr.append(...cells.map((cell) => make(header ? "th" : "td", "", String(cell))));
  return tr;
}

async function load() {
  const minBattles = Math.max(0, Number($("min-battles").value) || 0);
  let board;
  try {
    board = await requestJson(`/api/leaderboard?min_battles=${minBattles}`);
  } catch (error) {
    $("summary").textContent = `Could not load the leaderboard: ${error.message}`;
    return;
  }
  const votes = `${board.votes} vote${board.votes === 1 ? "" : "s"}, ${board.rated} rated`;
  $("summary").textContent = board.rows.length
    ? `${votes}; ${board.rated_here} shown.`
    : `${votes}: no ratings yet (they need rated battles between two different models).`;
  $("leaderboard").tBodies[0].replaceChildren(...board.rows.map((r) => {
    const tr = row([r.rank, r.model, number(r.rating), `${number(r.lower)} to ${number(r.upper)}`, number(r.elo),
      r.battles, r.wins, r.ties]);
    tr.dataset.model = r.model;
    return tr;
  }));
  const { models, fraction, battles } = board.win_fraction;
  $("win-fraction").tHead.replaceChildren(models.length ? row(["", ...models], true) : make("tr"));
  $("win-fraction").tBodies[0].replaceChildren(...models.map((model, i) => {
    const cells = models.map((_, j) => (fraction[i][j] == null
      ? "–" : `${Math.round(100 * fraction[i][j])}% of ${battles[i][j]}`));
    return row([model, ...cells]);
  }));
  document.body.dataset.ready = "true";
}

watchHealth($("health"));
$("filter").addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
load();
