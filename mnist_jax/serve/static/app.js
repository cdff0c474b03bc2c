// serve's page: each drawing is sent as PNG to /api/predict, and the server classifies it.
"use strict";
window.startDrawingPage(async (canvas) => {
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  let response;
  try {
    response = await fetch("/api/predict", { method: "POST", headers: { "Content-Type": "image/png" }, body: blob });
  } catch (error) {
    throw new Error("cannot reach the server");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `error ${response.status}`);
  return body;
});
