"""The Arena's two pages. Model text reaches the page only through
`textContent` (never parsed as HTML); the leaderboard is rendered on the
server with every name escaped."""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 70rem; color: #222; }
textarea { width: 100%; height: 5rem; font: inherit; }
.sides { display: flex; gap: 1rem; margin-top: 1rem; }
.side { flex: 1; border: 1px solid #bbb; border-radius: 6px; padding: 0.75rem; min-height: 8rem; }
.side h2 { margin: 0 0 0.5rem; font-size: 1.1rem; }
.answer { white-space: pre-wrap; }
.votes { margin-top: 1rem; display: flex; gap: 0.5rem; }
button { font: inherit; padding: 0.4rem 0.9rem; }
.reveal { font-weight: bold; color: #05610b; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
td, th { border: 1px solid #bbb; padding: 0.3rem 0.6rem; text-align: right; }
"""

ARENA = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jpost Arena</title>
<style>""" + _STYLE + """</style></head>
<body data-state="idle">
<h1>Arena</h1>
<p>Ask a question; two anonymous models answer. Vote for the better answer to see who they are.
<a href="/arena/leaderboard">Leaderboard</a></p>
<textarea id="prompt" placeholder="Ask anything"></textarea>
<p><button id="ask">Ask both models</button> <span id="status"></span></p>
<div class="sides">
  <div class="side"><h2>Model A <span class="reveal" id="name-a"></span></h2>
    <div class="answer" id="answer-a"></div></div>
  <div class="side"><h2>Model B <span class="reveal" id="name-b"></span></h2>
    <div class="answer" id="answer-b"></div></div>
</div>
<div class="votes">
  <button class="vote" data-vote="model_a" disabled>A is better</button>
  <button class="vote" data-vote="model_b" disabled>B is better</button>
  <button class="vote" data-vote="tie" disabled>Tie</button>
  <button class="vote" data-vote="both_bad" disabled>Both are bad</button>
</div>
<script>
"use strict";
const byId = (id) => document.getElementById(id);
function newSession() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return String(Math.random()).slice(2) + String(Date.now());
}
const session = localStorage.getItem("jpost-arena-session") || newSession();
localStorage.setItem("jpost-arena-session", session);
let battle = null;

function setState(state, message) {
  document.body.dataset.state = state;
  byId("status").textContent = message || "";
}
function setVoting(enabled) {
  for (const button of document.querySelectorAll(".vote")) button.disabled = !enabled;
}
async function postJson(url, body) {
  const response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
  return data;
}
// Reads one side's server-sent events; text is appended with textContent only.
async function streamSide(side) {
  const target = byId("answer-" + side);
  const response = await fetch(`/arena/battles/${battle}/${side}`);
  if (!response.ok) {
    const data = await response.json();
    throw new Error(data.error ? data.error.message : response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const event = JSON.parse(line.slice(6));
      if (event.error) throw new Error(event.error.message);
      if (event.text) target.textContent += event.text;
      if (event.done) return;
    }
  }
  throw new Error("the answer stream ended early");
}
async function ask() {
  const prompt = byId("prompt").value.trim();
  if (!prompt) return;
  byId("ask").disabled = true;
  setVoting(false);
  for (const side of ["a", "b"]) {
    byId("answer-" + side).textContent = "";
    byId("name-" + side).textContent = "";
  }
  setState("asking", "Both models are answering...");
  try {
    battle = (await postJson("/arena/battles", {prompt, session})).battle;
    await Promise.all([streamSide("a"), streamSide("b")]);
    setVoting(true);
    setState("answered", "Which answer is better?");
  } catch (error) {
    setState("error", "Error: " + error.message);
  }
  byId("ask").disabled = false;
}
async function vote(choice) {
  setVoting(false);
  try {
    const result = await postJson(`/arena/battles/${battle}/vote`, {vote: choice, session});
    byId("name-a").textContent = "(" + result.model_a + ")";
    byId("name-b").textContent = "(" + result.model_b + ")";
    setState("voted", "Thanks! Ask again for a new pair.");
  } catch (error) {
    setState("error", "Error: " + error.message);
  }
}
byId("ask").addEventListener("click", ask);
for (const button of document.querySelectorAll(".vote")) {
  button.addEventListener("click", () => vote(button.dataset.vote));
}
</script>
</body></html>
"""

LEADERBOARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jpost Arena leaderboard</title>
<style>""" + _STYLE + """</style></head>
<body>
<h1>Arena leaderboard</h1>
<p><a href="/arena">Back to the Arena</a>. Ratings are Bradley-Terry fits on all votes (Elo
scale); intervals are 95% bootstrap intervals; ties and both-bad votes count half a win to each
side.</p>
{{body}}
</body></html>
"""
