// The exported web app: each drawing is preprocessed like MNIST (preprocess.js) and classified by model.onnx in
// this browser with ONNX Runtime Web (WebAssembly, one thread: more need cross-origin isolation, which plain
// static hosting does not give). Nothing is sent anywhere.
"use strict";
(() => {
  document.body.dataset.model = "loading"; // "ready" or "failed" once the session is created
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.wasmPaths = new URL("./", document.baseURI).href; // the .wasm beside this page, never a CDN
  window.mnistTimings = []; // milliseconds per session.run, read by the latency benchmark

  const session = ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  window.mnistModel = session; // the app's session, for the latency benchmark
  const page = window.startDrawingPage(async (canvas) => {
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    const digit = window.mnistPreprocess.fromRgba(pixels.data, pixels.width, pixels.height);
    if (digit === null) return { prediction: null, probabilities: null };
    const model = await session;
    const input = new ort.Tensor("uint8", digit, [1, 28, 28, 1]);
    const started = performance.now();
    const output = await model.run({ images: input });
    window.mnistTimings.push(performance.now() - started);
    const probabilities = Array.from(output.probabilities.data);
    return { prediction: probabilities.indexOf(Math.max(...probabilities)), probabilities };
  });

  session.then(() => { document.body.dataset.model = "ready"; },
               (error) => { document.body.dataset.model = "failed"; page.status(`cannot load the model: ${error.message}`); });

  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("sw.js").catch((error) => page.status(`offline copy unavailable: ${error.message}`));
  }
})();
