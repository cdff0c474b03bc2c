// The drawing page, shared by `serve` (which classifies on the server) and the exported offline web app (which
// classifies in the browser): white strokes on a black canvas (MNIST style), classified while drawing by the
// page's `classify(canvas) -> Promise<{prediction, probabilities}>`. At most one classification runs at a time;
// changes made meanwhile are classified when it returns (>= DEBOUNCE_MS apart).
"use strict";
window.startDrawingPage = (classify) => {
  const DEBOUNCE_MS = 50;
  const LINE_WIDTH = 18; // in canvas pixels (280 wide): ~2 MNIST pixels for a digit drawn across the canvas
  // The classes' names where the page carries them (serve's: <meta name="class-names">), else their indices.
  const namesMeta = document.querySelector('meta[name="class-names"]');
  const names = namesMeta ? JSON.parse(namesMeta.content) : null;
  const CLASSES = names ? names.length : 10;
  const nameOf = (i) => (names ? names[i] : String(i));

  const canvas = document.getElementById("canvas");
  const ctx = canvas.getContext("2d");
  const predictionEl = document.getElementById("prediction");
  const confidenceEl = document.getElementById("confidence");
  const statusEl = document.getElementById("status");
  const barsEl = document.getElementById("bars");

  const bars = [];
  for (let i = 0; i < CLASSES; i++) {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.innerHTML = `<div class="fill"></div><div class="digit">${i}</div>`;
    bar.title = nameOf(i);
    barsEl.appendChild(bar);
    bars.push(bar);
  }

  let drawing = false, last = null, hasInk = false;
  let dirty = false, inFlight = false, timer = null, lastSent = 0, generation = 0;
  let changedAt = 0; // when the newest unsent change was made (for the latency measure)

  function reset() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "#fff";
    ctx.fillStyle = "#fff";
    ctx.lineWidth = LINE_WIDTH;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
  }

  function point(event) {
    const rect = canvas.getBoundingClientRect();
    return { x: (event.clientX - rect.left) * canvas.width / rect.width,
             y: (event.clientY - rect.top) * canvas.height / rect.height };
  }

  function dot(p) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, LINE_WIDTH / 2, 0, Math.PI * 2);
    ctx.fill();
  }

  function segment(a, b) {
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
  }

  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    drawing = true;
    last = point(event);
    dot(last);
    changed();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const e of (events.length ? events : [event])) {
      const p = point(e);
      segment(last, p);
      last = p;
    }
    changed();
  });
  const end = () => { if (drawing) { drawing = false; changed(); } };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);

  function changed() {
    hasInk = true;
    if (!dirty) changedAt = performance.now();
    dirty = true;
    schedule();
  }

  function markPending() { // read by tests: "1" while a change is not yet reflected in the prediction
    document.body.dataset.pending = (dirty && hasInk) || inFlight || timer !== null ? "1" : "0";
  }

  function schedule() {
    markPending();
    if (timer !== null || inFlight || !dirty) return;
    const wait = Math.max(0, DEBOUNCE_MS - (performance.now() - lastSent));
    timer = setTimeout(send, wait);
    markPending();
  }

  async function send() {
    timer = null;
    if (inFlight || !dirty || !hasInk) { markPending(); return; }
    dirty = false;
    inFlight = true;
    lastSent = performance.now();
    const started = changedAt, mine = generation;
    try {
      const body = await classify(canvas);
      if (mine !== generation) return; // cleared meanwhile
      show(body.prediction, body.probabilities);
      statusEl.textContent = "";
      document.body.dataset.latencyMs = (performance.now() - started).toFixed(1);
    } catch (error) {
      if (mine === generation) statusEl.textContent = error.message;
    } finally {
      inFlight = false;
      schedule();
    }
  }

  function show(prediction, probabilities) {
    const label = prediction === null ? "" : nameOf(prediction);
    predictionEl.textContent = label;
    predictionEl.classList.toggle("long", label.length > 2); // a word (Sneaker), not a digit: smaller type
    confidenceEl.textContent = prediction === null ? "" : `${(probabilities[prediction] * 100).toFixed(1)}% sure`;
    bars.forEach((bar, i) => {
      const p = probabilities ? probabilities[i] || 0 : 0;
      bar.querySelector(".fill").style.height = `${(p * 100).toFixed(1)}%`;
      bar.classList.toggle("top", i === prediction);
    });
  }

  document.getElementById("clear").addEventListener("click", () => {
    generation += 1;
    dirty = false;
    hasInk = false;
    if (timer !== null) { clearTimeout(timer); timer = null; }
    reset();
    show(null, null);
    statusEl.textContent = "";
    markPending();
  });

  reset();
  return { status: (text) => { statusEl.textContent = text; } };
};
