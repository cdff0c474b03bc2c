// mnist_jax.images.to_mnist in JavaScript, step for step, so the browser feeds the model what `predict` and `serve`
// feed it: ink found whatever the polarity, cropped to the ink, stretched to full white, the longer side resized
// to 20 px with Pillow's Lanczos filter, pasted into 28x28 with its centre of mass at the centre.
"use strict";
window.mnistPreprocess = (() => {
  const MNIST_SIZE = 28, DIGIT_BOX_SIZE = 20, FRAME_CENTRE = (MNIST_SIZE - 1) / 2;
  const LIGHT_BACKGROUND_THRESHOLD = 127, INK_FRACTION_OF_MAX = 0.1, MIN_INK_CONTRAST = 10;

  function median(values) {
    const sorted = Float64Array.from(values).sort();
    const middle = sorted.length >> 1;
    return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
  }

  function outerFrame(gray, width, height) {
    const frame = [];
    for (let x = 0; x < width; x++) frame.push(gray[x], gray[(height - 1) * width + x]);
    for (let y = 1; y < height - 1; y++) frame.push(gray[y * width], gray[y * width + width - 1]);
    return frame;
  }

  function inkIntensity(gray, width, height) {
    let values = Float32Array.from(gray);
    if (median(outerFrame(values, width, height)) > LIGHT_BACKGROUND_THRESHOLD) values = values.map((v) => 255 - v);
    const background = median(outerFrame(values, width, height));
    return values.map((v) => Math.max(v - background, 0));
  }

  // Pillow's resampling (precompute_coeffs in Resample.c): separable, horizontal pass first, the filter widened by
  // the scale when shrinking, weights normalised per output pixel.
  function lanczos(x) {
    const sinc = (t) => (t === 0 ? 1 : Math.sin(Math.PI * t) / (Math.PI * t));
    return x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0;
  }

  function coefficients(inSize, outSize) {
    const scale = inSize / outSize, filterScale = Math.max(scale, 1), support = 3 * filterScale;
    const rows = [];
    for (let out = 0; out < outSize; out++) {
      const centre = (out + 0.5) * scale;
      const first = Math.max(Math.trunc(centre - support + 0.5), 0);
      const last = Math.min(Math.trunc(centre + support + 0.5), inSize);
      const weights = [];
      for (let x = first; x < last; x++) weights.push(lanczos((x - centre + 0.5) / filterScale));
      const total = weights.reduce((a, b) => a + b, 0);
      rows.push({ first, weights: total !== 0 ? weights.map((w) => w / total) : weights });
    }
    return rows;
  }

  function resize(patch, width, height, newWidth, newHeight) {
    const across = coefficients(width, newWidth), down = coefficients(height, newHeight);
    const wide = new Float32Array(newWidth * height);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < newWidth; x++) {
        const { first, weights } = across[x];
        let sum = 0;
        for (let k = 0; k < weights.length; k++) sum += patch[y * width + first + k] * weights[k];
        wide[y * newWidth + x] = sum;
      }
    }
    const out = new Float32Array(newWidth * newHeight);
    for (let y = 0; y < newHeight; y++) {
      const { first, weights } = down[y];
      for (let x = 0; x < newWidth; x++) {
        let sum = 0;
        for (let k = 0; k < weights.length; k++) sum += wide[(first + k) * newWidth + x] * weights[k];
        out[y * newWidth + x] = Math.min(Math.max(sum, 0), 255);
      }
    }
    return out;
  }

  // Python's round(): halves to even, as numpy's rint does.
  function roundHalfEven(value) {
    const floor = Math.floor(value), diff = value - floor;
    if (diff !== 0.5) return Math.round(value);
    return floor % 2 === 0 ? floor : floor + 1;
  }

  // 2-D grayscale (row-major, 0..255) -> 28x28 uint8 digit, or null when there is no ink.
  function toMnist(gray, width, height) {
    const ink = inkIntensity(gray, width, height);
    let strongest = 0;
    for (const v of ink) strongest = Math.max(strongest, v);
    if (strongest < MIN_INK_CONTRAST) return null;
    let top = height, bottom = -1, left = width, right = -1;
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        if (ink[y * width + x] > INK_FRACTION_OF_MAX * strongest) {
          top = Math.min(top, y); bottom = Math.max(bottom, y); left = Math.min(left, x); right = Math.max(right, x);
        }
      }
    }
    const cropWidth = right - left + 1, cropHeight = bottom - top + 1;
    const cropped = new Float32Array(cropWidth * cropHeight);
    const stretch = Math.fround(255 / strongest); // float32 arithmetic, as numpy does it
    for (let y = 0; y < cropHeight; y++) {
      for (let x = 0; x < cropWidth; x++) cropped[y * cropWidth + x] = ink[(top + y) * width + left + x] * stretch;
    }
    const scale = DIGIT_BOX_SIZE / Math.max(cropWidth, cropHeight);
    const newHeight = Math.max(1, roundHalfEven(cropHeight * scale)), newWidth = Math.max(1, roundHalfEven(cropWidth * scale));
    const digit = resize(cropped, cropWidth, cropHeight, newWidth, newHeight);
    let total = 0, rowMoment = 0, colMoment = 0;
    for (let y = 0; y < newHeight; y++) {
      for (let x = 0; x < newWidth; x++) {
        const v = digit[y * newWidth + x];
        total += v; rowMoment += y * v; colMoment += x * v;
      }
    }
    if (total <= 0) return null;
    let frameTop = Math.floor(FRAME_CENTRE - rowMoment / total + 0.5);
    let frameLeft = Math.floor(FRAME_CENTRE - colMoment / total + 0.5);
    frameTop = Math.min(Math.max(frameTop, 0), MNIST_SIZE - newHeight);
    frameLeft = Math.min(Math.max(frameLeft, 0), MNIST_SIZE - newWidth);
    const frame = new Uint8Array(MNIST_SIZE * MNIST_SIZE);
    for (let y = 0; y < newHeight; y++) {
      for (let x = 0; x < newWidth; x++) {
        frame[(frameTop + y) * MNIST_SIZE + frameLeft + x] = Math.min(Math.max(roundHalfEven(digit[y * newWidth + x]), 0), 255);
      }
    }
    return frame;
  }

  // RGBA canvas pixels -> grayscale as Pillow's convert("L") computes it, then toMnist.
  function fromRgba(rgba, width, height) {
    const gray = new Float32Array(width * height);
    for (let i = 0; i < gray.length; i++) {
      gray[i] = (rgba[4 * i] * 19595 + rgba[4 * i + 1] * 38470 + rgba[4 * i + 2] * 7471 + 0x8000) >> 16;
    }
    return toMnist(gray, width, height);
  }

  return { toMnist, fromRgba };
})();
