// imgsearch page: upload (file input or drag & drop) -> POST /v1/search -> grid + breed guess.
// Plain JS, no build step; everything comes from this origin (the CSP allows nothing else).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("search-form"), fileInput = $("file"), drop = $("drop"), preview = $("preview");
  const errorBox = $("error"), answer = $("answer"), guess = $("guess"), timings = $("timings");
  const results = $("results"), submit = $("submit"), banner = $("banner");
  const maxBytes = parseInt(document.body.dataset.maxUploadBytes || "0", 10);
  let current = null;      // the File being searched
  let previewUrl = null;

  const FRIENDLY = {
    payload_too_large: "That file is too big" + (maxBytes ? ` (the limit is ${(maxBytes / 1048576).toFixed(1)} MB).` : "."),
    unsupported_media_type: "That is not an image we can read. Try a JPEG, PNG, WebP, GIF or BMP.",
    undecodable_image: "That image seems damaged or cut short, so it cannot be decoded.",
    image_too_large: "That image has too many pixels to process.",
    missing_file: "Choose an image first.",
    overloaded: "The service is busy right now.",
    triton_unavailable: "The model server is not available right now.",
    milvus_unavailable: "The image index is not available right now.",
    not_found: "That image is no longer in the index.",
  };

  // "n02085620-Chihuahua" -> "Chihuahua", "golden_retriever" -> "golden retriever"
  function pretty(label) {
    return String(label || "").replace(/^n\d{8}[-_]/, "").replace(/_/g, " ");
  }

  function showError(status, body, retryAfter) {
    const err = body && body.error ? body.error : {};
    let text = FRIENDLY[err.code] || err.message || `Request failed (HTTP ${status}).`;
    if (retryAfter) text += ` Please try again in ${retryAfter} s.`;
    errorBox.textContent = text;
    errorBox.dataset.code = err.code || String(status);
    errorBox.hidden = false;
  }

  function clearError() { errorBox.hidden = true; errorBox.textContent = ""; delete errorBox.dataset.code; }

  function fmt(ms) { return ms < 10 ? ms.toFixed(1) : Math.round(ms).toString(); }

  function render(data) {
    results.replaceChildren();
    if (data.model && data.model.untrained) banner.hidden = false;
    const g = data.breed_guess;
    if (g) {
      const src = g.source === "probs" ? "from the model's classifier" : "from the most similar images";
      guess.replaceChildren(
        document.createTextNode("We guess your dog is a "),
        Object.assign(document.createElement("strong"), { textContent: pretty(g.label) }),
        document.createTextNode(` (${Math.round(g.confidence * 100)}% ${src})`));
    } else {
      guess.textContent = "No guess: nothing similar enough in the index.";
    }
    const t = data.timings_ms || {};
    timings.textContent = `decode ${fmt(t.decode || 0)} ms · infer ${fmt(t.infer || 0)} ms · ` +
      `search ${fmt(t.search || 0)} ms · total ${fmt(t.total || 0)} ms`;
    answer.hidden = false;
    if (!data.results.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "No results (try a lower minimum score or no label filter).";
      results.append(li);
      return;
    }
    for (const r of data.results) {
      const li = document.createElement("li");
      li.className = "card";
      const a = document.createElement("a");
      a.href = r.url;
      a.target = "_blank";
      a.rel = "noopener";
      const img = document.createElement("img");
      img.src = r.thumb_url;
      img.alt = pretty(r.label);
      img.loading = "lazy";
      a.append(img);
      const meta = document.createElement("div");
      meta.className = "meta";
      const label = Object.assign(document.createElement("span"), { className: "label", textContent: pretty(r.label), title: r.label });
      const score = Object.assign(document.createElement("span"), { className: "score", textContent: `score ${r.score.toFixed(3)}` });
      meta.append(label, score);
      const more = Object.assign(document.createElement("button"), { type: "button", textContent: "more like this" });
      more.addEventListener("click", () => similar(r));
      li.append(a, meta, more);
      results.append(li);
    }
  }

  async function call(url, init) {
    clearError();
    submit.disabled = true;
    try {
      const resp = await fetch(url, init);
      let body = null;
      try { body = await resp.json(); } catch (_) { body = null; }
      if (!resp.ok) {
        showError(resp.status, body, resp.headers.get("Retry-After"));
        return;
      }
      render(body);
    } catch (e) {
      showError(0, { error: { code: "network", message: "Cannot reach the server: " + e.message } });
    } finally {
      submit.disabled = false;
    }
  }

  function options() {
    const p = new URLSearchParams();
    const k = parseInt($("top_k").value, 10);
    if (k >= 1 && k <= 100) p.set("top_k", String(k));
    const label = $("label").value.trim();
    if (label) p.set("label", label);
    return p;
  }

  function search() {
    if (!current) { showError(422, { error: { code: "missing_file" } }); return; }
    if (maxBytes && current.size > maxBytes) { showError(413, { error: { code: "payload_too_large" } }); return; }
    const fd = new FormData();
    fd.append("file", current, current.name || "query");
    call("/v1/search?" + options().toString(), { method: "POST", body: fd });
  }

  function similar(r) {
    setPreview(r.thumb_url);
    current = null;
    call(`/v1/images/${r.id}/similar?` + options().toString(), { method: "GET" });
  }

  function setPreview(src) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = src.startsWith("blob:") ? src : null;
    preview.src = src;
    preview.hidden = false;
    $("drop-text").innerHTML = "<strong>Choose another photo</strong> or drop it here";
  }

  function choose(file) {
    if (!file) return;
    current = file;
    setPreview(URL.createObjectURL(file));
    search();
  }

  fileInput.addEventListener("change", () => choose(fileInput.files[0]));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (ev) => {
    const f = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
    if (f) choose(f);
  });
})();
