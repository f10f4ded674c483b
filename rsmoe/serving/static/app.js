// rsmoe web page: plain JS, no dependencies; talks to /v1/caption and /v1/ask on the same origin.
"use strict";

const $ = (id) => document.getElementById(id);
let currentFile = null;

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

async function post(path, form) {
  const resp = await fetch(path, { method: "POST", body: form });
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON: reported below */ }
  if (!resp.ok) {
    const msg = body && body.error ? body.error.message : `HTTP ${resp.status}`;
    throw new Error(msg);
  }
  return body;
}

function timingText(t) {
  return t ? `${Math.round(t.total_ms)} ms (batch of ${t.batch_size})` : "";
}

function renderCaption(result) {
  const tbody = $("experts").tBodies[0];
  tbody.replaceChildren();
  for (const [name, text] of Object.entries(result.experts)) {
    const tr = document.createElement("tr");
    tr.dataset.expert = name;
    const th = document.createElement("th");
    th.textContent = name;
    const td = document.createElement("td");
    const span = document.createElement("span");
    span.className = "text";
    span.textContent = text;
    td.appendChild(span);
    if (result.truncated.includes(name)) {
      const cut = document.createElement("span");
      cut.className = "cut";
      cut.title = "stopped at the token limit; its cut-off last sentence is left out of the caption";
      cut.textContent = "cut off";
      td.appendChild(cut);
    }
    tr.append(th, td);
    tbody.appendChild(tr);
  }
  const cap = $("caption");
  cap.textContent = result.caption || "(empty)";
  cap.classList.remove("muted");
  $("caption-timing").textContent = "composed from " + Object.keys(result.experts).length + " experts in " + timingText(result.timing);
}

async function caption() {
  if (!currentFile) return;
  showError("");
  const form = new FormData();
  form.append("image", currentFile);
  const instruction = $("instruction").value.trim();
  if (instruction) form.append("instruction", instruction);
  $("caption").textContent = "Captioning\u2026";
  $("caption").classList.add("muted");
  $("experts").tBodies[0].replaceChildren();
  $("caption-timing").textContent = "";
  document.body.classList.add("busy");
  try {
    renderCaption(await post("/v1/caption", form));
  } catch (err) {
    $("caption").textContent = "No caption.";
    showError(err.message);
  } finally {
    document.body.classList.remove("busy");
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!currentFile) return showError("pick an image first");
  if (!question) return showError("type a question first");
  showError("");
  const form = new FormData();
  form.append("image", currentFile);
  form.append("question", question);
  if ($("qtype").value) form.append("type", $("qtype").value);
  $("ask").disabled = true;
  try {
    const r = await post("/v1/ask", form);
    $("answer").textContent = r.answer || "(empty)";
    $("answer-expert").textContent = r.expert;
    $("answer-timing").textContent = timingText(r.timing);
    $("answer-box").hidden = false;
  } catch (err) {
    showError(err.message);
  } finally {
    $("ask").disabled = false;
  }
}

function useFile(file) {
  if (!file) return;
  currentFile = file;
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  img.hidden = false;
  $("drop-hint").hidden = true;
  for (const id of ["recaption", "question", "qtype", "ask"]) $(id).disabled = false;
  $("answer-box").hidden = true;
  caption();
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("caption-form").addEventListener("submit", (e) => { e.preventDefault(); caption(); });
  $("ask-form").addEventListener("submit", ask);
  fetch("/health").then((r) => r.json()).then((h) => {
    $("model-info").textContent = `stage ${h.stage} model, experts: ${h.experts.join(", ")} (on ${h.device})`;
  }).catch(() => { $("model-info").textContent = "server not reachable"; });
}

setUp();
