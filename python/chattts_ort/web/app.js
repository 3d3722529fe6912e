// chattts-ort's page: POST /v1/audio/speech as raw PCM (24 kHz s16le) and play it as it streams. Each piece the
// fetch reader hands over becomes an AudioBuffer scheduled right after the previous one on the AudioContext clock,
// so the first audio plays as soon as the server sends it. What was scheduled is kept (window.__chatttsPlayed) and
// offered as a WAV file when the stream ends.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("speak-form"), input = $("input"), voice = $("voice"), voiceSeed = $("voice-seed");
  const speakBtn = $("speak"), stopBtn = $("stop"), download = $("download"), errorBox = $("error");
  const LEAD = 0.05; // seconds ahead of the audio clock at which the first piece (or one after an underrun) starts

  let sampleRate = 24000; // the server's (GET /health); the page asks for raw PCM at this rate
  let ctx = null; // the AudioContext, made on the first Speak (a user gesture)
  let current = null; // the request in flight: {controller, sources}
  let wavUrl = null;

  const setText = (id, text) => { $(id).textContent = text; };
  const status = (text) => setText("status", text);

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // A failed response as one readable line: OpenAI's {"error": {message, type, param, code}}, FastAPI's
  // {"detail": ...}, or the start of whatever else came back.
  async function errorText(resp, what) {
    const head = `${what} failed: HTTP ${resp.status}${resp.statusText ? " " + resp.statusText : ""}`;
    let text = "";
    try { text = await resp.text(); } catch (e) { /* nothing readable */ }
    try {
      const body = JSON.parse(text);
      const err = body && body.error;
      if (err && err.message) {
        const extra = [err.param && `param: ${err.param}`, err.code && `code: ${err.code}`].filter(Boolean);
        return `${head}\n${err.message}${extra.length ? ` (${extra.join(", ")})` : ""}`;
      }
      if (body && body.detail) return `${head}\n${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
    } catch (e) { /* not JSON */ }
    return text ? `${head}\n${text.slice(0, 500)}` : head;
  }

  async function loadVoices() {
    let auth = false;
    try {
      const health = await fetch("health");
      if (health.ok) {
        const h = await health.json();
        sampleRate = h.sample_rate || sampleRate;
        auth = Boolean(h.auth);
      }
    } catch (e) { /* keep 24 kHz */ }
    if (auth && !$("api-key").value.trim()) { // the /v1 routes need the key: ask for it first
      $("auth").open = true;
      status("This server needs an API key: enter it under \"API key\".");
      return;
    }
    let resp;
    try {
      resp = await fetch("v1/audio/voices", { headers: authHeaders() });
    } catch (e) {
      showError(`Loading the voices failed: ${e.message}`);
      return;
    }
    if (!resp.ok) {
      showError(await errorText(resp, "Loading the voices") +
                (resp.status === 401 ? "\nEnter the server's API key (under \"API key\")." : ""));
      if (resp.status === 401) $("auth").open = true;
      return;
    }
    const names = (await resp.json()).voices || [];
    const keep = voice.value;
    voice.replaceChildren(...names.map((n) => new Option(n, n)), new Option("seed:N", "seed:"));
    voice.value = names.includes(keep) || keep === "seed:" ? keep : (names.includes("alloy") ? "alloy" : voice.options[0].value);
    voiceChanged();
    if (errorBox.textContent.startsWith("Loading the voices")) showError("");
    if (!current) status("Ready.");
  }

  function voiceChanged() {
    $("voice-seed-field").hidden = voice.value !== "seed:";
  }

  function optionalInt(el, name) {
    const v = el.value.trim();
    if (v === "") return undefined;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`${name} must be a whole number >= 0`);
    return n;
  }

  function requestBody() {
    const text = input.value;
    if (!text.trim()) throw new Error("Enter some text to speak.");
    const speed = Number($("speed").value || 1);
    if (!(speed >= 0.25 && speed <= 4)) throw new Error("Speed must be between 0.25 and 4.");
    let name = voice.value;
    if (name === "seed:") {
      const n = optionalInt(voiceSeed, "The voice seed");
      if (n === undefined) throw new Error("Enter the voice seed N.");
      name = `seed:${n}`;
    }
    const body = { input: text, voice: name, response_format: "pcm", speed };
    const lookahead = optionalInt($("lookahead"), "Lookahead");
    const seed = optionalInt($("seed"), "The sampling seed");
    if (lookahead !== undefined) body.lookahead = lookahead;
    if (seed !== undefined) body.seed = seed;
    return body;
  }

  function audioContext() {
    if (!ctx) {
      try {
        ctx = new AudioContext({ sampleRate, latencyHint: "interactive" });
      } catch (e) { // a rate the browser refuses: Web Audio resamples the 24 kHz buffers instead
        ctx = new AudioContext({ latencyHint: "interactive" });
      }
    }
    return ctx;
  }

  // A 16-bit mono WAV file of `samples` (Int16Array).
  function wavBlob(samples, rate) {
    const header = new DataView(new ArrayBuffer(44));
    const ascii = (off, s) => { for (let i = 0; i < s.length; i++) header.setUint8(off + i, s.charCodeAt(i)); };
    const bytes = samples.length * 2;
    ascii(0, "RIFF"); header.setUint32(4, 36 + bytes, true); ascii(8, "WAVE");
    ascii(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
    header.setUint32(24, rate, true); header.setUint32(28, rate * 2, true); header.setUint16(32, 2, true);
    header.setUint16(34, 16, true); ascii(36, "data"); header.setUint32(40, bytes, true);
    const data = new DataView(new ArrayBuffer(bytes));
    for (let i = 0; i < samples.length; i++) data.setInt16(2 * i, samples[i], true);
    return new Blob([header, data], { type: "audio/wav" });
  }

  function fmtSeconds(s) { return `${s.toFixed(s < 10 ? 3 : 1)} s`; }

  async function speak(event) {
    event.preventDefault();
    if (current) return;
    showError("");
    let body;
    try { body = requestBody(); } catch (e) { showError(e.message); return; }

    const ac = audioContext();
    const resumed = ac.resume(); // inside the click: browsers let a page start audio only from a user gesture
    const controller = new AbortController();
    const sources = new Set();
    current = { controller, sources };
    speakBtn.disabled = true;
    stopBtn.disabled = false;
    download.hidden = true;
    if (wavUrl) { URL.revokeObjectURL(wavUrl); wavUrl = null; }
    for (const id of ["first-audio", "duration", "rtf", "served-by"]) setText(id, "–");
    status("Requesting…");

    // what this request scheduled, piece by piece (int16, as received), and when each piece starts
    const played = { request: body, rate: sampleRate, pieces: [], starts: [], samples: null, firstAudioMs: null,
                     wallMs: null, rtf: null, done: false, ended: false, error: null };
    window.__chatttsPlayed = played;
    let total = 0, next = 0, carry = null, pending = 0;

    const t0 = performance.now();
    try {
      const resp = await fetch("v1/audio/speech", {
        method: "POST", signal: controller.signal, body: JSON.stringify(body),
        headers: { "Content-Type": "application/json", ...authHeaders() },
      });
      if (!resp.ok) throw new Error(await errorText(resp, "Speech"));
      if (!resp.body) throw new Error("This browser cannot read a streamed response.");
      setText("served-by", resp.headers.get("X-Served-By") || "this server");
      await resumed;
      status("Playing…");
      const reader = resp.body.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        let bytes = value;
        if (carry !== null) { // a sample split across two pieces of the stream
          bytes = new Uint8Array(value.length + 1);
          bytes[0] = carry;
          bytes.set(value, 1);
          carry = null;
        }
        const n = bytes.length >> 1;
        if (bytes.length & 1) carry = bytes[bytes.length - 1];
        if (n === 0) continue;

        const view = new DataView(bytes.buffer, bytes.byteOffset, 2 * n);
        const pcm = new Int16Array(n);
        const buffer = ac.createBuffer(1, n, sampleRate);
        const channel = buffer.getChannelData(0);
        for (let i = 0; i < n; i++) {
          pcm[i] = view.getInt16(2 * i, true);
          channel[i] = pcm[i] / 32768;
        }
        const src = ac.createBufferSource();
        src.buffer = buffer;
        src.connect(ac.destination);
        // back to back on the audio clock; the first piece, or one that arrives after the last has finished
        // playing (an underrun), starts just ahead of the clock
        next = Math.max(next, ac.currentTime + LEAD);
        src.start(next);
        played.starts.push(next);
        next += n / sampleRate;
        sources.add(src);
        pending++;
        src.onended = () => {
          sources.delete(src);
          if (--pending === 0 && played.done) {
            played.ended = true;
            if (current === null && !played.error) status("Done.");
          }
        };
        played.pieces.push(pcm);
        total += n;
        if (played.firstAudioMs === null) {
          played.firstAudioMs = performance.now() - t0;
          played.contextState = ac.state;
          setText("first-audio", `${Math.round(played.firstAudioMs)} ms`);
        }
        setText("duration", fmtSeconds(total / sampleRate));
      }
      if (carry !== null) throw new Error("The stream ended in the middle of a sample.");
    } catch (e) {
      played.error = e.name === "AbortError" ? "stopped" : e.message;
      if (e.name === "AbortError") status("Stopped.");
      else { showError(e.message); status("Failed."); }
    } finally {
      played.wallMs = performance.now() - t0;
      const samples = new Int16Array(total);
      let off = 0;
      for (const p of played.pieces) { samples.set(p, off); off += p.length; }
      played.samples = samples;
      played.done = true;
      if (total > 0) {
        played.rtf = played.wallMs / 1000 / (total / sampleRate);
        setText("rtf", `${played.rtf.toFixed(2)} (wall ${fmtSeconds(played.wallMs / 1000)} / audio ` +
                       `${fmtSeconds(total / sampleRate)})`);
        wavUrl = URL.createObjectURL(wavBlob(samples, sampleRate));
        download.href = wavUrl;
        download.hidden = false;
      }
      if (pending === 0) played.ended = true;
      if (!played.error) status(played.ended ? "Done." : "Received everything; playing…");
      current = null;
      speakBtn.disabled = false;
      stopBtn.disabled = true;
    }
  }

  function stop() {
    if (!current) return;
    current.controller.abort();
    for (const src of current.sources) {
      try { src.stop(); } catch (e) { /* not started yet */ }
    }
  }

  form.addEventListener("submit", speak);
  stopBtn.addEventListener("click", stop);
  voice.addEventListener("change", voiceChanged);
  $("api-key").addEventListener("change", loadVoices);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  loadVoices();
})();
