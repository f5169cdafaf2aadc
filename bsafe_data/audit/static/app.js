// bsafe-data audit app. Row text is data: it is only ever put in the page with textContent
// (never innerHTML), and the server's Content-Security-Policy forbids inline script.
"use strict";

(function () {
  const ANSWERS = ["yes", "no", "unsure"];
  const SEGMENTS = ["prefix", "steering", "violation", "control", "continuation"];
  const WARNED_KEY = "bsafe-audit-warned";
  const S = {
    annotator: null, csrf: null, blur: true, item: null, answers: {}, note: "", current: 0,
    submissionId: null, busy: false, revealed: false, progress: null, view: "none",
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function randomId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function api(method, path, body) {
    const headers = { "Accept": "application/json" };
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (method !== "GET") {
      headers["Content-Type"] = "application/json";
      if (S.csrf) headers["X-CSRF-Token"] = S.csrf;
      init.body = JSON.stringify(body || {});
    }
    const res = await fetch(path, init);
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    return { status: res.status, data: data || {} };
  }

  function show(view) {
    S.view = view;
    for (const id of ["login", "warning", "screen", "done"]) $(id).hidden = id !== view;
  }

  function setStatus(text, isError) {
    const node = $("status");
    node.textContent = text || "";
    node.classList.toggle("err", !!isError);
  }

  // -- drafts: answers in progress survive a reload ----------------------------------------
  function draftKey(itemId) { return "bsafe-audit-draft:" + S.annotator + ":" + itemId; }
  function saveDraft() {
    if (!S.item) return;
    const draft = { answers: S.answers, note: S.note, submissionId: S.submissionId };
    try { localStorage.setItem(draftKey(S.item.item_id), JSON.stringify(draft)); } catch (e) { /* full */ }
  }
  function loadDraft(itemId) {
    try { return JSON.parse(localStorage.getItem(draftKey(itemId)) || "null"); } catch (e) { return null; }
  }
  function dropDraft(itemId) { try { localStorage.removeItem(draftKey(itemId)); } catch (e) { /* */ } }

  // -- sign in -------------------------------------------------------------------------------
  async function login(token) {
    const res = await api("POST", "/api/login", { token });
    if (res.status !== 200) {
      show("login");
      $("login-error").textContent = res.status === 401 ? "Unknown token." : "Sign-in failed (" + res.status + ").";
      return;
    }
    await start();
  }

  async function start() {
    const res = await api("GET", "/api/session");
    if (res.status !== 200) { show("login"); $("token-input").focus(); return; }
    S.annotator = res.data.annotator;
    S.csrf = res.data.csrf;
    S.blur = !!res.data.blur;
    $("who").textContent = S.annotator;
    $("warning-blur").hidden = !S.blur;
    if (sessionStorage.getItem(WARNED_KEY) === "1") { await loadNext(); return; }
    show("warning");
    $("warning-ok").focus();
  }

  async function acceptWarning() {
    sessionStorage.setItem(WARNED_KEY, "1");
    await loadNext();
  }

  // -- the queue -----------------------------------------------------------------------------
  async function loadNext() {
    S.busy = true;
    const res = await api("GET", "/api/next");
    S.busy = false;
    if (res.status === 401) { show("login"); return; }
    if (res.status !== 200) { setStatus("Could not load the next row (" + res.status + ").", true); return; }
    setProgress(res.data.progress);
    if (!res.data.item) { S.item = null; show("done"); return; }
    render(res.data.item, null);
  }

  function setProgress(p) {
    if (!p) return;
    S.progress = p;
    $("progress").max = Math.max(1, p.total);
    $("progress").value = p.done;
    $("progress-text").textContent = p.done + " / " + p.total + " judged by you · set " +
      p.set_complete + " / " + p.set_items + " complete";
    $("done-progress").textContent = p.done + " rows judged (" + p.skipped + " skipped).";
  }

  function render(item, prefill) {
    S.item = item;
    const draft = prefill || loadDraft(item.item_id);
    S.answers = Object.assign({}, (draft && draft.answers) || {});
    S.note = (draft && draft.note) || "";
    S.submissionId = (draft && draft.submissionId) || randomId();
    S.revealed = !S.blur;
    const firstOpen = item.questions.findIndex((q) => !S.answers[q.key]);
    S.current = firstOpen === -1 ? 0 : firstOpen;
    saveDraft();
    show("screen");
    renderMeta(item);
    renderContext(item);
    renderStream(item);
    renderBacktrack(item);
    renderScores(item);
    renderQuestions();
    $("note").value = S.note;
    setStatus("");
    document.activeElement && document.activeElement.blur && document.activeElement.blur();
  }

  function renderMeta(item) {
    const meta = $("meta");
    clear(meta);
    meta.append(el("span", { class: "badge" }, item.row_id));
    meta.append(el("span", { class: item.config === "rejected" ? "badge bad" : "badge" }, "config " + item.config));
    meta.append(el("span", { class: "badge" }, item.split));
    meta.append(el("span", { class: "badge" }, item.kind));
    if (item.category) meta.append(el("span", { class: "badge info" }, item.category));
    if (item.relative_position !== null && item.relative_position !== undefined) {
      meta.append(el("span", { class: "badge" }, "position " + Number(item.relative_position).toFixed(2) +
        " (fifth " + item.fifth + ")"));
    }
    if (item.borderline) meta.append(el("span", { class: "badge warn" }, "near threshold"));
    if (item.replicas > 1) meta.append(el("span", { class: "badge" }, "overlap ×" + item.replicas));
  }

  function renderContext(item) {
    const box = $("context");
    clear(box);
    for (const turn of item.context) {
      box.append(el("div", { class: "turn" }, el("div", { class: "role" }, turn.role),
        el("p", { class: "content" }, turn.content)));
    }
  }

  function hidden(kind) { return S.blur && !S.revealed && (kind === "violation"); }

  function renderStream(item) {
    const stream = $("stream");
    clear(stream);
    for (const seg of item.segments) {
      if (!seg.text) continue;
      const kind = SEGMENTS.includes(seg.kind) ? seg.kind : "prefix";
      const span = el("span", { class: "seg seg-" + kind + (hidden(kind) ? " blurred" : ""),
        title: hidden(kind) ? "click or press r to reveal" : kind, dataset: { kind } },
      el("span", { class: "seg-tag tag-" + kind }, kind), seg.text);
      if (kind === "violation") span.addEventListener("click", () => setRevealed(true));
      stream.append(span);
    }
    const legend = $("legend");
    clear(legend);
    for (const kind of SEGMENTS) {
      legend.append(el("span", {}, el("span", { class: "sw seg-" + kind }), kind));
    }
    if (item.segments_missing) legend.append(el("span", {}, "(no segments recorded: the whole answer)"));
    $("control").textContent = item.control || "— (no control signal: " + item.kind + " row)";
  }

  function renderBacktrack(item) {
    const table = $("backtrack");
    clear(table);
    $("backtrack-card").hidden = item.backtrack.length === 0;
    table.append(el("tr", {}, el("th", {}, "tokenizer"), el("th", {}, "X"), el("th", {}, "deleted text")));
    for (const b of item.backtrack) {
      table.append(el("tr", {}, el("td", { class: "mono" }, b.tokenizer), el("td", { class: "num" }, b.tokens),
        el("td", { class: "deleted" + (hidden("violation") ? " blurred" : "") }, b.deleted)));
    }
  }

  function renderScores(item) {
    const table = $("scores");
    clear(table);
    table.append(el("tr", {}, el("th", {}, "classifier"), el("th", {}, "target"), el("th", {}, "label"),
      el("th", {}, "score"), el("th", {}, "threshold")));
    for (const s of item.scores) {
      const cats = s.categories.length ? " (" + s.categories.join(", ") + ")" : "";
      table.append(el("tr", { class: s.near ? "near" : "" }, el("td", {}, s.classifier), el("td", {}, s.target),
        el("td", {}, s.label + cats), el("td", { class: "num" }, s.score === null ? "—" : s.score.toFixed(3)),
        el("td", { class: "num" }, s.threshold === null ? "—" : s.threshold)));
    }
    const reasons = $("reasons");
    clear(reasons);
    for (const r of item.reasons) reasons.append(el("li", {}, el("strong", {}, r.code), r.text ? ": " + r.text : ""));
  }

  function renderQuestions() {
    const list = $("questions");
    clear(list);
    S.item.questions.forEach((q, i) => {
      const opts = ANSWERS.map((a, j) => el("button", {
        type: "button", class: "opt " + a + (S.answers[q.key] === a ? " chosen" : ""), tabindex: -1,
        onclick: () => { S.current = i; answer(a); },
      }, (j + 1) + " " + a));
      list.append(el("li", { class: i === S.current ? "current" : "", dataset: { key: q.key },
        "aria-current": i === S.current ? "true" : null },
      el("div", { class: "qtext" }, (i + 1) + ". " + q.text), el("div", {}, ...opts)));
    });
  }

  function answer(value) {
    const q = S.item.questions[S.current];
    S.answers[q.key] = value;
    const open = S.item.questions.findIndex((x, i) => i > S.current && !S.answers[x.key]);
    if (open !== -1) S.current = open;
    else if (S.current < S.item.questions.length - 1) S.current += 1;
    saveDraft();
    renderQuestions();
    const missing = S.item.questions.filter((x) => !S.answers[x.key]).length;
    setStatus(missing ? "" : "All answered: Enter submits.");
  }

  function move(delta) {
    const n = S.item.questions.length;
    S.current = (S.current + delta + n) % n;
    renderQuestions();
  }

  function setRevealed(on) {
    if (!S.blur) return;
    S.revealed = on;
    for (const node of document.querySelectorAll(".seg-violation, td.deleted")) node.classList.toggle("blurred", !on);
  }

  async function submit(skipped) {
    if (S.busy || !S.item) return;
    const missing = S.item.questions.findIndex((q) => !S.answers[q.key]);
    if (!skipped && missing !== -1) {
      S.current = missing;
      renderQuestions();
      const li = $("questions").children[missing];
      if (li) li.classList.add("missing");
      setStatus("Answer every question first (or skip with s).", true);
      return;
    }
    S.busy = true;
    setStatus(skipped ? "Skipping…" : "Saving…");
    const item = S.item;
    let res;
    try {
      res = await api("POST", "/api/judgements", {
        item_id: item.item_id, answers: skipped ? {} : S.answers, note: S.note, skipped: !!skipped,
        submission_id: S.submissionId,
      });
    } catch (e) {
      S.busy = false;
      setStatus("Not saved (server unreachable). Your answers are kept; try again.", true);
      return;
    }
    S.busy = false;
    if (res.status !== 200) {
      setStatus("Not saved (" + res.status + ": " + (res.data.error || "error") + ").", true);
      return;
    }
    dropDraft(item.item_id);
    await loadNext();
  }

  async function undo() {
    if (S.busy) return;
    S.busy = true;
    const res = await api("POST", "/api/undo", {});
    S.busy = false;
    if (res.status === 409) { setStatus("Nothing to undo."); return; }
    if (res.status !== 200) { setStatus("Undo failed (" + res.status + ").", true); return; }
    setProgress(res.data.progress);
    render(res.data.item, { answers: res.data.previous.answers, note: res.data.previous.note, submissionId: null });
    setStatus("Undone: judge this row again.");
  }

  async function logout() {
    await api("POST", "/api/logout", {});
    S.annotator = S.csrf = null;
    show("login");
  }

  // -- keyboard first ------------------------------------------------------------------------
  function onKey(ev) {
    if (ev.altKey || (ev.ctrlKey && ev.key !== "Enter") || ev.metaKey) return;
    const target = ev.target;
    const typing = target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT");
    if (S.view === "warning") {
      if (ev.key === "Enter" && !typing) { ev.preventDefault(); acceptWarning(); }
      return;
    }
    if (S.view === "done") {
      if (ev.key === "u") { ev.preventDefault(); undo(); }
      return;
    }
    if (S.view !== "screen") return;
    if (typing) {
      if (ev.key === "Escape") { target.blur(); ev.preventDefault(); }
      else if (ev.key === "Enter" && ev.ctrlKey) { ev.preventDefault(); target.blur(); submit(false); }
      return;
    }
    const key = ev.key;
    if (key === "1" || key === "2" || key === "3") { ev.preventDefault(); answer(ANSWERS[Number(key) - 1]); }
    else if (key === "j" || key === "ArrowDown") { ev.preventDefault(); move(1); }
    else if (key === "k" || key === "ArrowUp") { ev.preventDefault(); move(-1); }
    else if (key === "Enter") { ev.preventDefault(); submit(false); }
    else if (key === "s") { ev.preventDefault(); submit(true); }
    else if (key === "u") { ev.preventDefault(); undo(); }
    else if (key === "r") { ev.preventDefault(); setRevealed(!S.revealed); }
    else if (key === "n") { ev.preventDefault(); $("note").focus(); }
  }

  function init() {
    document.addEventListener("keydown", onKey);
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      $("login-error").textContent = "";
      login($("token-input").value.trim());
    });
    $("warning-ok").addEventListener("click", acceptWarning);
    $("submit").addEventListener("click", () => submit(false));
    $("skip").addEventListener("click", () => submit(true));
    $("undo").addEventListener("click", undo);
    $("logout").addEventListener("click", logout);
    $("note").addEventListener("input", () => { S.note = $("note").value; saveDraft(); });
    const match = /^#token=([^&]+)/.exec(location.hash);
    if (match) {
      history.replaceState(null, "", location.pathname);  // the token leaves the address bar at once
      login(decodeURIComponent(match[1]));
    } else {
      start();
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
