"""The web page ``GET /`` answers: one self-contained HTML file (inline CSS and script, no fonts, images or
scripts from anywhere but this server). It reads ``/health`` to offer a class picker or a prompt box,
then asks ``/v1/generate`` for each image separately (seed + k), so the grid fills as images arrive
and the server's batcher gathers them into one forward pass. With "as you type" on, changing a
control regenerates after a short pause."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>selfflow serve</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d2330; background: #f6f7f9; }
  [hidden] { display: none !important; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
  #model { color: #556; font-size: .9rem; margin-bottom: 1rem; }
  form { display: flex; flex-wrap: wrap; gap: .8rem 1.2rem; align-items: end; background: #fff; padding: 1rem;
         border-radius: 8px; box-shadow: 0 1px 3px #0002; }
  label { display: flex; flex-direction: column; font-size: .8rem; color: #445; gap: .2rem; }
  input, select { font-size: 1rem; padding: .3rem .4rem; border: 1px solid #bbc; border-radius: 4px; }
  input[type=number] { width: 6rem; }
  #prompt { width: 18rem; }
  button { font-size: 1rem; padding: .45rem 1.2rem; border: 0; border-radius: 4px; background: #2f5fd0; color: #fff; cursor: pointer; }
  #grid { display: grid; grid-template-columns: repeat(auto-fill, 148px); gap: 8px; margin-top: 1rem; }
  .cell { width: 148px; height: 136px; background: #fff; border-radius: 6px; box-shadow: 0 1px 2px #0002; text-align: center;
          font-size: .7rem; color: #667; }
  .cell img { width: 104px; height: 104px; margin: 6px 0 2px; image-rendering: pixelated; background: #000; }
  .cell.wait img { visibility: hidden; }
  #status { margin-top: .8rem; font-size: .9rem; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>selfflow serve</h1>
<div id="model">loading the model description…</div>
<form id="controls" onsubmit="return false">
  <label id="class-box" hidden>class <select id="label"></select></label>
  <label id="prompt-box" hidden>prompt <input id="prompt" type="text" placeholder="a thick seven"></label>
  <label>images <input id="n" type="number" min="1" value="8"></label>
  <label>seed <input id="seed" type="number" min="0" value="0"></label>
  <label>steps <input id="steps" type="number" min="1"></label>
  <label id="cfg-box">guidance <input id="cfg" type="number" min="0" step="0.5"></label>
  <label>as you type <input id="live" type="checkbox"></label>
  <button id="generate" type="button">Generate</button>
</form>
<div id="status"></div>
<div id="grid"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let model = null, limits = null, round = 0, timer = null;

async function describe() {
  const answer = await fetch("/health");
  const health = await answer.json();
  model = health.model; limits = health.limits;
  $("model").textContent = `${model.kind} model, ${model.image_size}×${model.image_size}, ` +
    `${model.sampler} ${model.steps} step(s)` + (model.classes ? `, ${model.classes} classes` : "") + ` — ${model.checkpoint}`;
  $("steps").value = model.steps; $("steps").max = limits.max_steps;
  $("cfg").value = model.cfg_scale; $("cfg").max = limits.max_cfg_scale;
  $("n").max = 64;
  if (model.classes) {
    $("class-box").hidden = false;
    $("label").add(new Option("any (seed mod classes)", ""));
    for (let k = 0; k < model.classes; k++) $("label").add(new Option(String(k), String(k)));
  }
  if (model.prompts) { $("prompt-box").hidden = false; $("prompt").maxLength = limits.max_prompt_chars; }
  if (model.kind === "unconditional") $("cfg-box").hidden = true;
}

function request(seed) {
  const body = { n: 1, seed: seed, steps: Number($("steps").value) || null };
  if (model.kind !== "unconditional") body.cfg_scale = Number($("cfg").value);
  if (model.classes && $("label").value !== "") body.labels = [Number($("label").value)];
  if (model.prompts) body.prompt = $("prompt").value;
  return body;
}

async function generate() {
  const mine = ++round, n = Math.max(1, Math.min(64, Number($("n").value) || 1)), first = Number($("seed").value) || 0;
  const grid = $("grid"), started = performance.now();
  grid.replaceChildren();
  $("status").className = ""; $("status").textContent = `generating ${n} image(s)…`;
  let done = 0, failed = 0;
  const jobs = [];
  for (let k = 0; k < n; k++) {
    const cell = document.createElement("div"); cell.className = "cell wait";
    const img = document.createElement("img"); img.alt = `seed ${first + k}`;
    const caption = document.createElement("div"); caption.textContent = `seed ${first + k}`;
    cell.append(img, caption); grid.append(cell);
    jobs.push(fetch("/v1/generate", { method: "POST", headers: { "Content-Type": "application/json" },
                                      body: JSON.stringify(request(first + k)) })
      .then(async (answer) => {
        const reply = await answer.json();
        if (mine !== round) return;
        if (!answer.ok) throw new Error(reply.error || answer.statusText);
        img.src = "data:image/png;base64," + reply.images[0];
        cell.className = "cell";
        caption.textContent = `seed ${first + k}` + (reply.labels ? `, class ${reply.labels[0]}` : "") + ` · ${reply.ms.toFixed(0)} ms`;
        done++;
      })
      .catch((error) => { failed++; caption.textContent = "failed"; $("status").className = "error";
                          $("status").textContent = String(error.message || error); }));
  }
  await Promise.all(jobs);
  if (mine !== round || failed) return;
  const ms = performance.now() - started;
  $("status").textContent = `${done} image(s) in ${ms.toFixed(0)} ms (${(1000 * done / ms).toFixed(1)} images/s)`;
  $("status").dataset.done = String(done);
}

function changed() {
  if (!$("live").checked) return;
  clearTimeout(timer); timer = setTimeout(generate, 250);
}

$("generate").addEventListener("click", generate);
for (const id of ["label", "prompt", "n", "seed", "steps", "cfg"]) $(id).addEventListener("input", changed);
describe().catch((error) => { $("model").className = "error"; $("model").textContent = "cannot reach the server: " + error; });
</script>
</body>
</html>
"""
